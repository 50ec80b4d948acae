#!/usr/bin/env bash
# Reference figure for the dispatch benchmark (tests/src/bin/bench_dispatch.rs):
# how fast Celery with a Redis broker drains N no-op tasks on this machine.
# Not part of the test command.
#
#   scripts/bench_celery.sh [N]        N tasks, default 20000
#   CELERY_POOL=prefork scripts/bench_celery.sh   another worker pool
#
# Installs celery[redis] into the repo's .venv (created when missing) and
# redis-server with apt-get only when it is missing. Starts redis-server on a
# free loopback port with persistence off, enqueues N no-op tasks, then
# starts one worker and measures from its first consumed message until the
# broker holds no message, queued or unacknowledged (late acks, so a message
# leaves the broker only after its task ran). Redis and the worker are
# children of this script and are stopped by their pids.
#
# The default pool is `solo` (one process, tasks run in the consuming
# process): on the 2-core benchmark machine it drained 20,000 no-op tasks at
# about 1,180 tasks/s (median of 3), against about 1,000 for `threads -c 2`
# and 940 for `prefork -c 2`, whose hand-off costs more than a no-op task.
set -euo pipefail

n="${1:-20000}"
pool="${CELERY_POOL:-solo}"
concurrency="${CELERY_CONCURRENCY:-2}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"

if [[ ! -x "$venv/bin/python" ]]; then
    echo "bench_celery: creating $venv" >&2
    python3 -m venv "$venv"
fi
if ! "$venv/bin/python" -c 'import celery, redis' 2>/dev/null; then
    echo "bench_celery: installing celery[redis] into $venv" >&2
    "$venv/bin/python" -m pip --disable-pip-version-check -q install "celery[redis]"
fi
if ! command -v redis-server >/dev/null 2>&1; then
    echo "bench_celery: installing redis-server" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server >/dev/null
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/adce-bench-celery.XXXXXX")"
redis_pid=""
worker_pid=""
cleanup() {
    for pid in "$worker_pid" "$redis_pid"; do
        if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid" 2>/dev/null || true
            for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
    rm -rf "$work"
}
trap cleanup EXIT

port="$("$venv/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
redis-server --bind 127.0.0.1 --port "$port" --save '' --appendonly no \
    --dir "$work" --daemonize no --loglevel warning >"$work/redis.log" 2>&1 &
redis_pid=$!
export BROKER="redis://127.0.0.1:$port/0"

cat >"$work/bench_tasks.py" <<'EOF'
"""A no-op Celery task for scripts/bench_celery.sh."""
import os

from celery import Celery

app = Celery("bench_tasks", broker=os.environ["BROKER"])
app.conf.update(
    task_ignore_result=True,
    task_acks_late=True,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@app.task
def noop():
    return None
EOF

cat >"$work/drive.py" <<'EOF'
"""Waits for redis, enqueues N tasks, or waits until the broker is empty."""
import sys
import time

import redis

r = redis.Redis.from_url(__import__("os").environ["BROKER"])


def pending():
    return r.llen("celery") + r.hlen("unacked")


if sys.argv[1] == "ready":
    for _ in range(100):
        try:
            r.ping()
            sys.exit(0)
        except redis.ConnectionError:
            time.sleep(0.1)
    sys.exit("redis-server did not answer within 10 s")
elif sys.argv[1] == "enqueue":
    from bench_tasks import noop

    n = int(sys.argv[2])
    started = time.monotonic()
    with noop.app.producer_or_acquire() as producer:
        for _ in range(n):
            noop.apply_async(producer=producer)
    print(f"{time.monotonic() - started:.3f} {r.llen('celery')}")
elif sys.argv[1] == "drain":
    n, timeout = int(sys.argv[2]), float(sys.argv[3])
    spawned = time.monotonic()
    deadline = spawned + timeout
    while r.llen("celery") >= n:
        if time.monotonic() > deadline:
            sys.exit("the worker consumed nothing in time")
        time.sleep(0.005)
    first = time.monotonic()
    while pending() > 0:
        if time.monotonic() > deadline:
            sys.exit(f"{pending()} messages left in the broker")
        time.sleep(0.01)
    done = time.monotonic()
    print(f"{first - spawned:.3f} {done - first:.3f}")
EOF

cd "$work"
"$venv/bin/python" drive.py ready
read -r enqueue_s queued < <("$venv/bin/python" drive.py enqueue "$n")
if [[ "$queued" -ne "$n" ]]; then
    echo "bench_celery: $queued of $n tasks queued" >&2
    exit 1
fi

worker_args=(-A bench_tasks worker -P "$pool" --without-gossip --without-mingle --without-heartbeat -l warning)
if [[ "$pool" != "solo" ]]; then
    worker_args+=(-c "$concurrency")
fi
"$venv/bin/celery" "${worker_args[@]}" >"$work/worker.log" 2>&1 &
worker_pid=$!
if ! read -r boot_s drain_s < <("$venv/bin/python" drive.py drain "$n" 600); then
    echo "bench_celery: the worker did not drain the queue; its log:" >&2
    tail -n 40 "$work/worker.log" >&2
    exit 1
fi

pool_text="$pool"
[[ "$pool" != "solo" ]] && pool_text="$pool -c $concurrency"
echo "celery $("$venv/bin/celery" --version | cut -d' ' -f1), redis $(redis-server --version | sed -n 's/.*v=\([^ ]*\).*/\1/p'), pool $pool_text"
echo "enqueued $n no-op tasks in ${enqueue_s} s"
echo "worker: first message consumed ${boot_s} s after spawn; drained $n tasks in ${drain_s} s"
"$venv/bin/python" -c "print(f'throughput: {$n / $drain_s:.0f} tasks/s')"
