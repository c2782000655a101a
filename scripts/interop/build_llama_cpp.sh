#!/usr/bin/env bash
# llama.cpp for the interop suite, from PyPI's llama-cpp-python source distribution (PyPI has no wheel of it: it
# builds llama.cpp from the sources it vendors). Built once per machine into .venv-interop/llama.cpp/:
#   src/                      the sdist, unpacked (vendor/llama.cpp holds convert_hf_to_gguf.py and gguf-py)
#   build/bin/                libllama / libggml*, llama-cli, llama-completion, llama-bench, llama-quantize
# then llama-cpp-python is installed into the venv on top of those libraries (its own CMake build switched off, so
# llama.cpp is compiled once, about 9 minutes on 2 cores). Usage: build_llama_cpp.sh VENV
set -euo pipefail
venv=$1
version=0.3.36  # llama-cpp-python; its vendored llama.cpp is ggml 0.25.3 (gguf-py 0.19.0)
dir="$venv/llama.cpp"
stamp="$dir/.built-$version"
[[ -f $stamp ]] && exit 0
echo "check_interop: building llama.cpp from llama-cpp-python==$version (once per machine, ~10 min on 2 cores)"
rm -rf "$dir"
mkdir -p "$dir/dl"
"$venv/bin/pip" download --quiet --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$dir/dl"
tar xzf "$dir/dl/llama_cpp_python-$version.tar.gz" -C "$dir"
mv "$dir/llama_cpp_python-$version" "$dir/src"
launcher=()
if command -v ccache > /dev/null; then
  launcher=(-DCMAKE_C_COMPILER_LAUNCHER=ccache -DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
fi
cmake -S "$dir/src/vendor/llama.cpp" -B "$dir/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
  -DGGML_NATIVE=ON -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON \
  -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_APP=OFF "${launcher[@]}" > "$dir/cmake.log"
cmake --build "$dir/build" -j"$(nproc)" --target llama mtmd llama-cli llama-completion llama-bench llama-quantize \
  > "$dir/build.log"
CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" "$venv/bin/pip" install --quiet --no-deps "$dir/src"
lib=$("$venv/bin/python" -c 'import importlib.util, os; print(os.path.join(os.path.dirname(importlib.util.find_spec("llama_cpp").origin), "lib"))')
mkdir -p "$lib"
cp -a "$dir"/build/bin/lib*.so* "$lib"/
"$venv/bin/python" -c 'import llama_cpp; print("check_interop: llama-cpp-python", llama_cpp.__version__, "on llama.cpp", llama_cpp.llama_print_system_info().decode()[:60])'
touch "$stamp"
