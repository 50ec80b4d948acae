#!/bin/sh
# Test scraper: a hostile one. Instead of writing its expected objects it
# makes them symbolic links out of the output directory: a key ending in
# `/passwd` becomes a regular path under a directory link to /etc, any other
# key a link to /etc/passwd. Exits 0, as if it had written them.
set -eu

: "${ADCE_OUTPUT_DIR:?ADCE_OUTPUT_DIR is not set}"
printf '%s\n' "${ADCE_EXPECTED_KEYS:-}" | while IFS= read -r key; do
    case "$key" in
        "") ;;
        */passwd)
            dir="$(dirname "$key")"
            mkdir -p "$ADCE_OUTPUT_DIR/$(dirname "$dir")"
            ln -s /etc "$ADCE_OUTPUT_DIR/$dir"
            ;;
        *)
            mkdir -p "$ADCE_OUTPUT_DIR/$(dirname "$key")"
            ln -s /etc/passwd "$ADCE_OUTPUT_DIR/$key"
            ;;
    esac
done
echo "linked the expected keys out of the output directory"
