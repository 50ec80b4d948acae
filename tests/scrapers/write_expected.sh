#!/bin/sh
# Test scraper: writes every key of $ADCE_EXPECTED_KEYS under $ADCE_OUTPUT_DIR
# with content naming the key and the attempt, and journals each key it
# produced as one line "<key> <attempt> <cwd> <output dir>" in $COUNT_FILE (if
# set), so tests can count runs per key and see which agent ran them (the
# agent's work dir appears in the paths). Optional $SLEEP: seconds to wait
# before writing.
set -eu

: "${ADCE_OUTPUT_DIR:?ADCE_OUTPUT_DIR is not set}"
attempt="${ADCE_ATTEMPT:-0}"
echo "::progress:: 0.5 writing"
echo "task ${ADCE_TASK_ID:-?} attempt $attempt source ${ADCE_SOURCE:-?}"
if [ -n "${SLEEP:-}" ]; then
    sleep "$SLEEP"
fi
here="$(pwd)"
printf '%s\n' "${ADCE_EXPECTED_KEYS:-}" | while IFS= read -r key; do
    if [ -z "$key" ]; then
        continue
    fi
    mkdir -p "$ADCE_OUTPUT_DIR/$(dirname "$key")"
    printf '{"key": "%s", "attempt": %s, "task": "%s", "by": "write_expected.sh"}\n' \
        "$key" "$attempt" "${ADCE_TASK_ID:-}" >"$ADCE_OUTPUT_DIR/$key"
    if [ -n "${COUNT_FILE:-}" ]; then
        printf '%s %s %s %s\n' "$key" "$attempt" "$here" "$ADCE_OUTPUT_DIR" >>"$COUNT_FILE"
    fi
done
echo "wrote the expected keys"
