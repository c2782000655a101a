#!/usr/bin/env bash
# Decoding speed of the full-size model in llama.cpp (q4_0 GGUF) beside OMNI-LITE (NF4), in one run, on the same
# machine, threads and prompt length: a benchmark, not a test (docs/benchmarks.md).
#   1. runs/init-bf16: the full-size random checkpoint (`omnilite init`), made if missing (~1 min, 4.6 GB)
#   2. exports/init-q4_0.gguf: its text backbone as q4_0 (`omnilite export --format gguf --type q4_0`)
#   3. llama-bench (built by scripts/check_interop.sh) -p PROMPT -n NEW -d PROMPT -t THREADS: prompt tokens/s, and
#      decode tokens/s after a PROMPT-token context
#   4. omnilite bench decode --weights nf4 --prompt PROMPT --new-tokens NEW with the same threads in all
#      (THREADS = LibTorch + OpenBLAS threads, split as OMNI_SPLIT, default 1 + THREADS-1: its fastest split here)
# Prints one JSON line per tool and the ratios. Usage: scripts/bench_gguf.sh [THREADS] [PROMPT] [NEW]
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${1:-$(nproc)}
prompt=${2:-512}
new=${3:-32}
bench=.venv-interop/llama.cpp/build/bin/llama-bench
if [[ ! -x $bench ]]; then
  echo "bench_gguf: $bench is missing; run ./scripts/check_interop.sh first (it builds llama.cpp)" >&2
  exit 2
fi
omni_threads=${OMNI_THREADS:-1}
omni_blas=${OMNI_BLAS_THREADS:-$((threads - omni_threads > 0 ? threads - omni_threads : 1))}
[[ -f runs/init-bf16/model.safetensors ]] ||
  build/omnilite init --config configs/omni-lite.json --out runs/init-bf16
mkdir -p exports
[[ -f exports/init-q4_0.gguf ]] ||
  build/omnilite export --checkpoint runs/init-bf16 --format gguf --type q4_0 --out exports/init-q4_0.gguf
llama=$("$bench" -m exports/init-q4_0.gguf -p "$prompt" -n "$new" -d "$prompt" -t "$threads" -r 3 -o json)
omni=$(build/omnilite bench decode --config configs/omni-lite.json --weights nf4 --threads "$omni_threads" \
         --blas-threads "$omni_blas" --prompt "$prompt" --new-tokens "$new" --json 2> /dev/null | tail -1)
python3 - "$llama" "$omni" "$threads" <<'EOF'
import json, sys
llama, omni, threads = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
pp = next(r for r in llama if r["n_prompt"] > 0)["avg_ts"]
tg = next(r for r in llama if r["n_gen"] > 0)["avg_ts"]
print(json.dumps({"tool": "llama.cpp", "weights": "q4_0", "threads": int(threads), "prompt_tokens_per_second": pp,
                  "decode_tokens_per_second": tg, "build": llama[0].get("build_commit")}))
print(json.dumps({"tool": "omnilite", "weights": "nf4", "threads": omni["threads"], "blas_threads": omni["blas_threads"],
                  "prompt_tokens_per_second": omni["prompt_tokens_per_second"],
                  "decode_tokens_per_second": omni["decode_tokens_per_second"], "peak_rss_gib": omni["peak_rss_gib"]}))
print(f"decode: llama.cpp / omnilite = {tg / omni['decode_tokens_per_second']:.2f}; "
      f"prompt: llama.cpp / omnilite = {pp / omni['prompt_tokens_per_second']:.2f}")
EOF
