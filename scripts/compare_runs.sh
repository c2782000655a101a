#!/usr/bin/env bash
# Two (or more) runs side by side: their eval.json numbers in a table and their training curves in one PNG.
#   ./scripts/compare_runs.sh runs/a runs/b [OUT.png]
# Run `omnilite eval --checkpoint RUN` on each first for the table; the curves come from each run's metrics.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 2 ]; then
  echo "usage: $0 RUN_A RUN_B [OUT.png]   (run folders; writes OUT.png, default compare.png)" >&2
  exit 2
fi
out=compare.png
runs=("$1" "$2")
if [ $# -ge 3 ]; then out=$3; fi
exec build/omnilite compare --runs "${runs[0]},${runs[1]}" --out "$out"
