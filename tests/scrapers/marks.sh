#!/bin/sh
# Test scraper: journals "start <ns> <task>" when it starts and "end <ns> <task>"
# just before it exits to $JOURNAL, so tests can measure how many runs of a limit
# group overlapped, as the scrapers themselves saw it. Waits $SLEEP seconds in
# between and writes every key of $ADCE_EXPECTED_KEYS.
set -eu

: "${ADCE_OUTPUT_DIR:?ADCE_OUTPUT_DIR is not set}"
: "${JOURNAL:?JOURNAL is not set}"
printf 'start %s %s\n' "$(date +%s%N)" "${ADCE_TASK_ID:-?}" >>"$JOURNAL"
sleep "${SLEEP:-0}"
printf '%s\n' "${ADCE_EXPECTED_KEYS:-}" | while IFS= read -r key; do
    if [ -n "$key" ]; then
        mkdir -p "$ADCE_OUTPUT_DIR/$(dirname "$key")"
        printf '{"key": "%s"}\n' "$key" >"$ADCE_OUTPUT_DIR/$key"
    fi
done
printf 'end %s %s\n' "$(date +%s%N)" "${ADCE_TASK_ID:-?}" >>"$JOURNAL"
