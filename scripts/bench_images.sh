#!/usr/bin/env bash
# Image-caption data at scale (docs/benchmarks.md, "Data at scale"): Fashion-MNIST's 60,000 training images
# written as WebDataset tar shards REPEAT times over (`omnilite data webdataset --repeat`), then, for each set:
#   - the loader alone (`omnilite bench loader`): images/s that train.loader_threads threads sustain, and the time to
#     index the shards;
#   - the image-caption stage of configs/small.json (caption rows only, batch 32, text and generation off) for STEPS
#     steps streaming the shards: mean data_wait_frac over the steps, and the trainer's peak resident memory;
# and the same stage on the in-memory IDX source, the path a user would otherwise take.
#
#   scripts/bench_images.sh [REPEAT ...]     default: 2 4 (120,000 and 240,000 images)
#   WORK=DIR   where shards and runs go (default /tmp/omnilite-bench-images; ~5 KB of tar per image)
#   STEPS=N    training steps (default 200); THREADS=N torch threads (default 1, so that the loader thread has the
#              other core); LOADER=N loader threads (default 1)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-build/omnilite}
WORK=${WORK:-/tmp/omnilite-bench-images}
STEPS=${STEPS:-200}
THREADS=${THREADS:-1}
LOADER=${LOADER:-1}
REPEATS=("$@")
[[ ${#REPEATS[@]} -gt 0 ]] || REPEATS=(2 4)
[[ -x $BIN ]] || { echo "bench_images: $BIN is missing; hint: run ./scripts/setup.sh first" >&2; exit 1; }
[[ -s data/generated/tokenizer.model ]] || { source scripts/lib/data.sh; ensure_data_and_tokenizer; }
command -v python3 > /dev/null || { echo "bench_images: needs python3 (apt-get install python3)" >&2; exit 1; }
mkdir -p "$WORK"
common=(--set runtime.threads="$THREADS" --set runtime.blas_threads=1 --set train.loader_threads="$LOADER"
        --set train.batch_size=0 --set train.gen_batch_size=0 --set train.caption_batch_size=32)

stage() {  # stage NAME IMAGE_SOURCE: STEPS caption steps, then mean data_wait_frac and peak RSS
  local run=$WORK/run-$1
  rm -rf "$run"
  "$BIN" train --config configs/small.json --out "$run" "${common[@]}" --set "data.image_train=[\"$2\"]" \
    --set train.steps="$STEPS" --set train.ckpt_every="$STEPS" --set train.valid_every="$STEPS" \
    2> "$WORK/train-$1.log"
  python3 - "$run/metrics.jsonl" "$WORK/train-$1.log" <<'EOF'
import json, sys
m = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
m = [r for r in m if "data_wait_frac" in r]
w = [r["data_wait_frac"] for r in m[1:]]  # step 1 waits for the first batch
print("  %d steps: mean data_wait_frac %.4f (max %.4f), %.0f tokens/s at the end, data_bad_images %d" % (
    len(m), sum(w) / len(w), max(w), m[-1]["tokens_per_s"], sum(r.get("data_bad_images", 0) for r in m)))
print("  " + next(l for l in open(sys.argv[2]) if "peak resident memory" in l).split("] ", 2)[-1].strip())
EOF
}

for r in "${REPEATS[@]}"; do
  shards=$WORK/shards-x$r
  if [[ ! -s $shards/shard-000000.tar ]]; then
    rm -rf "$shards"
    "$BIN" data webdataset --input data/generated/fashion-mnist/train --out "$shards" --repeat "$r" 2>&1 | tail -1
  fi
  echo "== $(( 60000 * r )) images in $(ls "$shards" | wc -l) shards, $(du -sh "$shards" | cut -f1)"
  "$BIN" bench loader --config configs/small.json "${common[@]}" --set "data.image_train=[\"$shards\"]" \
    --steps 400 --json 2> /dev/null
  stage "x$r" "$shards"
done
echo "== in memory: data/generated/fashion-mnist/train (IDX, 60,000 images decoded at start-up)"
"$BIN" bench loader --config configs/small.json "${common[@]}" --steps 400 --json 2> /dev/null
stage memory data/generated/fashion-mnist/train
