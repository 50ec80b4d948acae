#!/bin/sh
# Test scraper: claims success (exit 0) without writing any object.
echo "nothing to write today"
exit 0
