#!/bin/sh
# Test scraper: prints $LINES lines (default 20000) as fast as it can, then
# writes its expected keys like write_expected.sh.
set -eu
seq 1 "${LINES:-20000}"
exec "$(dirname "$0")/write_expected.sh"
