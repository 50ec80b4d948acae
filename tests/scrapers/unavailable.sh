#!/bin/sh
# Test scraper: the data does not exist yet (EX_UNAVAILABLE), and journals each
# run to $JOURNAL.
set -eu
printf 'run %s\n' "${ADCE_ATTEMPT:-?}" >>"${JOURNAL:?JOURNAL is not set}"
echo "game not played yet" >&2
exit 69
