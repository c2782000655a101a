#!/usr/bin/env bash
# Builds the whole project and its test suite with AddressSanitizer + UndefinedBehaviorSanitizer (GCC) into
# build-asan/ and runs the suite (ctest). Any sanitizer report fails its test. LibTorch, OpenBLAS and SentencePiece
# are not instrumented: the only suppressions are in tests/sanitizers/*.supp, each with its reason
# (docs/reliability.md). Usage: ./scripts/check_sanitizers.sh [ctest args, e.g. -R safetensors]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/packages.sh
ensure_packages libtorch-dev nlohmann-json3-dev libopencv-dev libspdlog-dev catch2 libcxxopts-dev \
  libsentencepiece-dev libgloo-dev libopenblas0-pthread ccache cmake g++ make pkg-config
B=build-asan
cmake -S . -B "$B" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DOMNILITE_SANITIZE=address,undefined > "$B.cmake.log" 2>&1 ||
  { cat "$B.cmake.log"; exit 1; }
cmake --build "$B" -j "${JOBS:-$(nproc)}"
S=$PWD/tests/sanitizers
# detect_leaks: on, with the suppressions above. detect_odr_violation=0: LibTorch defines symbols that its headers
# also inline into our objects. protect_shadow_gap=0 is a precaution for the uninstrumented libraries, not shown to
# be needed (the recorded run used it).
export ASAN_OPTIONS="detect_leaks=1:halt_on_error=1:abort_on_error=1:detect_odr_violation=0:protect_shadow_gap=0"
export LSAN_OPTIONS="suppressions=$S/lsan.supp:print_suppressions=0"
export UBSAN_OPTIONS="suppressions=$S/ubsan.supp:print_stacktrace=1:halt_on_error=1"
ctest --test-dir "$B" --output-on-failure -j "${JOBS:-$(nproc)}" "$@"
echo "check_sanitizers: the suite passed under AddressSanitizer + UndefinedBehaviorSanitizer"
