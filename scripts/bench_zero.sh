#!/usr/bin/env bash
# ZeRO on this machine: for 1 process and for N ranks (scripts/launch.sh, Gloo on loopback) at ZeRO stages 0-3, with
# the same global batch, what rank 0 measured it holds after a step (weights, gradients, AdamW moments: metrics
# mem_*_mib, counted from the storages alive), the most ZeRO-3 had gathered during a step (mem_gathered_peak_mib),
# the peak resident memory of the ranks, tokens/s of the job and the seconds per step in the gradient collectives;
# beside each, what `omnilite memory --world-size N --zero Z` predicts for the state.
#
#   ./scripts/bench_zero.sh                              # configs/small.json, 2 and 4 ranks, 6 steps each
#   CONFIG=configs/small.json NPROCS="2 3" STEPS=10 ./scripts/bench_zero.sh
#
# Needs build/omnilite and the prepared data (./scripts/prepare_data.sh and the tokenizer, as the quickstart makes
# them); generation rows are switched off (they need the quickstart's VQ-VAE). One thread per rank.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-build/omnilite}
CONFIG=${CONFIG:-configs/small.json}
NPROCS=${NPROCS:-2 4}
STEPS=${STEPS:-6}
OUT=${OUT:-runs/bench-zero}
[[ -x $BIN ]] || { echo "bench_zero.sh: $BIN not found; run ./scripts/setup.sh first" >&2; exit 1; }

read -r text cap < <(grep -o '"\(batch_size\|caption_batch_size\)": *[0-9]*' "$CONFIG" |
  awk -F': *' '{v[$1]=$2} END {print v["\"batch_size\""]+0, v["\"caption_batch_size\""]+0}')
# the value of a metrics.jsonl field at the last step, and its mean over steps > 2
last() { { grep -o "\"$2\":[0-9.e+-]*" "$1" || true; } | tail -1 | awk -F: '{printf "%.3f", $2}'; }
mean() { { grep -o "\"$2\":[0-9.e+-]*" "$1" || true; } | tail -n +3 | awk -F: '{s+=$2; n++} END {if (n) printf "%.4g", s/n; else print "-"}'; }

echo "config $CONFIG, global batch $text text rows + $cap caption samples per step, $STEPS steps, 1 thread per rank"
printf "%-6s %-5s %12s %10s %12s %14s %12s %10s %10s %12s\n" ranks zero "state MiB" "predicted" "weights MiB" \
  "grads+AdamW" "gathered pk" "RSS GiB" "tokens/s" "collect. s"
run_one() {
  local n=$1 z=$2 run=$OUT/np$1-z$2
  rm -rf "$run"
  mkdir -p "$OUT"
  local args=(train --config "$CONFIG" --out "$run" --max-steps "$STEPS" --set train.gen_batch_size=0
              --set train.batch_size=$((text / n)) --set train.caption_batch_size=$((cap / n)) --set train.zero=$z
              --set train.ckpt_every=100000 --set train.valid_batches=1 --set runtime.threads=1
              --set runtime.blas_threads=1)
  if (( n == 1 )); then "$BIN" "${args[@]}" > "$run.log" 2>&1
  else scripts/launch.sh --nproc "$n" -- "$BIN" "${args[@]}" > "$run.log" 2>&1; fi
  local m=$run/metrics.jsonl w g o
  w=$(last "$m" mem_weights_mib); g=$(last "$m" mem_grads_mib); o=$(last "$m" mem_optimizer_mib)
  local pred
  pred=$("$BIN" memory --config "$CONFIG" --world-size "$n" --zero "$z" --json 2>/dev/null |
         grep -o '"per_rank_state_bytes": *[0-9.e+]*' | awk -F': *' '{printf "%.3f", $2 / 1048576}')
  local rss
  rss=$(grep -o "peak resident memory [0-9.]* GiB" "$run.log" | awk '{print $4}' | sort -g | tail -1)
  printf "%-6s %-5s %12.3f %10s %12s %14.3f %12s %10s %10s %12s\n" "$n" "$z" "$(awk "BEGIN {print $w + $g + $o}")" "$pred" \
    "$w" "$(awk "BEGIN {print $g + $o}")" "$(last "$m" mem_gathered_peak_mib)" "${rss:--}" "$(mean "$m" tokens_per_s)" \
    "$(mean "$m" allreduce_s)"
}
run_one 1 0
for n in $NPROCS; do
  for b in $text $cap; do
    (( b % n == 0 )) || { echo "bench_zero.sh: batch size $b of $CONFIG is not divisible by $n" >&2; exit 1; }
  done
  for z in 0 1 2 3; do run_one "$n" "$z"; done
done
