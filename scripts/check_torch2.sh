#!/usr/bin/env bash
# Builds OMNI-LITE against a LibTorch 2.x and runs the whole test suite there, on a machine without a GPU: a Debian 13
# (trixie) chroot has libtorch-dev 2.6 (CPU), GCC 14 and Catch2 v3, so the 2.x branches of the code (scaled-dot-product
# attention, per-device autocast, c10d's 2.x API) and the newer compiler and test framework are exercised.
# Built without OpenCV, as on the GPU machine. Needs root, debootstrap and Debian's package mirror.
# Usage: sudo ./scripts/check_torch2.sh [CHROOT_DIR]     (default /var/tmp/omnilite-trixie; kept for the next run)
# Env:   JOBS (default: all cores). About 25 minutes on 2 cores the first time (chroot, packages, build).
set -euo pipefail
cd "$(dirname "$0")/.."
root=${1:-/var/tmp/omnilite-trixie}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
PKGS=(libtorch-dev nlohmann-json3-dev libspdlog-dev catch2 libcxxopts-dev libsentencepiece-dev libgloo-dev
      libopenblas0-pthread cmake g++ make pkg-config)

if [[ $(id -u) != 0 ]]; then echo "check_torch2: run as root (it makes a chroot)" >&2; exit 2; fi
command -v debootstrap >/dev/null || { apt-get update -q && apt-get install -y -q debootstrap; }
if [[ ! -x $root/usr/bin/apt-get ]]; then
  echo "check_torch2: making a Debian 13 chroot in $root"
  debootstrap --variant=minbase trixie "$root" "$mirror" > "$root.debootstrap.log" 2>&1 ||
    { tail -20 "$root.debootstrap.log"; exit 1; }
fi
cp /etc/resolv.conf "$root/etc/resolv.conf"
mounted=()
cleanup() { for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do umount -l "${mounted[i]}" 2>/dev/null || true; done; }
trap cleanup EXIT
for m in proc sys dev dev/pts; do mount --bind "/$m" "$root/$m" && mounted+=("$root/$m"); done
in_root() { chroot "$root" /usr/bin/env -i HOME=/root PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 \
  DEBIAN_FRONTEND=noninteractive bash -c "$1"; }

in_root "apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends ${PKGS[*]} >/dev/null"
in_root 'dpkg-query -W libtorch-dev g++ catch2'
# The working tree as it is (tracked and untracked, not ignored files), so uncommitted changes are checked too. Only
# files whose content changed are copied, with a fresh time stamp, so that make rebuilds exactly what they touch.
dst=$root/root/omnilite stage=$(mktemp -d)
mkdir -p "$dst"
git ls-files -co --exclude-standard -z | tar --null -cf - -T - | tar -C "$stage" -xf -
(cd "$stage" && find . -type f -print0) | while IFS= read -r -d '' f; do
  cmp -s "$stage/$f" "$dst/$f" || { mkdir -p "$(dirname "$dst/$f")" && cp "$stage/$f" "$dst/$f"; }
done
rm -rf "$stage"
jobs=${JOBS:-$(nproc)}
in_root "cd /root/omnilite && cmake -S . -B build-torch2 -DCMAKE_BUILD_TYPE=Release -DOMNILITE_WITH_OPENCV=OFF \
  > build-torch2.cmake.log 2>&1 || { cat build-torch2.cmake.log; exit 1; }; grep -E 'LibTorch|c10d' build-torch2.cmake.log;
  cmake --build build-torch2 -j $jobs 2>&1 | grep -E 'error|warning: |Built target'; test \${PIPESTATUS[0]} = 0"
in_root "cd /root/omnilite && ctest --test-dir build-torch2 --output-on-failure -j $jobs"
echo "check_torch2: the build and all tests passed against $(in_root 'dpkg-query -W -f "\${Version}" libtorch-dev')"
