#!/usr/bin/env bash
# The QLoRA memory benchmark of the full 2.46B-parameter model (docs/benchmarks.md, "QLoRA"):
#   1. omnilite init: a full-size random bf16 checkpoint, written piece by piece (once; kept in $INIT)
#   2. omnilite memory: the estimate for configs/qlora-omni-lite.json
#   3. omnilite train --config configs/qlora-omni-lite.json --base $INIT --max-steps 2 under /usr/bin/time -v:
#      peak resident memory of the process, seconds per step (metrics.jsonl)
#   4. omnilite bench nf4: the NF4 expert projection against fp32
# Runs on the embedded data, so it works on a fresh machine after ./scripts/setup.sh. Needs ~5 GB of disk for $INIT.
# Env: INIT (default runs/init-bf16), OUT (default runs/qlora-bench), CONFIG (default configs/qlora-omni-lite.json),
#      THREADS / BLAS_THREADS (default: the config's runtime.threads / runtime.blas_threads, 1 / all cores),
#      SEQ (tokens per row, default the config's train.seq_len: 512), STEPS (default 2).
# Long context: SEQ=4096 STEPS=1 ./scripts/bench_qlora.sh (a step of 4096 tokens takes minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
INIT=${INIT:-runs/init-bf16}
OUT=${OUT:-runs/qlora-bench}
CONFIG=${CONFIG:-configs/qlora-omni-lite.json}
overrides=()
STEPS=${STEPS:-2}
[[ -n ${SEQ:-} ]] && overrides+=(--set train.seq_len="$SEQ")
[[ -n ${THREADS:-} ]] && overrides+=(--set runtime.threads="$THREADS")
[[ -n ${BLAS_THREADS:-} ]] && overrides+=(--set runtime.blas_threads="$BLAS_THREADS")
[[ -x build/omnilite ]] || { echo "bench_qlora: build/omnilite is missing; run ./scripts/setup.sh first" >&2; exit 1; }
[[ -x /usr/bin/time ]] || { echo "bench_qlora: /usr/bin/time is missing; run ./scripts/setup.sh (package time)" >&2; exit 1; }
source scripts/lib/data.sh
ensure_data_and_tokenizer

if [[ ! -s $INIT/model.safetensors ]]; then
  /usr/bin/time -v ./build/omnilite init --config configs/omni-lite.json --out "$INIT" --dtype bf16 2> "$INIT.time.log" ||
    { cat "$INIT.time.log" >&2; exit 1; }
  echo "bench_qlora: init peak RSS $(awk '/Maximum resident/ {printf "%.2f GiB", $6/1048576}' "$INIT.time.log")"
fi
./build/omnilite memory --config "$CONFIG" "${overrides[@]}"
rm -rf "$OUT"
mkdir -p "$(dirname "$OUT")"
/usr/bin/time -v ./build/omnilite train --config "$CONFIG" --base "$INIT" --out "$OUT" --max-steps "$STEPS" \
  "${overrides[@]}" --set train.valid_batches=1 \
  2> "$OUT.time.log" || { cat "$OUT.time.log" >&2; exit 1; }
grep -E "\[info\] (qlora|step|done)" "$OUT.time.log" || true
# json_field FILE KEY: the first numeric value of "KEY" in FILE (the files are one-line JSON objects per line).
json_field() { grep -o "\"$2\": *[-0-9.e+]*" "$1" | head -1 | sed 's/.*: *//'; }
peak_kb=$(awk '/Maximum resident/ {print $6}' "$OUT.time.log")
./build/omnilite memory --config "$CONFIG" "${overrides[@]}" --json | tr -d '\n' > "$OUT.memory.json"
./build/omnilite bench nf4 --steps 30 --json > "$OUT.nf4.json"
echo
seq=$(json_field "$OUT.memory.json" tokens_per_micro_batch)
echo "QLoRA benchmark ($CONFIG: full model, seq $seq, batch 1, activation checkpointing; ${overrides[*]:-config threads})"
awk -v kb="$peak_kb" -v est="$(json_field "$OUT.memory.json" total_checkpointed)" 'BEGIN {
  printf "  peak resident memory (/usr/bin/time -v): %.2f GiB   estimate: %.2f GiB   goal: <= 6 GiB\n", kb / 1048576, est / 2^30 }'
while read -r line; do
  step=$(echo "$line" | grep -o '"step":[0-9]*' | sed 's/.*://')
  tps=$(echo "$line" | grep -o '"tokens_per_s":[-0-9.e+]*' | sed 's/.*://')
  awk -v s="$step" -v t="$tps" -v n="$seq" 'BEGIN { printf "  step %s: %.1f s (%d tokens)\n", s, n / t, n }'
done < "$OUT/metrics.jsonl"
awk -v a="$(json_field "$OUT.nf4.json" nf4_ms)" -v b="$(json_field "$OUT.nf4.json" fp32_ms)" 'BEGIN {
  printf "  NF4 expert projection 512 x 2048 -> 768: %.2f ms vs fp32 %.2f ms (%.2fx fp32 speed, goal >= 0.6)\n", a, b, b / a }'
