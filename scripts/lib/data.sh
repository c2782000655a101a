# shellcheck shell=bash
# ensure_data_and_tokenizer: the embedded data (scripts/prepare_data.sh), the SentencePiece tokenizer that the
# configs name (data/generated/tokenizer.model, trained once), and the embedded training data in the shard formats
# (docs/training.md): data/generated/shards/text-train (token shards of text/train.txt, rewritten when the tokenizer
# is newer) and data/generated/shards/fashion-mnist-train (WebDataset tar shards of the 60,000 training images).
# The text shards need the tokenizer, so they are written here rather than by prepare_data.sh. Needs build/omnilite.
ensure_data_and_tokenizer() {
  ./scripts/prepare_data.sh
  local tok=data/generated/tokenizer.model
  if [[ ! -s $tok ]]; then
    ./build/omnilite tokenizer train --input data/generated/text/train.txt,data/generated/text/captions.txt \
      --vocab-size 4096 --out "$tok"
  fi
  local text=data/generated/shards/text-train images=data/generated/shards/fashion-mnist-train
  if [[ ! -s $text/shards.json || $tok -nt $text/shards.json ]]; then
    rm -rf "$text.tmp" && ./build/omnilite data tokenize --input data/generated/text/train.txt --tokenizer "$tok" \
      --out "$text.tmp" && rm -rf "$text" && mv "$text.tmp" "$text"
  fi
  if [[ ! -s $images/shard-000005.tar ]]; then
    rm -rf "$images.tmp" && ./build/omnilite data webdataset --input data/generated/fashion-mnist/train \
      --out "$images.tmp" && rm -rf "$images" && mv "$images.tmp" "$images"
  fi
}
