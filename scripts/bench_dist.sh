#!/usr/bin/env bash
# Data-parallel throughput on this machine: `omnilite train` in 1 process and in N processes (scripts/launch.sh,
# Gloo on loopback) with the same global batch, from the runs' metrics.jsonl: tokens/s of the whole job and the
# seconds per step each rank spends in the gradient all-reduce after backward (the part not hidden by the overlap).
#
#   ./scripts/bench_dist.sh                      # configs/small.json, 1 vs 2 processes, 30 steps each
#   CONFIG=configs/small.json NPROC=2 STEPS=20 EXTRA="--set train.bucket_mb=5" ./scripts/bench_dist.sh
#
# Threads: the config's runtime split; in a data-parallel run "all cores" (0) means the rank's share of them.
# The first 2 steps of each run are left out of the means (warm-up). Needs build/omnilite and the prepared data
# (./scripts/prepare_data.sh, and runs/quickstart-vqvae for the generation rows; without it they are switched off).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-build/omnilite}
CONFIG=${CONFIG:-configs/small.json}
NPROC=${NPROC:-2}
STEPS=${STEPS:-30}
OUT=${OUT:-runs/bench-dist}
[[ -x $BIN ]] || { echo "bench_dist.sh: $BIN not found; run ./scripts/setup.sh first" >&2; exit 1; }

# Per-rank batch sizes = the config's global ones / NPROC (text rows, caption and generation samples).
read -r text cap gen < <(grep -o '"\(batch_size\|caption_batch_size\|gen_batch_size\)": *[0-9]*' "$CONFIG" |
  awk -F': *' '{v[$1]=$2} END {print v["\"batch_size\""]+0, v["\"caption_batch_size\""]+0, v["\"gen_batch_size\""]+0}')
sets=()
[[ -d runs/quickstart-vqvae ]] || { gen=0; sets+=(--set train.gen_batch_size=0); }
for b in $text $cap $gen; do
  (( b % NPROC == 0 )) || { echo "bench_dist.sh: batch size $b of $CONFIG is not divisible by NPROC=$NPROC" >&2; exit 1; }
done

# mean of a metrics.jsonl field over steps > 2
mean() { { grep -o "\"$2\":[0-9.e+-]*" "$1" || true; } | tail -n +3 | awk -F: '{s+=$2; n++} END {if (n) printf "%.4g", s/n; else print "-"}'; }

echo "config $CONFIG, global batch: $text text rows + $cap caption + $gen generation samples per step, $STEPS steps"
printf "%-10s %-30s %14s %18s %22s\n" processes "per-rank batch (text/cap/gen)" "tokens/s" "all-reduce s/step" \
  "buckets started early"
for n in 1 "$NPROC"; do
  run=$OUT/np$n
  rm -rf "$run"
  mkdir -p "$OUT"
  args=(train --config "$CONFIG" --out "$run" --max-steps "$STEPS" "${sets[@]}"
        --set train.batch_size=$((text / n)) --set train.caption_batch_size=$((cap / n))
        --set train.gen_batch_size=$((gen / n)) --set train.ckpt_every=100000 --set train.valid_batches=1 ${EXTRA:-})
  if (( n == 1 )); then "$BIN" "${args[@]}" > "$run.log" 2>&1
  else scripts/launch.sh --nproc "$n" -- "$BIN" "${args[@]}" > "$run.log" 2>&1; fi
  tps=$(mean "$run/metrics.jsonl" tokens_per_s)
  ar=$(mean "$run/metrics.jsonl" allreduce_s)
  early=$(mean "$run/metrics.jsonl" allreduce_buckets_early)
  buckets=$(grep -o "in [0-9]* all-reduce buckets" "$run.log" | grep -o "[0-9]*" || echo "-")
  printf "%-10s %-30s %14s %18s %22s\n" "$n" "$((text / n))/$((cap / n))/$((gen / n))" "$tps" "$ar" "$early of $buckets"
done
