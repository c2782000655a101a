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

# The stages train from the shard formats of the embedded data (scripts/lib/data.sh writes them): images streamed
# from WebDataset tar shards, text from token shards (docs/training.md, "Token shards" and "Image-caption tar shards").
images='data.image_train=["data/generated/shards/fashion-mnist-train"]'
text='data.text_train=["data/generated/shards/text-train"]'
stage() {  # stage CONFIG RUN_FOLDER [--set KEY=VALUE ...]
  local config=$1 run=$2 resume=()
  shift 2
  [[ -d $run/checkpoints ]] && ls "$run"/checkpoints/step_* > /dev/null 2>&1 && resume=(--resume "$run")
  echo "quickstart: omnilite train --config $config --out $run $* ${resume[*]}"
  ./build/omnilite train --config "$config" --out "$run" "$@" "${resume[@]}"
}
stage configs/small-vqvae.json runs/quickstart-vqvae --set "$images"
stage configs/small-classifier.json runs/quickstart-classifier --set "$images"
stage configs/small.json runs/quickstart --set "$images" --set "$text"
./build/omnilite eval --checkpoint runs/quickstart --json
echo "quickstart: $(( $(date +%s) - start )) s after set-up; results in runs/quickstart/eval.json," \
     "runs/quickstart/t2i_grid.png, runs/quickstart/loss_curves.png"
