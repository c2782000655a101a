#!/usr/bin/env bash
# One call on the GPU machine (under 10 minutes): configure against the installed PyTorch's LibTorch (CUDA, sm_90)
# without OpenCV (the machine has none), build with all cores, run the [cuda] tests and the GPU figures of
# docs/benchmarks.md, most important first: QLoRA peak memory, bf16 MFU at sequence 2048, NF4 decode against the
# bandwidth bound. Every step has its own time limit and the script stops starting new ones after CHECK_BUDGET_S
# (default 540 s), so the summary table is always printed last. Writes to $OUT: check.log (everything),
# results.jsonl (one JSON object per figure) and summary.md (the table; `python3 scripts/device/summary.py
# results.jsonl` rebuilds it).
# CHECK_BUILD_DIR=DIR CHECK_SKIP_BUILD=1 reuse a finished build (to try the script's flow on a machine without a GPU).
# Needs .deps/prefix from scripts/device/fetch_deps.sh and the prepared data carried along with the working tree:
#   carry [".deps/prefix", "data/generated/text", "data/generated/tokenizer.model"]   (under 64 MiB together)
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/omnilite-check}
mkdir -p "$OUT"
log="$OUT/check.log"
results="$OUT/results.jsonl"
: > "$results"
budget=${CHECK_BUDGET_S:-540}
start=$SECONDS
BD=${CHECK_BUILD_DIR:-build-cuda}
B=./$BD/omnilite
scratch=${TMPDIR:-/tmp}/omnilite-check-work
mkdir -p "$scratch"

rm -rf "$OUT/steps" && mkdir -p "$OUT/steps"
# step NAME LIMIT_S CMD...: runs CMD with a time limit unless the budget is spent; its output goes to
# $OUT/steps/NAME.log and the log.
step() {
  local name=$1 limit=$2; shift 2
  local left=$((budget - (SECONDS - start)))
  if ((left < 20)); then
    echo "== $name: skipped, budget spent ($((SECONDS - start)) s of $budget)" | tee -a "$log"
    echo "{\"step\": \"$name\", \"skipped\": \"budget\"}" >> "$results"
    return 1
  fi
  ((limit > left)) && limit=$left
  echo "== $name (limit ${limit} s, at $((SECONDS - start)) s)" >> "$log"
  timeout "$limit" "$@" > "$OUT/steps/$name.log" 2>&1
  local rc=$?
  cat "$OUT/steps/$name.log" >> "$log"
  ((rc == 124)) && echo "== $name: timed out after ${limit} s" >> "$log"
  return $rc
}
# record NAME RC: appends step NAME's result to results.jsonl: its last JSON line tagged with NAME, or, when it
# printed none, its exit status and last line.
record() {
  [[ -f $OUT/steps/$1.log ]] || return 0  # skipped: already in results.jsonl
  local line
  line=$(grep -E '^\{' "$OUT/steps/$1.log" 2>/dev/null | tail -1)
  python3 - "$1" "$2" "$line" "$(tail -n 1 "$OUT/steps/$1.log" 2>/dev/null)" >> "$results" <<'PY'
import json, sys
name, rc, line, last = sys.argv[1:5]
d = json.loads(line) if line else {"error": last[-200:]}
d.update(step=name, rc=int(rc))
print(json.dumps(d))
PY
}

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
} >> "$log" 2>&1
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
echo "{\"step\": \"machine\", \"gpu\": \"$gpu\", \"nproc\": $(nproc)}" >> "$results"

# CMake's CUDA search needs nvcc; a PyTorch-only image often has it outside PATH.
if ! command -v nvcc >/dev/null; then
  for d in /usr/local/cuda/bin /usr/local/cuda-*/bin; do [[ -x $d/nvcc ]] && export PATH="$d:$PATH" && break; done
fi
torch_prefix=$(python3 -c 'import torch; print(torch.utils.cmake_prefix_path)' 2>> "$log")
export TORCH_CUDA_ARCH_LIST=9.0
t0=$SECONDS
if [[ -n ${CHECK_SKIP_BUILD:-} ]]; then
  build_cmd=(true)
else
  step configure 120 cmake -S . -B "$BD" -DCMAKE_BUILD_TYPE=Release -DOMNILITE_USE_CCACHE=OFF \
    -DOMNILITE_WITH_OPENCV=OFF -DCMAKE_PREFIX_PATH="$torch_prefix;$PWD/.deps/prefix/usr" -DCMAKE_CUDA_ARCHITECTURES=90
  build_cmd=(cmake --build "$BD" -j "$(nproc)" --target omnilite_cli omnilite_tests)
fi
step build 300 "${build_cmd[@]}"
build_rc=$?
echo "{\"step\": \"build\", \"rc\": $build_rc, \"seconds\": $((SECONDS - t0))}" >> "$results"
if ((build_rc != 0)); then
  grep -E "error|Error" "$log" | head -30
  python3 scripts/device/summary.py "$results" | tee "$OUT/summary.md"
  exit 1
fi

# [cuda] tests: parity with the CPU, a training step, NF4, KV cache (they skip with a reason without a GPU).
step cuda-tests 120 "./$BD/omnilite_tests" "[cuda]" -r compact
rc=$?
echo "{\"step\": \"cuda-tests\", \"rc\": $rc, \"summary\": \"$(grep -E '^(Passed|Failed)' "$OUT/steps/cuda-tests.log" | tail -1)\"}" >> "$results"

# QLoRA of the full model from an init checkpoint, batch 1, activation checkpointing: peak allocated CUDA memory.
step init 120 $B init --config configs/omni-lite.json --out "$scratch/init" --dtype bf16 --threads "$(nproc)"
for seq in 512 2048; do
  rm -rf "$scratch/qlora-$seq"
  step "qlora-$seq" 150 $B train --config configs/qlora-omni-lite.json --base "$scratch/init" --out "$scratch/qlora-$seq" \
    --max-steps 4 --set runtime.device=cuda --set runtime.dtype=bf16 --set train.seq_len=$seq
  rc=$?
  peak=$(grep -oE "peak allocated CUDA memory [0-9.]+" "$OUT/steps/qlora-$seq.log" 2>/dev/null | tail -1 | awk '{print $NF}')
  tps=$(tail -1 "$scratch/qlora-$seq/metrics.jsonl" 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin).get("tokens_per_s", "null"))' 2>/dev/null)
  echo "{\"step\": \"qlora-$seq\", \"rc\": $rc, \"seq\": $seq, \"peak_allocated_gib\": ${peak:-null}, \"tokens_per_second\": ${tps:-null}}" >> "$results"
done

# bf16 forward + backward of the full model at sequence 2048: MFU against the bf16 GEMM rate of the same run.
for batch in 1 4; do
  step "bf16-step-b$batch" 120 $B bench forward --config configs/omni-lite.json --device cuda --dtype bf16 --backward \
    --batch $batch --seq 2048 --steps 3 --json
  record "bf16-step-b$batch" $?
done

# Batch-1 decoding with NF4 and bf16 weights against the bandwidth bound measured in the same run.
for w in nf4 bf16; do
  step "decode-$w" 120 $B bench decode --config configs/omni-lite.json --device cuda --weights $w --prompt 512 \
    --new-tokens 64 --json
  record "decode-$w" $?
done
step matmul-fp32 60 $B bench matmul --device cuda --size 8192 --steps 20 --json
record matmul-fp32 $?
# The bf16 step of batch 1 with the per-expert loop instead of the grouped GEMM that auto picks on CUDA in bf16.
step bf16-step-b1-loop 120 $B bench forward --config configs/omni-lite.json --device cuda --dtype bf16 --backward \
  --batch 1 --seq 2048 --steps 3 --moe-dispatch loop --json
record bf16-step-b1-loop $?

echo "== done at $((SECONDS - start)) s" >> "$log"
python3 scripts/device/summary.py "$results" | tee "$OUT/summary.md"
