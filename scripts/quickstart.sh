#!/usr/bin/env bash
# The main job on a fresh machine: set-up, build, then show the full OMNI-LITE model's parameter table.
# (Training on the embedded data joins here once the trainer lands.)
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
./build/omnilite info --config configs/omni-lite.json
