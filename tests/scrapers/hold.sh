#!/bin/sh
# Test scraper: waits while the file $HOLD exists (at most 60 s), then writes
# its expected keys like write_expected.sh.
set -eu
i=0
while [ -e "${HOLD:?HOLD is not set}" ] && [ "$i" -lt 600 ]; do
    sleep 0.1
    i=$((i + 1))
done
exec "$(dirname "$0")/write_expected.sh"
