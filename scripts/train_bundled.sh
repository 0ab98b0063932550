#!/usr/bin/env bash
# Reproduce the bundled model: train (about 75 minutes on 2 CPU cores, the defaults of TrainConfig), then copy the files a model needs
# into the package. Resumable: re-running continues from the last checkpoint in runs/bundled.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/bundled}
.venv/bin/s2d2 train --out "$OUT" --seed 0 --no-progress
mkdir -p src/s2d2/bundled
cp "$OUT"/{config.json,generation_config.json,tokenizer.json,tokenizer_config.json,model.safetensors} src/s2d2/bundled/
