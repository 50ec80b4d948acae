#!/bin/sh
# Demo scraper for `nba_standings`: writes a synthetic standings snapshot for one date.
#   usage: nba_standings.sh --date YYYY-MM-DD [--out DIR | --out=DIR]
# Writes DIR/nba/standings/YYYY-MM-DD.json (DIR defaults to $ADCE_OUTPUT_DIR). No network.
set -eu

date=""
out="${ADCE_OUTPUT_DIR:-}"
while [ $# -gt 0 ]; do
    case "$1" in
        --date) date="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        --out=*) out="${1#--out=}"; shift ;;
        *) echo "nba_standings: unknown argument: $1" >&2; exit 64 ;;
    esac
done
case "$date" in
    [12][0-9][0-9][0-9]-[01][0-9]-[0-3][0-9]) ;;
    *) echo "nba_standings: --date must be YYYY-MM-DD, got '$date'" >&2; exit 64 ;;
esac
[ -n "$out" ] || { echo "nba_standings: no output directory (--out or ADCE_OUTPUT_DIR)" >&2; exit 64; }

echo "nba_standings: computing standings as of $date (simulated)"
echo "::progress:: 0.5 halfway"

key="nba/standings/$date.json"
mkdir -p "$out/nba/standings"
compact=$(echo "$date" | tr -d '-')
day=$(( compact % 1000 ))
{
    printf '{"as_of":"%s","conferences":[' "$date"
    first=1
    for conf in East West; do
        [ "$first" -eq 1 ] || printf ','
        first=0
        printf '{"name":"%s","teams":[' "$conf"
        rank=1
        if [ "$conf" = East ]; then teams="BOS NYK MIL CLE ORL IND MIA PHI"; else teams="OKC DEN MIN DAL LAL GSW PHX SAC"; fi
        for t in $teams; do
            [ "$rank" -gt 1 ] && printf ','
            wins=$(( (day / 7 + 9 - rank) % 30 + 5 ))
            losses=$(( (day / 5 + rank) % 25 + 3 ))
            printf '{"rank":%d,"team":"%s","w":%d,"l":%d}' "$rank" "$t" "$wins" "$losses"
            rank=$(( rank + 1 ))
        done
        printf ']}'
    done
    printf ']}\n'
} > "$out/$key"
echo "nba_standings: wrote $key"
