#!/usr/bin/env bash
# Decoding and prompt speed of the full-size model in llama.cpp beside OMNI-LITE, in one run, on the same machine,
# threads and prompt length: a benchmark, not a test (docs/benchmarks.md). For each pair of formats:
#   nf4:  OMNI-LITE's NF4 (QLoRA's base)            against llama.cpp's q4_0 (the same 4-bit size class)
#   bf16: OMNI-LITE's bf16 weights                  against llama.cpp's bf16
#   1. runs/init-bf16: the full-size random checkpoint (`omnilite init`), made if missing (~1 min, 4.6 GB)
#   2. exports/init-TYPE.gguf: its text backbone (`omnilite export --format gguf --type TYPE`), made if missing
#   3. llama-bench (built by scripts/check_interop.sh) -p PROMPT -n NEW -d PROMPT -t THREADS -r LLAMA_REPS (default
#      3): prompt tokens/s, and decode tokens/s after a PROMPT-token context
#   4. omnilite bench decode --weights W --prompt PROMPT --new-tokens NEW with the same threads in all (THREADS =
#      LibTorch + OpenBLAS threads: OMNI_THREADS LibTorch threads, default 1, and the rest for OpenBLAS)
#      nf4 runs once per NF4_ACTIVATIONS (default "fp32 int16": the exact kernel, then 16-bit inputs, quant/nf4.h)
# Prints one JSON line per tool and format, then the ratios OMNI-LITE / llama.cpp (above 1: OMNI-LITE is faster).
# Usage: scripts/bench_vs_llamacpp.sh [THREADS] [PROMPT] [NEW] [FORMATS, default "nf4 bf16"]
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${1:-$(nproc)}
prompt=${2:-512}
new=${3:-32}
formats=${4:-nf4 bf16}
reps=${LLAMA_REPS:-3}
bench=.venv-interop/llama.cpp/build/bin/llama-bench
if [[ ! -x $bench ]]; then
  echo "bench_vs_llamacpp: $bench is missing; run ./scripts/check_interop.sh first (it builds llama.cpp)" >&2
  exit 2
fi
omni_threads=${OMNI_THREADS:-1}
omni_blas=${OMNI_BLAS_THREADS:-$((threads - omni_threads > 0 ? threads - omni_threads : 1))}
[[ -f runs/init-bf16/model.safetensors ]] ||
  build/omnilite init --config configs/omni-lite.json --out runs/init-bf16
mkdir -p exports
for fmt in $formats; do
  case $fmt in
    nf4) type=q4_0 ;;
    bf16) type=bf16 ;;
    *) echo "bench_vs_llamacpp: format \"$fmt\": expected nf4 or bf16" >&2; exit 2 ;;
  esac
  gguf=exports/init-$type.gguf
  [[ -f $gguf ]] || build/omnilite export --checkpoint runs/init-bf16 --format gguf --type "$type" --out "$gguf"
  llama=$("$bench" -m "$gguf" -p "$prompt" -n "$new" -d "$prompt" -t "$threads" -r "$reps" -o json)
  acts=fp32
  [[ $fmt == nf4 ]] && acts=${NF4_ACTIVATIONS:-fp32 int16}
  for act in $acts; do
  omni=$(build/omnilite bench decode --config configs/omni-lite.json --weights "$fmt" --threads "$omni_threads" \
           --blas-threads "$omni_blas" --prompt "$prompt" --new-tokens "$new" --nf4-activations "$act" --json \
           2> /dev/null | tail -1)
  python3 - "$llama" "$omni" "$threads" "$type" <<'PY'
import json, sys
llama, omni, threads, gtype = json.loads(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
pp = next(r for r in llama if r["n_prompt"] > 0)["avg_ts"]
tg = next(r for r in llama if r["n_gen"] > 0)["avg_ts"]
print(json.dumps({"tool": "llama.cpp", "weights": gtype, "threads": threads, "prompt_tokens_per_second": pp,
                  "decode_tokens_per_second": tg, "build": llama[0].get("build_commit")}))
keys = ["weights", "nf4_activations", "decode_path", "threads", "blas_threads", "prompt_tokens_per_second", "decode_tokens_per_second",
        "bandwidth_bound_tokens_per_second", "read_bandwidth_gb_per_s", "weight_mb_per_token", "peak_rss_gib"]
print(json.dumps({"tool": "omnilite", **{k: omni[k] for k in keys if k in omni}}))
print(f"{omni['weights']} ({omni['nf4_activations']} inputs) vs {gtype}: decode omnilite / llama.cpp = {omni['decode_tokens_per_second'] / tg:.2f}; "
      f"prompt omnilite / llama.cpp = {omni['prompt_tokens_per_second'] / pp:.2f}")
PY
  done
done
