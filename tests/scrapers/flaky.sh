#!/bin/sh
# Test scraper: fails (exit 1) on attempts before $SUCCEED_AT (default 3), then
# writes its expected keys like write_expected.sh.
set -eu
if [ "${ADCE_ATTEMPT:-1}" -lt "${SUCCEED_AT:-3}" ]; then
    echo "flaky: attempt ${ADCE_ATTEMPT:-1} fails" >&2
    exit 1
fi
exec "$(dirname "$0")/write_expected.sh"
