#!/bin/sh
# Demo scraper for `bbref_season` and `bbref_roster`: writes synthetic
# basketball-reference CSV files.
#   usage: bbref.sh --season YYYY-YY [--team ABC] [--out DIR]
# Without --team: DIR/bbref/seasons/<season>/totals.csv and advanced.csv.
# With --team:    DIR/bbref/rosters/<season>/<team>.csv.
# DIR defaults to $ADCE_OUTPUT_DIR. No network.
set -eu

season=""
team=""
out="${ADCE_OUTPUT_DIR:-}"
while [ $# -gt 0 ]; do
    case "$1" in
        --season) season="$2"; shift 2 ;;
        --team) team="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        --out=*) out="${1#--out=}"; shift ;;
        *) echo "bbref: unknown argument: $1" >&2; exit 64 ;;
    esac
done
case "$season" in
    [12][0-9][0-9][0-9]-[0-9][0-9]) ;;
    *) echo "bbref: --season must be YYYY-YY, got '$season'" >&2; exit 64 ;;
esac
case "$team" in
    *[!A-Z]*) echo "bbref: --team must be upper-case letters, got '$team'" >&2; exit 64 ;;
esac
[ -n "$out" ] || { echo "bbref: no output directory (--out or ADCE_OUTPUT_DIR)" >&2; exit 64; }

year=$(( ${season%-*} + 0 ))
echo "bbref: fetching ${team:-league} ${season} (simulated)"
echo "::progress:: 0.5 halfway"

players="Tatum Jokic Antetokounmpo Gilgeous-Alexander Doncic James Curry Brunson Edwards Haliburton"

if [ -n "$team" ]; then
    dir="bbref/rosters/$season"
    mkdir -p "$out/$dir"
    {
        echo "season,team,no,player,pos,age"
        i=1
        for p in $players; do
            case $(( i % 5 )) in 0) pos=G ;; 1) pos=F ;; 2) pos=C ;; 3) pos=G-F ;; *) pos=F-C ;; esac
            echo "$season,$team,$(( (year + i * 7) % 99 )),$p,$pos,$(( 20 + (year + i) % 15 ))"
            i=$(( i + 1 ))
        done
    } > "$out/$dir/$team.csv"
    echo "bbref: wrote $dir/$team.csv"
else
    dir="bbref/seasons/$season"
    mkdir -p "$out/$dir"
    {
        echo "season,player,g,mp,pts,trb,ast"
        i=1
        for p in $players; do
            echo "$season,$p,$(( 60 + (year + i) % 23 )),$(( 1800 + (year * i) % 900 )),$(( 1200 + (year * 3 + i * 41) % 1100 )),$(( 300 + (year + i * 17) % 600 )),$(( 150 + (year + i * 29) % 500 ))"
            i=$(( i + 1 ))
        done
    } > "$out/$dir/totals.csv"
    {
        echo "season,player,per,ts_pct,ws,bpm,vorp"
        i=1
        for p in $players; do
            echo "$season,$p,$(( 15 + (year + i) % 16 )).$(( i % 10 )),0.$(( 540 + (year + i * 3) % 120 )),$(( 4 + (year + i) % 12 )).$(( (year + i) % 10 )),$(( (year + i) % 9 )).$(( i % 10 )),$(( 1 + (year + i) % 7 )).$(( (year * i) % 10 ))"
            i=$(( i + 1 ))
        done
    } > "$out/$dir/advanced.csv"
    echo "bbref: wrote $dir/totals.csv and $dir/advanced.csv"
fi
