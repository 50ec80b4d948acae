#!/bin/sh
# Test scraper for the agent-kill test: journals "start <attempt> <pid> <cwd>"
# in $COUNT_FILE, then sleeps (long on the first run of all, $SLOW_SECONDS,
# default 30; short on later runs, $RETRY_SECONDS, default 1) and writes every
# key of $ADCE_EXPECTED_KEYS. The pid is that of this shell, the leader of the
# process group the agent made, so the test can stop an orphaned first run.
set -eu

: "${ADCE_OUTPUT_DIR:?ADCE_OUTPUT_DIR is not set}"
: "${COUNT_FILE:?COUNT_FILE is not set}"
attempt="${ADCE_ATTEMPT:-0}"
if [ -f "$COUNT_FILE" ] && grep -q '^start ' "$COUNT_FILE"; then
    pause="${RETRY_SECONDS:-1}"
else
    pause="${SLOW_SECONDS:-30}"
fi
printf 'start %s %s %s\n' "$attempt" "$$" "$(pwd)" >>"$COUNT_FILE"
echo "::progress:: 0.1 sleeping ${pause}s"
sleep "$pause"
printf '%s\n' "${ADCE_EXPECTED_KEYS:-}" | while IFS= read -r key; do
    if [ -z "$key" ]; then
        continue
    fi
    mkdir -p "$ADCE_OUTPUT_DIR/$(dirname "$key")"
    printf 'slow object %s attempt %s\n' "$key" "$attempt" >"$ADCE_OUTPUT_DIR/$key"
done
printf 'done %s %s\n' "$attempt" "$$" >>"$COUNT_FILE"
echo "slow scraper finished"
