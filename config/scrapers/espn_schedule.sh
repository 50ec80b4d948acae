#!/bin/sh
# Demo scraper for `espn_schedule`: writes a synthetic ESPN scoreboard for one day.
#   usage: espn_schedule.sh --date YYYYMMDD [--out DIR]
# Writes DIR/espn/schedule/YYYYMMDD.json (DIR defaults to $ADCE_OUTPUT_DIR). No network.
set -eu

date=""
out="${ADCE_OUTPUT_DIR:-}"
while [ $# -gt 0 ]; do
    case "$1" in
        --date) date="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        --out=*) out="${1#--out=}"; shift ;;
        *) echo "espn_schedule: unknown argument: $1" >&2; exit 64 ;;
    esac
done
case "$date" in
    [12][0-9][0-9][0-9][01][0-9][0-3][0-9]) ;;
    *) echo "espn_schedule: --date must be YYYYMMDD, got '$date'" >&2; exit 64 ;;
esac
[ -n "$out" ] || { echo "espn_schedule: no output directory (--out or ADCE_OUTPUT_DIR)" >&2; exit 64; }

echo "espn_schedule: GET ${ESPN_API_BASE:-https://example.invalid}/scoreboard?dates=$date (simulated)"
echo "::progress:: 0.5 halfway"

key="espn/schedule/$date.json"
mkdir -p "$out/espn/schedule"

# Deterministic game count and matchups derived from the date.
seed=$(( date % 10000 ))
games=$(( seed % 9 + 3 ))
set -- BOS NYK MIL DEN OKC LAL GSW MIA PHI CLE DAL MIN PHX SAC IND ORL
{
    printf '{"date":"%s","league":"nba","source":"espn","events":[' "$date"
    i=0
    while [ "$i" -lt "$games" ]; do
        [ "$i" -gt 0 ] && printf ','
        h=$(( (seed + i * 3) % 16 + 1 ))
        a=$(( (seed + i * 5 + 7) % 16 + 1 ))
        [ "$a" -eq "$h" ] && a=$(( h % 16 + 1 ))
        eval "home=\${$h}"
        eval "away=\${$a}"
        printf '{"id":"4016%04d%02d","home":"%s","away":"%s","status":"final","venue_capacity":%d}' \
            "$(( seed % 10000 ))" "$i" "$home" "$away" "$(( 17000 + (seed * (i + 1)) % 3000 ))"
        i=$(( i + 1 ))
    done
    printf ']}\n'
} > "$out/$key"
echo "espn_schedule: wrote $key ($games games)"
