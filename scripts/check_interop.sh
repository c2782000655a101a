#!/usr/bin/env bash
# The interop suite: the real libraries read what OMNI-LITE writes (docs/interop.md).
#   1. A git-ignored virtual environment, .venv-interop/, with the versions pinned in
#      scripts/interop/requirements.txt, from PyPI (about 4 GB, once per machine; rebuilt when the pins change), and
#      llama.cpp built from llama-cpp-python's source distribution (scripts/interop/build_llama_cpp.sh, ~10 min).
#   2. The build (./scripts/setup.sh) and the embedded data and tokenizer, as the quickstart makes them.
#   3. The fixtures under build/interop/: tiny random models (tied and untied LM head, exported in 1, 2 and 3 shards)
#      and, when runs/quickstart exists, the quickstart's trained model.
#   4. The ctest entries labelled `interop`, then one table: check, measured figure, bound, pass or fail.
# Without the environment those ctest entries are skipped, so ./scripts/test.sh never downloads anything.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-interop
req=scripts/interop/requirements.txt
stamp="$venv/.requirements.sha256"
want=$(sha256sum "$req" | cut -d' ' -f1)
if [[ ! -x $venv/bin/python || "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
  echo "check_interop: creating $venv from $req (PyPI; large downloads, once per machine)"
  if ! python3 -c 'import venv, ensurepip' 2> /dev/null; then  # Debian's python3 needs python3-venv for this
    apt-get update -qq && apt-get install -y -qq python3-venv > /dev/null
  fi
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet -r "$req"
  echo "$want" > "$stamp"
fi
scripts/interop/build_llama_cpp.sh "$venv"  # llama.cpp and llama-cpp-python, from source (once per machine)
./scripts/setup.sh
source scripts/lib/data.sh
ensure_data_and_tokenizer
"$venv/bin/python" tests/interop/fixtures.py
if [[ ! -d runs/quickstart/checkpoints ]]; then
  echo "check_interop: no runs/quickstart: the checks on a trained model are left out (run ./scripts/quickstart.sh" \
       "first for them)"
fi
build=${BUILD_DIR:-build}
rm -f "$build/interop/results.jsonl"
status=0
ctest --test-dir "$build" -L interop --output-on-failure -j1 || status=$?
"$venv/bin/python" tests/interop/table.py "$build/interop/results.jsonl" || status=1
exit $status
