#!/usr/bin/env bash
# Reproduce the bundled model (v4): train on the compositional word problems (s2d2.evaluation.tasks.wordy, 85%) and the templated
# ones (s2d2.evaluation.tasks.arith, 15%), TrainConfig's default model size, 6000 compiled steps on length-bucketed batches
# (about 90 minutes on 2 CPU cores), then copy the files a model needs into the package. Resumable: re-running continues from
# the last checkpoint in $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/bundled}
.venv/bin/s2d2 train --out "$OUT" --seed 0 --no-progress --tasks wordy arith --task-weights 0.85 0.15 \
  --num-train 400000 --steps 6000 --length-buckets 16 --compile --eval-every 1000 --eval-n 100
mkdir -p src/s2d2/bundled
cp "$OUT"/{config.json,generation_config.json,tokenizer.json,tokenizer_config.json,model.safetensors} src/s2d2/bundled/
