#!/usr/bin/env bash
# Join every part of a sweep: OUT/part-* -> OUT/merged (ferrolens merge checks that they are
# all N shards of one sweep, once each, and names any that is missing).
set -euo pipefail
: "${OUT:?merge.sh: set OUT to the sweep folder}"
FERROLENS="${FERROLENS:-ferrolens}"
shopt -s nullglob
parts=("$OUT"/part-*)
if [ ${#parts[@]} -eq 0 ]; then
  echo "merge.sh: no parts in $OUT (expected $OUT/part-0 ...)" >&2
  exit 2
fi
exec "$FERROLENS" merge "${parts[@]}" --out "${MERGED:-$OUT/merged}"
