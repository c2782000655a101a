#!/usr/bin/env bash
# ctest entry of one interop check: skipped (exit 77) without the environment of scripts/check_interop.sh.
root="$(cd "$(dirname "$0")/../.." && pwd)"
py="$root/.venv-interop/bin/python"
if [[ ! -x $py ]]; then
  echo "skipped: no interop environment (.venv-interop); run scripts/check_interop.sh"
  exit 77
fi
if [[ ! -f ${OMNILITE_INTEROP_DIR:-$root/build/interop}/fixtures.json ]]; then
  echo "skipped: no interop fixtures; run scripts/check_interop.sh"
  exit 77
fi
exec "$py" "$root/tests/interop/check_$1.py"
