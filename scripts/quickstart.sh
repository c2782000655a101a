#!/usr/bin/env bash
# The main job on a fresh machine: set-up and build, the embedded data (Fashion-MNIST and the fortunes corpus from
# Debian packages), a SentencePiece tokenizer trained on it, the full OMNI-LITE model's parameter table, and a short
# pretraining of configs/small.json on the text (about 2 minutes on 2 cores). Image understanding and generation
# objectives, evaluation and samples join here as their issues land.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
./scripts/prepare_data.sh
tok=data/generated/tokenizer.model
if [[ ! -s $tok ]]; then
  ./build/omnilite tokenizer train --input data/generated/text/train.txt,data/generated/text/captions.txt \
    --vocab-size 4096 --out "$tok"
fi
./build/omnilite tokenizer encode --model "$tok" --text "a photo of a ankle boot."
./build/omnilite info --config configs/omni-lite.json
./build/omnilite train --config configs/small.json --out runs/quickstart
echo "quickstart: metrics in runs/quickstart/metrics.jsonl, checkpoints in runs/quickstart/checkpoints/"
