#!/usr/bin/env bash
# Installs OMNI-LITE's Debian 12 dependencies (when missing) and builds Release into build/ (build/omnilite).
# Usage: ./scripts/setup.sh            (as root, or with sudo available)
# Env:   BUILD_DIR (default build), BUILD_TYPE (default Release), JOBS (default: all cores)
set -euo pipefail
cd "$(dirname "$0")/.."

PKGS=(libtorch-dev nlohmann-json3-dev libopencv-dev libspdlog-dev catch2 libcxxopts-dev libsentencepiece-dev
      libgloo-dev libopenblas0-pthread ccache cmake g++ make pkg-config time)

source scripts/lib/packages.sh
ensure_packages "${PKGS[@]}"

# Debian's LibTorch calls the system BLAS through libblas.so.3; OpenBLAS must be the selected alternative, or fp32
# matmuls run on the reference BLAS (about 19x slower).
blas=$(readlink -f /usr/lib/x86_64-linux-gnu/libblas.so.3 2>/dev/null || true)
case "$blas" in
  *openblas*) echo "setup: BLAS is $blas" ;;
  *) echo "setup: warning: libblas.so.3 resolves to '$blas', not OpenBLAS; matmuls will be slow" >&2 ;;
esac

BUILD_DIR=${BUILD_DIR:-build}
JOBS=${JOBS:-$(nproc)}
cmake -S . -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE="${BUILD_TYPE:-Release}" > "$BUILD_DIR.cmake.log" 2>&1 ||
  { cat "$BUILD_DIR.cmake.log"; exit 1; }
cmake --build "$BUILD_DIR" -j "$JOBS"
echo "setup: built $BUILD_DIR/omnilite"
