#!/usr/bin/env bash
# Builds OMNI-LITE against a LibTorch 2.x and runs the whole test suite there, on a machine without a GPU: a Debian 13
# (trixie) chroot has libtorch-dev 2.6 (CPU), GCC 14 and Catch2 v3, so the 2.x branches of the code (scaled-dot-product
# attention, per-device autocast, c10d's 2.x API) and the newer compiler and test framework are exercised.
# With --cuda the chroot gets Debian's CUDA build of LibTorch 2.6 instead (contrib: libtorch-cuda-dev; non-free: CUDA
# 12.4 and NCCL), so the CUDA-only code (OMNILITE_WITH_CUDA in runtime.cpp, ProcessGroupNCCL, tests/test_cuda.cpp) is
# compiled and linked as on a GPU machine; the tests then run on the CPU and the [cuda] ones say they skipped.
# cuDNN is not a Debian package (nvidia-cudnn downloads it from NVIDIA), so a placeholder satisfies the package and a
# stub libcudnn.so.9 (every function aborts) satisfies the linker; the CPU tests never call it.
# Built without OpenCV, as on the GPU machine. Needs root, debootstrap and Debian's package mirror. Compiler errors and
# warnings are printed with their context; the whole build log is CHROOT_DIR/root/omnilite/BUILD_DIR.build.log.
# With --sid the chroot is Debian unstable instead, whose libtorch-dev is the newest packaged LibTorch (2.14 in
# November 2026): the branches for LibTorch >= 2.9 (the grouped-GEMM MoE dispatch, at::_grouped_mm) are exercised.
# Usage: sudo ./scripts/check_torch2.sh [--cuda | --sid] [CHROOT_DIR]
#        (default /var/tmp/omnilite-trixie, /var/tmp/omnilite-trixie-cuda with --cuda, /var/tmp/omnilite-sid with
#        --sid; kept for the next run)
# Env:   JOBS (default: all cores). About 25 minutes on 2 cores the first time (chroot, packages, build); --cuda
#        downloads about 3 GB more and takes about 40 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
cuda=0 suite=trixie suffix=
case ${1:-} in
  --cuda) cuda=1 suffix=-cuda; shift ;;
  --sid) suite=sid suffix=-sid; shift ;;
  -*) echo "check_torch2: unknown option '$1'; usage: check_torch2.sh [--cuda | --sid] [CHROOT_DIR]" >&2; exit 2 ;;
esac
root=${1:-/var/tmp/omnilite-$suite${suffix/-sid/}}
# The machine's own Debian mirror (its apt sources, deb822 or one-line), unless DEBIAN_MIRROR names another.
apt_mirror() {
  local uri
  uri=$(sed -n 's/^URIs:[[:space:]]*\([^[:space:]]*\).*/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null |
          grep -v security | head -n1)
  [[ -n $uri ]] || uri=$(awk '$1 == "deb" && $2 !~ /^\[/ && $2 !~ /security/ {print $2; exit}' \
                          /etc/apt/sources.list 2>/dev/null)
  [[ -n $uri ]] || { echo "check_torch2: no Debian mirror in /etc/apt/sources*; set DEBIAN_MIRROR" >&2; exit 1; }
  echo "$uri"
}
mirror=${DEBIAN_MIRROR:-$(apt_mirror)}
PKGS=(nlohmann-json3-dev libspdlog-dev catch2 libcxxopts-dev libsentencepiece-dev libopenblas0-pthread cmake g++ make
      pkg-config)
if [[ $cuda == 1 ]]; then
  torch_pkg=libtorch-cuda-dev build=build-torch2-cuda
  PKGS+=(libtorch-cuda-dev libgloo-cuda-dev libnccl-dev nvidia-cuda-toolkit)
else
  torch_pkg=libtorch-dev build=build-torch2$suffix
  PKGS+=(libtorch-dev libgloo-dev)
  # Unstable's sentencepiece headers include Abseil's without depending on its -dev package.
  [[ $suite == sid ]] && PKGS+=(libabsl-dev)
fi

if [[ $(id -u) != 0 ]]; then echo "check_torch2: run as root (it makes a chroot)" >&2; exit 2; fi
command -v debootstrap >/dev/null || { apt-get update -q && apt-get install -y -q debootstrap; }
if [[ ! -x $root/usr/bin/apt-get ]]; then
  echo "check_torch2: making a Debian $suite chroot in $root"
  debootstrap --variant=minbase $suite "$root" "$mirror" > "$root.debootstrap.log" 2>&1 ||
    { tail -20 "$root.debootstrap.log"; exit 1; }
fi
cp /etc/resolv.conf "$root/etc/resolv.conf"
mounted=()
cleanup() { for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do umount -l "${mounted[i]}" 2>/dev/null || true; done; }
trap cleanup EXIT
for m in proc sys dev dev/pts; do mount --bind "/$m" "$root/$m" && mounted+=("$root/$m"); done
in_root() { chroot "$root" /usr/bin/env -i HOME=/root PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 \
  DEBIAN_FRONTEND=noninteractive bash -c "$1"; }

# Unstable's Release file is valid for a week only; a mirror that lags behind would otherwise be refused.
[[ $suite == sid ]] && echo 'Acquire::Check-Valid-Until "false";' > "$root/etc/apt/apt.conf.d/99omnilite-sid"
if [[ $cuda == 1 ]]; then
  echo "deb $mirror trixie main contrib non-free" > "$root/etc/apt/sources.list"
  rm -f "$root"/etc/apt/sources.list.d/*
  in_root 'set -e; if ! dpkg-query -W nvidia-cudnn >/dev/null 2>&1; then
    d=$(mktemp -d); mkdir -p $d/p/DEBIAN
    printf "Package: nvidia-cudnn\nVersion: 9.0.0.312~cuda12\nArchitecture: amd64\nMaintainer: OMNI-LITE <none@localhost>\nDescription: placeholder (no network for the cuDNN download)\n" > $d/p/DEBIAN/control
    dpkg-deb --build $d/p $d/nvidia-cudnn.deb >/dev/null && dpkg -i $d/nvidia-cudnn.deb >/dev/null && apt-mark hold nvidia-cudnn >/dev/null
  fi'
fi
in_root "apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends ${PKGS[*]} >/dev/null"
in_root "dpkg-query -W $torch_pkg g++ catch2"
if [[ $cuda == 1 ]]; then
  # The stub cuDNN: every function libtorch_cuda.so imports from libcudnn.so.9, under that version node, aborting.
  in_root 'set -e; lib=/usr/local/lib/libcudnn.so.9; if [[ ! -e $lib ]]; then d=$(mktemp -d)
    nm -D --undefined-only /usr/lib/x86_64-linux-gnu/libtorch_cuda.so | sed -n "s/.* U \(.*\)@libcudnn.so.9/\1/p" |
      sort -u > $d/syms
    { echo "#include <stdio.h>"; echo "#include <stdlib.h>"
      echo "static void stub(const char* f) { fprintf(stderr, \"cuDNN stub: %s called; this chroot has no cuDNN\\n\", f); abort(); }"
      while read -r f; do echo "void $f(void) { stub(\"$f\"); }"; done < $d/syms; } > $d/stub.c
    echo "libcudnn.so.9 { global: *; };" > $d/vers
    gcc -shared -fPIC -o $lib $d/stub.c -Wl,-soname,libcudnn.so.9 -Wl,--version-script=$d/vers && ldconfig
    echo "check_torch2: stub $lib with $(wc -l < $d/syms) cuDNN functions"; fi'
fi
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
in_root "cd /root/omnilite && cmake -S . -B $build -DCMAKE_BUILD_TYPE=Release -DOMNILITE_WITH_OPENCV=OFF \
  > $build.cmake.log 2>&1 || { cat $build.cmake.log; exit 1; }; grep -E 'LibTorch|c10d' $build.cmake.log;
  cmake --build $build -j $jobs > $build.build.log 2>&1; rc=\$?; grep -E -B6 'error|warning: ' $build.build.log;
  grep 'Built target' $build.build.log; exit \$rc"
in_root "cd /root/omnilite && ctest --test-dir $build --output-on-failure -j $jobs"
echo "check_torch2: the build and all tests passed against $torch_pkg $(in_root "dpkg-query -W -f '\${Version}' $torch_pkg")"
