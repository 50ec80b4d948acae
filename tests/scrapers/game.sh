#!/bin/sh
# Test scraper for dependent sources: one game (or any partition named by a
# value read out of a parent object). Called as `game.sh ID [MORE...]`; appends
# one line "run argv=<all arguments> vars=<every ADCE_VAR_* variable>" to
# $JOURNAL (if set), then writes every key of $ADCE_EXPECTED_KEYS as JSON
# naming the key and the id.
set -eu

: "${ADCE_OUTPUT_DIR:?ADCE_OUTPUT_DIR is not set}"
id="${1:?usage: game.sh ID}"
if [ -n "${JOURNAL:-}" ]; then
    vars="$(env | grep '^ADCE_VAR_' | sort | tr '\n' ' ')"
    printf 'run argv=%s vars=%s\n' "$*" "$vars" >>"$JOURNAL"
fi
printf '%s\n' "${ADCE_EXPECTED_KEYS:-}" | while IFS= read -r key; do
    if [ -z "$key" ]; then
        continue
    fi
    mkdir -p "$ADCE_OUTPUT_DIR/$(dirname "$key")"
    printf '{"key": "%s", "id": "%s", "game_id": "%s"}\n' "$key" "$id" "${ADCE_VAR_GAME_ID:-}" \
        >"$ADCE_OUTPUT_DIR/$key"
done
echo "wrote game $id"
