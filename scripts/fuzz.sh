#!/usr/bin/env bash
# Builds the libFuzzer targets (tests/fuzz/, clang with AddressSanitizer + UndefinedBehaviorSanitizer) into
# build-fuzz/ and runs each for SECONDS (default 60), one after another, on one core, from the seed corpora in
# tests/fuzz/corpus/<target>/ (new inputs go to build-fuzz/corpus/<target>/; crashes to build-fuzz/crash-<target>-*).
# Usage: ./scripts/fuzz.sh [SECONDS] [TARGET ...]     (targets: safetensors config idx_pnm captions tokenizer documents)
# Prints one line per target: executions, corpus size, and the result. Exits non-zero when a target found a crash.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_TARGET=${1:-60}
shift || true
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(safetensors config idx_pnm captions tokenizer documents)

source scripts/lib/packages.sh
ensure_packages clang libclang-rt-14-dev libtorch-dev nlohmann-json3-dev libopencv-dev libspdlog-dev \
  libsentencepiece-dev cmake make ccache

B=build-fuzz
if [ ! -f "$B/CMakeCache.txt" ]; then
  CXX=clang++ cmake -S tests/fuzz -B "$B" -DCMAKE_BUILD_TYPE=RelWithDebInfo > "$B.cmake.log" 2>&1 ||
    { cat "$B.cmake.log"; exit 1; }
fi
cmake --build "$B" -j "${JOBS:-$(nproc)}"

# LibTorch is not instrumented: its one-time allocations at start-up are not leaks of ours (docs/reliability.md).
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0:allocator_may_return_null=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
export OMNILITE_SPM_DEEPBIND=0  # AddressSanitizer refuses dlopen(RTLD_DEEPBIND); the tokenizer target has no LibTorch
export OMNILITE_LOG_LEVEL=${OMNILITE_LOG_LEVEL:-off}
status=0
printf '%-12s %10s %12s %8s  %s\n' target seconds executions corpus result
for t in "${TARGETS[@]}"; do
  mkdir -p "$B/corpus/$t"
  log="$B/fuzz-$t.log"
  rc=0
  # -rss_limit_mb: a reader that allocates from a header it did not check fails here; -timeout: a hang fails.
  "$B/fuzz_$t" "$B/corpus/$t" "tests/fuzz/corpus/$t" -max_total_time="$SECONDS_PER_TARGET" -rss_limit_mb=4096 \
    -timeout=10 -max_len=65536 -artifact_prefix="$B/crash-$t-" -print_final_stats=1 > "$log" 2>&1 || rc=$?
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo "?")
  files=$(find "$B/corpus/$t" -type f | wc -l)
  if [ "$rc" -eq 0 ]; then result=clean; else result="FOUND (exit $rc, see $log)"; status=1; fi
  printf '%-12s %10s %12s %8s  %s\n' "$t" "$SECONDS_PER_TARGET" "$execs" "$files" "$result"
done
exit $status
