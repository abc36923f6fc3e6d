#!/usr/bin/env bash
# The main job on the embedded default model (SmolLM2-135M-Instruct): set up, train QTALE routers,
# calibrate the execution-ratio dial, and show the theta table. Output goes to runs/quickstart.
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/qtale ] || bash scripts/setup.sh .venv
. .venv/bin/activate
DATA=${DATA:-../shared/data/commonsense/ARC-Easy/train.json}
[ -f "$DATA" ] || DATA=qtale_export/data/calibration.txt  # label-free self-distillation fallback
OUT=${OUT:-runs/quickstart}
qtale train --model smollm2-135m --data "$DATA" --out "$OUT" --method qtale --steps "${STEPS:-20}" \
    --batch-size 4 --seq-len 256 --target-ratio 0.6 --lambda2 0.1 --force
qtale calibrate "$OUT" --ratios 0.5,0.6,0.7,0.8,1.0
