#!/bin/sh
# Demo scraper for `nba_boxscore` and `nba_pbp`: writes a synthetic box score or
# play-by-play for one game.
#   usage: nba_game.sh --kind boxscore|pbp --game-id ID [--out DIR]
# Writes DIR/nba/<kind>/<ID>.json (DIR defaults to $ADCE_OUTPUT_DIR). No network.
set -eu

kind=""
game_id="${ADCE_VAR_GAME_ID:-}"
out="${ADCE_OUTPUT_DIR:-}"
while [ $# -gt 0 ]; do
    case "$1" in
        --kind) kind="$2"; shift 2 ;;
        --game-id) game_id="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        --out=*) out="${1#--out=}"; shift ;;
        *) echo "nba_game: unknown argument: $1" >&2; exit 64 ;;
    esac
done
case "$kind" in boxscore|pbp) ;; *) echo "nba_game: --kind must be boxscore or pbp" >&2; exit 64 ;; esac
case "$game_id" in
    ''|*[!0-9]*) echo "nba_game: --game-id must be digits, got '$game_id'" >&2; exit 64 ;;
esac
[ -n "$out" ] || { echo "nba_game: no output directory (--out or ADCE_OUTPUT_DIR)" >&2; exit 64; }

echo "nba_game: fetching $kind for game $game_id (simulated)"
echo "::progress:: 0.5 halfway"

# Strip leading zeros so that shell arithmetic does not read the id as octal.
n=$game_id
while case "$n" in 0?*) true ;; *) false ;; esac; do n=${n#0}; done
n=$(( n % 100000 ))
set -- BOS NYK MIL DEN OKC LAL GSW MIA PHI CLE DAL MIN PHX SAC IND ORL
h=$(( n % 16 + 1 ))
a=$(( (n * 7 + 3) % 16 + 1 ))
[ "$a" -eq "$h" ] && a=$(( h % 16 + 1 ))
eval "home=\${$h}"
eval "away=\${$a}"

key="nba/$kind/$game_id.json"
mkdir -p "$out/nba/$kind"
if [ "$kind" = boxscore ]; then
    {
        printf '{"game_id":"%s","home":{"team":"%s","pts":%d,"reb":%d,"ast":%d},' \
            "$game_id" "$home" "$(( 95 + n % 37 ))" "$(( 38 + n % 13 ))" "$(( 20 + n % 11 ))"
        printf '"away":{"team":"%s","pts":%d,"reb":%d,"ast":%d},"periods":4}\n' \
            "$away" "$(( 93 + (n * 3) % 39 ))" "$(( 36 + (n * 5) % 15 ))" "$(( 19 + (n * 7) % 12 ))"
    } > "$out/$key"
else
    {
        printf '{"game_id":"%s","plays":[' "$game_id"
        i=1
        hs=0
        as=0
        while [ "$i" -le 24 ]; do
            [ "$i" -gt 1 ] && printf ','
            if [ $(( (n + i) % 2 )) -eq 0 ]; then team=$home; hs=$(( hs + 2 + i % 2 )); else team=$away; as=$(( as + 2 )); fi
            printf '{"n":%d,"period":%d,"clock":"%02d:%02d","team":"%s","score":"%d-%d"}' \
                "$i" "$(( (i - 1) / 6 + 1 ))" "$(( 11 - (i - 1) % 6 * 2 ))" "$(( (n + i * 13) % 60 ))" "$team" "$hs" "$as"
            i=$(( i + 1 ))
        done
        printf ']}\n'
    } > "$out/$key"
fi
echo "nba_game: wrote $key"
