#!/bin/sh
# Test scraper: prints one stdout line of $HUGE_BYTES bytes (default 100 MiB)
# of `a`, then a short line, then writes every key of $ADCE_EXPECTED_KEYS
# under $ADCE_OUTPUT_DIR. The agent must forward a truncated line without
# ever holding the whole one.
set -eu

: "${ADCE_OUTPUT_DIR:?ADCE_OUTPUT_DIR is not set}"
head -c "${HUGE_BYTES:-104857600}" /dev/zero | tr '\0' a
echo
echo "after the huge line"
printf '%s\n' "${ADCE_EXPECTED_KEYS:-}" | while IFS= read -r key; do
    if [ -n "$key" ]; then
        mkdir -p "$ADCE_OUTPUT_DIR/$(dirname "$key")"
        printf '{"key": "%s", "by": "huge_line.sh"}\n' "$key" >"$ADCE_OUTPUT_DIR/$key"
    fi
done
