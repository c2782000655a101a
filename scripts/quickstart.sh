#!/usr/bin/env bash
# The main job on a fresh machine: set-up and build, the embedded data (Fashion-MNIST and the fortunes corpus from
# Debian packages), a SentencePiece tokenizer, the full model's parameter table, then the three training stages of
# the small model on 2 CPU cores -- the VQ-VAE (its frozen encoder supplies the flow targets), the classifier that
# judges generated images, and OMNI-LITE itself (text + image captioning + text-to-image generation) -- and the
# evaluation: runs/quickstart/eval.json and the PNG reports (docs/evaluation.md): t2i_grid.png (generated images,
# one row per class), captions.png, recon_grid.png, expert_load.png, loss_curves.png, train_stats.png.
# A stage whose run folder already holds checkpoints resumes from the newest one, so an interrupted quickstart
# continues where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
start=$(date +%s)
source scripts/lib/data.sh
ensure_data_and_tokenizer
./build/omnilite tokenizer encode --model data/generated/tokenizer.model --text "a photo of a ankle boot."
./build/omnilite info --config configs/omni-lite.json

stage() {  # stage CONFIG RUN_FOLDER
  local resume=()
  [[ -d $2/checkpoints ]] && ls "$2"/checkpoints/step_* > /dev/null 2>&1 && resume=(--resume "$2")
  echo "quickstart: omnilite train --config $1 --out $2 ${resume[*]}"
  ./build/omnilite train --config "$1" --out "$2" "${resume[@]}"
}
stage configs/small-vqvae.json runs/quickstart-vqvae
stage configs/small-classifier.json runs/quickstart-classifier
stage configs/small.json runs/quickstart
./build/omnilite eval --checkpoint runs/quickstart --json
echo "quickstart: $(( $(date +%s) - start )) s after set-up; results in runs/quickstart/eval.json," \
     "runs/quickstart/t2i_grid.png, runs/quickstart/loss_curves.png"
