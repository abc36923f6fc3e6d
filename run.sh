#!/usr/bin/env bash
# The main job: the shipped QTALE default model (SmolLM2-135M-Instruct routers + LoRA adapter)
# through the deployment path: quantize INT4 (AWQ), re-calibrate theta on the quantized weights,
# export at RATIO with int4 precision, verify, generate at two ratios, benchmark against the
# all-layers model of the same export, held-out perplexity/KL; one summary at the end
# (qtale_export/pipeline.py). Output in runs/deploy; a second run reuses every complete stage.
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/qtale ] || bash scripts/setup.sh .venv
. .venv/bin/activate
qtale pipeline --out "${OUT:-runs/deploy}" --ratio "${RATIO:-0.6}" --other-ratio "${OTHER_RATIO:-0.8}"
