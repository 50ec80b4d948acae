#!/bin/sh
# Test scraper: fails (exit 1) while the file $GATE does not exist, then writes
# its expected keys like write_expected.sh.
set -eu
if [ ! -e "${GATE:?GATE is not set}" ]; then
    echo "gate closed" >&2
    exit 1
fi
exec "$(dirname "$0")/write_expected.sh"
