#!/usr/bin/env bash
# The prepared GPU run for the TensorRT half (docs/tensorrt.md, "Still needs a GPU"): on a machine
# with an NVIDIA GPU and a TensorRT that targets it (TensorRT 10+ via `pip install tensorrt`, or the
# [tensorrt-rtx] extra on an Ampere-or-later RTX-class GPU), export the default model, build its
# prefill and decode engines, run them against the PyTorch outputs stored in the export
# (`qtale verify --trt`: Polygraphy's TrtRunner + Comparator, the precision's tolerances), then the
# device tests (tests/gpu: kernels, engines). Prints one line per check and exits non-zero if any failed.
#
#   bash scripts/gpu_check.sh [OUT_DIR]        (VENV=.venv PRECISIONS="int4 fp16 fp8" to change)
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
OUT=${1:-${TMPDIR:-/tmp}/qtale-gpu-check}
PRECISIONS=${PRECISIONS:-"int4 fp16"}
[ -x "$VENV/bin/python" ] || bash scripts/setup.sh "$VENV" || exit 1
. "$VENV/bin/activate"
nvidia-smi -L || { echo "no NVIDIA GPU visible: nothing to run"; exit 2; }
mkdir -p "$OUT"
failed=0
for P in $PRECISIONS; do
  EXP="$OUT/smollm2-135m-$P"
  [ -f "$EXP/manifest.json" ] || qtale-export --ratio 0.6 --precision "$P" --target tensorrt --out "$EXP" \
    > "$OUT/export-$P.log" 2>&1 || { echo "export $P: FAILED (see $OUT/export-$P.log)"; failed=1; continue; }
  for G in prefill decode; do
    qtale build "$EXP" --graph "$G" --opt-tokens 128 --max-tokens 512 > "$OUT/build-$P-$G.log" 2>&1 \
      && echo "build $P $G: ok" || { echo "build $P $G: FAILED (see $OUT/build-$P-$G.log)"; failed=1; }
  done
  if qtale verify "$EXP" --trt --json > "$OUT/verify-$P.json" 2> "$OUT/verify-$P.err"; then
    echo "verify --trt $P: ok ($OUT/verify-$P.json)"
  else
    echo "verify --trt $P: FAILED: $(tail -1 "$OUT/verify-$P.err")"; failed=1
  fi
done
python -m pytest -q tests/gpu 2>&1 | tee "$OUT/pytest-gpu.txt" | tail -3
[ "${PIPESTATUS[0]}" -eq 0 ] || failed=1
exit $failed
