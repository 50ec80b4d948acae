#!/bin/sh
# Test scraper: always fails with exit code 3 and a recognizable stderr line.
echo "fetching something that will not work"
echo "something broke: upstream 503" >&2
exit 3
