#!/usr/bin/env bash
# The fine-tuning quickstart, after ./scripts/quickstart.sh: builds an SFT set from the embedded data into
# data/generated/sft/ (image conversations about Fashion-MNIST training images with three question types, drawing
# turns, instruction records; held-out questions on test images in phrasings training never uses), evaluates the
# quickstart model on it, QLoRA-tunes it on the set (configs/sft-small.json: NF4 bases, rank-16 adapters, packed
# conversations with loss on the answers only, replayed caption -> image rows), and evaluates the adapters on the
# same tasks: runs/sft/eval-before/eval.json and runs/sft/eval.json (vqa_accuracy per question type, text_ppl,
# t2i_accuracy). A run folder that already holds checkpoints resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
[[ -x build/omnilite ]] || ./scripts/setup.sh
if ! ls runs/quickstart/checkpoints/step_* > /dev/null 2>&1; then
  echo "finetune_quickstart: runs/quickstart has no checkpoint; run ./scripts/quickstart.sh first" >&2
  exit 1
fi
[[ -s data/generated/sft/valid.jsonl ]] || ./build/omnilite data sft-demo --out data/generated/sft
tasks=vqa,ppl,t2i
evalargs=(--tasks $tasks --data data/generated/sft/valid.jsonl --t2i-per-class 10 --caption-images 0)
mkdir -p runs/sft
[[ -s runs/sft/eval-before/eval.json ]] ||
  ./build/omnilite eval --checkpoint runs/quickstart "${evalargs[@]}" --out runs/sft/eval-before
resume=()
ls runs/sft/checkpoints/step_* > /dev/null 2>&1 && resume=(--resume runs/sft)
./build/omnilite train --config configs/sft-small.json --out runs/sft "${resume[@]}"
./build/omnilite eval --checkpoint runs/quickstart --adapter runs/sft "${evalargs[@]}" --out runs/sft
echo "finetune_quickstart: before (runs/sft/eval-before) and after (runs/sft):"
# the table alone (eval-before is no run folder with curves to plot)
{ ./build/omnilite compare --runs runs/sft/eval-before,runs/sft --out runs/sft/compare.png 2> /dev/null || true; } |
  grep -E '^(metric|vqa_|text_ppl|t2i_accuracy)'
echo "finetune_quickstart: $(( $(date +%s) - start )) s; results in runs/sft/eval.json, runs/sft/eval-before/eval.json"
