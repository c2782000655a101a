#!/usr/bin/env bash
# Text data at scale (docs/benchmarks.md, "Data at scale"): for each corpus size, a generated corpus (the embedded
# text's documents, shuffled and repeated until the size is reached), `omnilite data tokenize` into token shards,
# then 200 text-only steps of configs/small.json streaming them. Prints, per size: tokenize throughput (MB/s of
# text), shard bytes, time from the process start to step 1, and the trainer's peak resident memory.
#
#   scripts/bench_data.sh [GB ...]          default: 0.5 5
#   WORK=DIR    where corpora and shards go (default /tmp/omnilite-bench-data; 5 GB needs ~8 GB free)
#   STEPS=N     training steps (default 200); THREADS=N torch threads (default 2)
#   MODE=memory the path a user would otherwise take: train on the corpus .txt itself (read, tokenized and packed
#               in memory at start-up) instead of tokenizing it into shards first
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-build/omnilite}
WORK=${WORK:-/tmp/omnilite-bench-data}
STEPS=${STEPS:-200}
THREADS=${THREADS:-2}
SIZES=("$@")
[[ ${#SIZES[@]} -gt 0 ]] || SIZES=(0.5 5)
[[ -x $BIN ]] || { echo "bench_data: $BIN is missing; hint: run ./scripts/setup.sh first" >&2; exit 1; }
[[ -s data/generated/text/train.txt ]] || ./scripts/prepare_data.sh
command -v python3 > /dev/null || { echo "bench_data: needs python3 (apt-get install python3)" >&2; exit 1; }
mkdir -p "$WORK"

for gb in "${SIZES[@]}"; do
  corpus=$WORK/corpus-${gb}GB.txt shards=$WORK/shards-${gb}GB run=$WORK/run-${gb}GB
  if [[ ! -s $corpus ]]; then
    python3 - "$corpus" "$gb" <<'EOF'
import random, sys
out, gb = sys.argv[1], float(sys.argv[2])
docs = [d for d in open("data/generated/text/train.txt", encoding="utf-8").read().split("\n%\n") if d.strip()]
target, written, copy = int(gb * 1e9), 0, 0
with open(out + ".tmp", "w", encoding="utf-8") as f:
    while written < target:
        random.Random(copy).shuffle(docs)
        for d in docs:
            f.write(d + "\n%\n")
            written += len(d.encode("utf-8")) + 3
            if written >= target:
                break
        copy += 1
import os; os.replace(out + ".tmp", out)
EOF
  fi
  rm -rf "$run"
  echo "== ${gb} GB corpus: $(du -h "$corpus" | cut -f1)"
  source=$corpus
  if [[ ${MODE:-shards} != memory ]]; then
    rm -rf "$shards"
    "$BIN" data tokenize --input "$corpus" --out "$shards" --workers "$THREADS" 2> "$WORK/tokenize-${gb}GB.log" | tail -1
    grep -o "tokenize: .*" "$WORK/tokenize-${gb}GB.log" | tail -1
    echo "shards: $(du -sh "$shards" | cut -f1)"
    source=$shards
  fi
  start=$(date +%s.%N)
  "$BIN" train --config configs/small.json --out "$run" --set runtime.threads="$THREADS" --set runtime.blas_threads=1 \
    --set "data.text_train=[\"$source\"]" --set train.caption_batch_size=0 --set train.gen_batch_size=0 \
    --set train.steps="$STEPS" --set train.ckpt_every="$STEPS" --set train.valid_every="$STEPS" \
    2> "$WORK/train-${gb}GB.log"
  python3 - "$WORK/train-${gb}GB.log" "$start" <<'EOF'
import datetime, re, sys
log, start = open(sys.argv[1]).read(), float(sys.argv[2])
def at(line):
    ts = re.match(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+)\]", line).group(1)
    return datetime.datetime.strptime(ts, "%Y-%m-%d %H:%M:%S.%f").timestamp()
lines = log.splitlines()
first = next(l for l in lines if "step 1/" in l)
data = next(l for l in lines if "data: data.text_train" in l)
last = [l for l in lines if re.search(r"step \d+/\d+ \|", l)][-1]
print(data.split("] ", 2)[-1])
print("time to step 1: %.2f s (process start -> the step 1 line)" % (at(first) - start))
print("last step: " + last.split("] ", 2)[-1])
print(next(l for l in lines if "peak resident memory" in l).split("] ", 2)[-1])
EOF
done
