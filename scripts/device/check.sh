#!/usr/bin/env bash
# One call on the GPU machine (about 10 minutes): configure against the installed PyTorch's LibTorch (CUDA, sm_90)
# without OpenCV (the machine has none), build with all cores, run the tests (the [cuda] ones run there, they skip
# elsewhere) and the GPU figures of docs/benchmarks.md; the full log goes to $OUT/check.log, a short table last.
# Needs .deps/prefix from scripts/device/fetch_deps.sh and the prepared data (./scripts/prepare_data.sh and the
# tokenizer) carried along with the working tree: carry [".deps/prefix", "data/generated/text",
# "data/generated/tokenizer.model"] (under 64 MiB together). Not yet run on a GPU.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/omnilite-check}
mkdir -p "$OUT"
log="$OUT/check.log"
B=./build-cuda/omnilite
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  torch_prefix=$(python3 -c 'import torch; print(torch.utils.cmake_prefix_path)')
  python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
  export TORCH_CUDA_ARCH_LIST=9.0
  cmake -S . -B build-cuda -DCMAKE_BUILD_TYPE=Release -DOMNILITE_USE_CCACHE=OFF -DOMNILITE_WITH_OPENCV=OFF \
    -DCMAKE_PREFIX_PATH="$torch_prefix;$PWD/.deps/prefix/usr" -DCMAKE_CUDA_ARCHITECTURES=90 2>&1 | tail -3
  time cmake --build build-cuda -j "$(nproc)" 2>&1 | grep -E "error|warning: |Built target" | head -60
  ctest --test-dir build-cuda --output-on-failure -j 8 -E "a tiny run learns" 2>&1 | tail -15
  ./build-cuda/omnilite_tests "[cuda]" -s 2>&1 | grep -E "err|passed|failed|skipped" | head -20
  echo "== decode, full model, NF4 / bf16 weights"
  for w in nf4 bf16; do
    timeout 120 $B bench decode --config configs/omni-lite.json --device cuda --weights $w --prompt 512 --new-tokens 64 --json
  done
  echo "== bf16 matmul rate and a bf16 training-style step of the full model at sequence 2048"
  $B bench matmul --device cuda --size 8192 --steps 20 --json
  $B bench matmul --device cuda --dtype bf16 --size 8192 --steps 20 --json
  timeout 180 $B bench forward --config configs/omni-lite.json --device cuda --dtype bf16 --backward --batch 1 --seq 2048 \
    --steps 3 --json
  echo "== QLoRA of the full model from an init checkpoint, batch 1, activation checkpointing"
  timeout 120 $B init --config configs/omni-lite.json --out /tmp/omnilite-init --dtype bf16 --threads "$(nproc)"
  for seq in 512 2048; do
    timeout 150 $B train --config configs/qlora-omni-lite.json --base /tmp/omnilite-init --out /tmp/omnilite-qlora-$seq \
      --max-steps 3 --set runtime.device=cuda --set runtime.dtype=bf16 --set train.seq_len=$seq 2>&1 |
      grep -E "step 3/3|peak|error"
  done
} > "$log" 2>&1
tail -40 "$log"
