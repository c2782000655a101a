#!/usr/bin/env bash
# One call on the GPU machine: configure against the installed PyTorch's LibTorch (CUDA, sm_90), build with all
# cores, run the tests and a few CUDA benchmarks; the full log goes to $OUT/check.log, a short summary last.
# Needs .deps/prefix from scripts/device/fetch_deps.sh (carried along with the working tree).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/omnilite-check}
mkdir -p "$OUT"
log="$OUT/check.log"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  torch_prefix=$(python3 -c 'import torch; print(torch.utils.cmake_prefix_path)')
  python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
  export TORCH_CUDA_ARCH_LIST=9.0
  cmake -S . -B build-cuda -DCMAKE_BUILD_TYPE=Release -DOMNILITE_USE_CCACHE=OFF \
    -DCMAKE_PREFIX_PATH="$torch_prefix;$PWD/.deps/prefix/usr" -DCMAKE_CUDA_ARCHITECTURES=90 2>&1 | tail -3
  time cmake --build build-cuda -j "$(nproc)" 2>&1 | grep -E "error|warning: |Built target" | head -60
  ctest --test-dir build-cuda --output-on-failure -j 8 -E "a tiny run learns" 2>&1 | tail -15
  ctest --test-dir build-cuda --output-on-failure -R "a tiny run learns" 2>&1 | tail -3
  ./build-cuda/omnilite_tests "[cuda]" -s 2>&1 | grep -E "err|passed|failed|skipped" | head -20
  for dt in fp32 bf16; do
    ./build-cuda/omnilite bench forward --config configs/small.json --device cuda --dtype $dt --backward \
      --batch 8 --seq 512 --steps 10 --json
  done
  ./build-cuda/omnilite bench forward --config configs/omni-lite.json --device cuda --dtype bf16 --backward \
    --batch 1 --seq 512 --steps 3 --json
  ./build-cuda/omnilite bench matmul --device cuda --size 8192 --steps 20 --json
} > "$log" 2>&1
tail -40 "$log"
