#!/usr/bin/env bash
# Run where Debian's packages are reachable: downloads the .deb files of the header-only and small dependencies the
# GPU machine lacks (and the Fashion-MNIST data) and unpacks them into .deps/prefix (git-ignored), which a device run
# carries along. The GPU machine has no OpenCV: check.sh builds with OMNILITE_WITH_OPENCV=OFF.
set -euo pipefail
cd "$(dirname "$0")/../.."
PKGS=(nlohmann-json3-dev libcxxopts-dev catch2 libsentencepiece-dev libsentencepiece0 libprotobuf-lite32 zlib1g-dev
      libspdlog-dev libspdlog1.10 libfmt-dev libfmt9 dataset-fashion-mnist)
mkdir -p .deps/debs .deps/prefix
cd .deps/debs
missing=()
for p in "${PKGS[@]}"; do ls "${p}"_*.deb >/dev/null 2>&1 || missing+=("$p"); done
if ((${#missing[@]})); then
  apt-get update -q >/dev/null
  apt-get download "${missing[@]}"
fi
for d in *.deb; do dpkg-deb -x "$d" ../prefix; done
du -sh ../prefix
