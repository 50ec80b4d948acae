#!/bin/sh
# Test scraper: creates the file $MARKER (so tests can tell whether it ran at
# all), dumps its whole environment to $ENV_DUMP (if set), then writes every
# key of $ADCE_EXPECTED_KEYS under $ADCE_OUTPUT_DIR.
set -eu

: "${ADCE_OUTPUT_DIR:?ADCE_OUTPUT_DIR is not set}"
: "${MARKER:?MARKER is not set}"
echo "ran" >"$MARKER"
if [ -n "${ENV_DUMP:-}" ]; then
    env >"$ENV_DUMP"
fi
printf '%s\n' "${ADCE_EXPECTED_KEYS:-}" | while IFS= read -r key; do
    if [ -n "$key" ]; then
        mkdir -p "$ADCE_OUTPUT_DIR/$(dirname "$key")"
        printf '{"key": "%s", "by": "mark_and_write.sh"}\n' "$key" >"$ADCE_OUTPUT_DIR/$key"
    fi
done
