#!/usr/bin/env bash
# Converts the embedded data, from Debian packages, into data/generated/:
#   fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte  (dataset-fashion-mnist: 70,000 real 28x28 images)
#   text/train.txt, text/valid.txt    (the fortunes package: real English text, fortune format, every 20th held out)
#   text/captions.txt                 (the Fashion-MNIST caption templates, so the tokenizer knows the class names)
# Usage: ./scripts/prepare_data.sh   (as root, or with sudo; installs the two packages when missing)
set -euo pipefail
cd "$(dirname "$0")/.."

PKGS=(dataset-fashion-mnist fortunes)
source scripts/lib/packages.sh
ensure_packages "${PKGS[@]}"

out=data/generated
mkdir -p "$out/fashion-mnist" "$out/text"
src=/usr/share/datasets/fashion-mnist
for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
  if [[ ! -s $out/fashion-mnist/$f ]]; then
    gunzip -c "$src/$f.gz" > "$out/fashion-mnist/$f.tmp" && mv "$out/fashion-mnist/$f.tmp" "$out/fashion-mnist/$f"
  fi
done

# Fortunes: every text file of the package except the ASCII-art ones; documents end at a line holding "%".
fortunes=()
for f in /usr/share/games/fortunes/*; do
  case "$f" in *.dat|*.u8|*/art|*/ascii-art) continue ;; esac
  [[ -f $f ]] && fortunes+=("$f")
done
for f in "${fortunes[@]}"; do cat "$f"; printf '\n%%\n'; done | tr -d '\r' | awk -v tr="$out/text/train.txt.tmp" \
  -v va="$out/text/valid.txt.tmp" '
  /^%$/ { if (doc != "") { out = (n % 20 == 19) ? va : tr; printf "%s\n%%\n", doc > out; n++ }; doc = ""; next }
  { doc = (doc == "" ? $0 : doc "\n" $0) }
  END { printf "prepare_data: %d fortunes (%d held out)\n", n, int(n / 20) > "/dev/stderr" }'
mv "$out/text/train.txt.tmp" "$out/text/train.txt"
mv "$out/text/valid.txt.tmp" "$out/text/valid.txt"

classes=("t-shirt" "trouser" "pullover" "dress" "coat" "sandal" "shirt" "sneaker" "bag" "ankle boot")
: > "$out/text/captions.txt.tmp"
for c in "${classes[@]}"; do
  for t in "a photo of a %s." "an image of a %s." "a small grayscale picture of a %s." "this is a %s."; do
    printf "$t\n" "$c" >> "$out/text/captions.txt.tmp"
  done
done
mv "$out/text/captions.txt.tmp" "$out/text/captions.txt"
echo "prepare_data: wrote $(du -sh $out | cut -f1) into $out"
