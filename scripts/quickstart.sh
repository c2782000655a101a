#!/usr/bin/env bash
# The main job on a fresh machine: set-up and build, the embedded data (Fashion-MNIST and the fortunes corpus from
# Debian packages), a SentencePiece tokenizer trained on it, and the full OMNI-LITE model's parameter table.
# (Pretraining on this data joins here once the trainer lands; see the open issues.)
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
