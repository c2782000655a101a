#!/usr/bin/env bash
# Training speed of OMNI-LITE beside an eager PyTorch peer, in one run, on the same machine and cores: a benchmark,
# not a test (docs/benchmarks.md, "Training beside eager PyTorch"). For each case:
#   small: configs/small.json (4 text rows x 128 tokens, 4 layers, 256 wide, 4 experts)
#   full:  the card's layer dims (configs/omni-lite.json: 2048 wide, 32/8 heads, 16 experts of 768) with 2 of its 24
#          decoder layers, 1 row x 512 tokens (what fits a 2-core machine's patience)
#   1. omnilite bench train --config C (text rows only: caption, generation and z-loss off, which the peer has not)
#      --threads OMNI_THREADS --blas-threads OMNI_BLAS_THREADS: whole optimizer steps (AdamW, clipping) on the
#      embedded corpus, and the fp32 GEMM rate of the same run
#   2. scripts/bench_peer.py with the same config and overrides: transformers' MixtralForCausalLM (eager attention,
#      the per-expert loop), torch.optim.AdamW, clip_grad_norm_, random rows of the same shape, torch threads =
#      THREADS, and its own GEMM rate (MKL)
# Prints one JSON line per side and case, then tokens/s OMNI-LITE / peer (above 1: OMNI-LITE is faster) and each
# side's MFU against its own GEMM rate (both with omnilite's model FLOPs per token).
# Usage: scripts/bench_vs_peer.sh [THREADS, default nproc] [CASES, default "small full"]
# Env: STEPS (timed steps, default 20 small / 5 full), OMNI_THREADS (LibTorch threads, default THREADS),
#      OMNI_BLAS_THREADS (OpenBLAS threads, default 1). Needs build/omnilite and .venv-interop (check_interop.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${1:-$(nproc)}
cases=${2:-small full}
py=.venv-interop/bin/python
[[ -x $py ]] || { echo "bench_vs_peer: $py is missing; run ./scripts/check_interop.sh first" >&2; exit 2; }
[[ -x build/omnilite ]] || { echo "bench_vs_peer: build/omnilite is missing; run ./scripts/setup.sh" >&2; exit 2; }
omni_threads=${OMNI_THREADS:-$threads}
omni_blas=${OMNI_BLAS_THREADS:-1}
source scripts/lib/data.sh
ensure_data_and_tokenizer
text_only=(--set train.caption_batch_size=0 --set train.gen_batch_size=0 --set train.sft_batch_size=0
           --set train.z_coef=0)
for c in $cases; do
  case $c in
    small) config=configs/small.json; sets=(); steps=${STEPS:-20} ;;
    full)
      config=configs/omni-lite.json; steps=${STEPS:-5}
      sets=(--set model.text.num_layers=2 --set train.batch_size=1 --set train.seq_len=512
            --set 'data.text_train=["data/generated/text/train.txt"]' --set 'data.text_valid=[]'
            --set data.tokenizer=data/generated/tokenizer.model)
      ;;
    *) echo "bench_vs_peer: case \"$c\": expected small or full" >&2; exit 2 ;;
  esac
  omni=$(build/omnilite bench train --config "$config" "${text_only[@]}" "${sets[@]}" --steps "$steps" \
           --warmup 2 --threads "$omni_threads" --blas-threads "$omni_blas" --json 2>/dev/null | tail -1)
  echo "$omni"
  fpt=$(echo "$omni" | "$py" -c 'import json,sys; print(json.load(sys.stdin)["model_flops_per_token"])')
  peer=$("$py" scripts/bench_peer.py --config "$config" "${text_only[@]}" "${sets[@]}" --steps "$steps" \
           --warmup 2 --threads "$threads" --flops-per-token "$fpt")
  echo "$peer"
  "$py" - "$c" "$omni" "$peer" <<'EOF'
import json, sys
c, o, p = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
print(f"{c}: OMNI-LITE {o['tokens_per_second']:.0f} tokens/s ({o['threads']} + {o['blas_threads']} threads, MFU "
      f"{o['mfu']:.2f} of {o['matmul_gflops']:.1f} GFLOP/s), peer {p['tokens_per_second']:.0f} tokens/s "
      f"({p['threads']} threads, MFU {p['mfu']:.2f} of {p['matmul_gflops']:.1f} GFLOP/s): "
      f"ratio {o['tokens_per_second'] / p['tokens_per_second']:.2f}")
EOF
done
