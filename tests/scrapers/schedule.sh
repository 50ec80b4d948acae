#!/bin/sh
# Test scraper for dependent sources: the "schedule" of one day. Called as
# `schedule.sh YYYYMMDD`; writes every key of $ADCE_EXPECTED_KEYS as JSON with
# $GAMES_PER_DAY (default 3) events whose ids are the day followed by 01, 02, ...
set -eu

: "${ADCE_OUTPUT_DIR:?ADCE_OUTPUT_DIR is not set}"
day="${1:?usage: schedule.sh YYYYMMDD}"
games="${GAMES_PER_DAY:-3}"
events=""
i=1
while [ "$i" -le "$games" ]; do
    id="$(printf '%s%02d' "$day" "$i")"
    if [ -n "$events" ]; then
        events="$events, "
    fi
    events="$events{\"id\": \"$id\"}"
    i=$((i + 1))
done
printf '%s\n' "${ADCE_EXPECTED_KEYS:-}" | while IFS= read -r key; do
    if [ -z "$key" ]; then
        continue
    fi
    mkdir -p "$ADCE_OUTPUT_DIR/$(dirname "$key")"
    printf '{"key": "%s", "date": "%s", "events": [%s]}\n' "$key" "$day" "$events" \
        >"$ADCE_OUTPUT_DIR/$key"
done
echo "wrote the schedule of $day"
