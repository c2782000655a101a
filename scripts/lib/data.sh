# shellcheck shell=bash
# ensure_data_and_tokenizer: the embedded data (scripts/prepare_data.sh) and the SentencePiece tokenizer that the
# configs name (data/generated/tokenizer.model, trained once). Needs build/omnilite.
ensure_data_and_tokenizer() {
  ./scripts/prepare_data.sh
  local tok=data/generated/tokenizer.model
  if [[ ! -s $tok ]]; then
    ./build/omnilite tokenizer train --input data/generated/text/train.txt,data/generated/text/captions.txt \
      --vocab-size 4096 --out "$tok"
  fi
}
