#!/usr/bin/env bash
# Build a TensorRT engine for a qtale export with trtexec, then record it in EXPORT_DIR/manifest.json.
#
#   ./build_engine.sh EXPORT_DIR [--precision P] [--min-tokens N] [--opt-tokens N] [--max-tokens N]
#                     [--batch N] [--plugin-lib PATH] [--static-plugins] [--jetson]
#                     [--timing-cache FILE] [--workspace-mb N] [--dry-run]
#
# Builds the prefill graph (inputs input_ids/attention_mask [batch, seq], theta [batch]).
# Validation (manifest, plugin library, FP8 rules) and the manifest update are done by
# `qtale build --plan` and `qtale build --record ENGINE` (run as `python -m qtale_export.cli`);
# set PYTHON to choose the interpreter.
# --static-plugins passes the library with --staticPlugins (use libqtale_trt_plugins_static.so,
# which registers itself when loaded) instead of --dynamicPlugins.
set -euo pipefail

die() { echo "build_engine.sh: error: $*" >&2; exit 2; }
# Shell-quote only what needs it, so printed commands stay readable and copy-pasteable.
show() {
  local out=() a
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then out+=("$a"); else out+=("$(printf '%q' "$a")"); fi
  done
  echo "${out[*]}"
}

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python3}"

[[ $# -ge 1 && "$1" != -* ]] || die "usage: build_engine.sh EXPORT_DIR [--precision P] [--min-tokens N] [--opt-tokens N] [--max-tokens N] [--batch N] [--plugin-lib PATH] [--static-plugins] [--jetson] [--timing-cache FILE] [--workspace-mb N] [--dry-run]"
EXPORT_DIR="${1%/}"
shift

PRECISION="" MIN_TOKENS=1 OPT_TOKENS=256 MAX_TOKENS=2048 BATCH=1 PLUGIN_LIB="" STATIC_PLUGINS=0
JETSON=0 TIMING_CACHE="" WORKSPACE_MB="" DRY_RUN=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --precision) PRECISION="${2:?--precision needs a value}"; shift 2 ;;
    --min-tokens) MIN_TOKENS="${2:?}"; shift 2 ;;
    --opt-tokens) OPT_TOKENS="${2:?}"; shift 2 ;;
    --max-tokens) MAX_TOKENS="${2:?}"; shift 2 ;;
    --batch) BATCH="${2:?}"; shift 2 ;;
    --plugin-lib) PLUGIN_LIB="${2:?}"; shift 2 ;;
    --static-plugins) STATIC_PLUGINS=1; shift ;;
    --jetson) JETSON=1; shift ;;
    --timing-cache) TIMING_CACHE="${2:?}"; shift 2 ;;
    --workspace-mb) WORKSPACE_MB="${2:?}"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    *) die "unknown option $1 (see the header of build_engine.sh)" ;;
  esac
done
for n in "$MIN_TOKENS" "$OPT_TOKENS" "$MAX_TOKENS" "$BATCH" ${WORKSPACE_MB:+"$WORKSPACE_MB"}; do
  [[ "$n" =~ ^[1-9][0-9]*$ ]] || die "token counts, --batch and --workspace-mb must be positive integers, got '$n'"
done
(( MIN_TOKENS <= OPT_TOKENS && OPT_TOKENS <= MAX_TOKENS )) || die "need --min-tokens <= --opt-tokens <= --max-tokens"
# Refuse early, before any Python: Orin (SM 8.7) has no FP8.
[[ "$JETSON" == 1 && "$PRECISION" == fp8 ]] && die "FP8 is not supported on Jetson Orin (SM 8.7): use --precision int4 (W4A16) or fp16"
[[ -z "$WORKSPACE_MB" ]] && { [[ "$JETSON" == 1 ]] && WORKSPACE_MB=2048 || WORKSPACE_MB=4096; }

# Arguments shared by the Python check/record steps.
PY_ARGS=("$EXPORT_DIR" --graph prefill --min-tokens "$MIN_TOKENS" --opt-tokens "$OPT_TOKENS"
         --max-tokens "$MAX_TOKENS" --batch "$BATCH" --workspace-mb "$WORKSPACE_MB")
[[ "$JETSON" == 1 ]] && PY_ARGS+=(--jetson)
CHECK_ARGS=("${PY_ARGS[@]}")
[[ -n "$PRECISION" ]] && CHECK_ARGS+=(--precision "$PRECISION")
[[ -n "$PLUGIN_LIB" ]] && CHECK_ARGS+=(--plugin-lib "$PLUGIN_LIB")
[[ "$DRY_RUN" == 1 ]] && CHECK_ARGS+=(--dry-run)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

# --plan prints: PRECISION strong|weak PLUGIN_LIB|-   (and a one-line error, exit 2, when invalid)
CHECK="$("$PYTHON" -m qtale_export.cli build "${CHECK_ARGS[@]}" --plan)" || exit 2
read -r PRECISION TYPING USED_PLUGIN_LIB <<<"$CHECK"
PY_ARGS+=(--precision "$PRECISION")
[[ "$USED_PLUGIN_LIB" != "-" ]] && PY_ARGS+=(--plugin-lib "$USED_PLUGIN_LIB")

ONNX="$EXPORT_DIR/prefill.onnx"
ENGINE="$EXPORT_DIR/prefill.$PRECISION.engine"
LOG="$EXPORT_DIR/prefill.$PRECISION.trtexec.log"
SHAPE_MIN="input_ids:${BATCH}x${MIN_TOKENS},attention_mask:${BATCH}x${MIN_TOKENS},theta:${BATCH}"
SHAPE_OPT="input_ids:${BATCH}x${OPT_TOKENS},attention_mask:${BATCH}x${OPT_TOKENS},theta:${BATCH}"
SHAPE_MAX="input_ids:${BATCH}x${MAX_TOKENS},attention_mask:${BATCH}x${MAX_TOKENS},theta:${BATCH}"

# trtexec writes --saveEngine in place; build to a temp name and rename so a failed build never
# leaves a truncated engine under the final name.
TMP_ENGINE="$EXPORT_DIR/.prefill.$PRECISION.engine.tmp"
CMD=(trtexec "--onnx=$ONNX" "--saveEngine=$TMP_ENGINE"
     "--minShapes=$SHAPE_MIN" "--optShapes=$SHAPE_OPT" "--maxShapes=$SHAPE_MAX")
if [[ "$TYPING" == strong ]]; then CMD+=(--stronglyTyped); else CMD+=(--fp16); fi
if [[ "$USED_PLUGIN_LIB" != "-" ]]; then
  if [[ "$STATIC_PLUGINS" == 1 ]]; then CMD+=("--staticPlugins=$USED_PLUGIN_LIB"); else CMD+=("--dynamicPlugins=$USED_PLUGIN_LIB"); fi
fi
[[ -n "$TIMING_CACHE" ]] && CMD+=("--timingCacheFile=$TIMING_CACHE")
CMD+=("--memPoolSize=workspace:${WORKSPACE_MB}M" --skipInference)

RECORD=("$PYTHON" -m qtale_export.cli build "${PY_ARGS[@]}" --record "$ENGINE" --trtexec-log "$LOG")

if [[ "$DRY_RUN" == 1 ]]; then
  show "${CMD[@]}"
  show mv -f "$TMP_ENGINE" "$ENGINE"
  show "${RECORD[@]}"
  exit 0
fi

command -v trtexec >/dev/null 2>&1 || die "trtexec not found on PATH: install TensorRT 10 (JetPack 6 ships /usr/src/tensorrt/bin/trtexec) and add it to PATH, or use --dry-run"

"${CMD[@]}" 2>&1 | tee "$LOG" || { rm -f "$TMP_ENGINE"; die "trtexec failed (log: $LOG)"; }
[[ -s "$TMP_ENGINE" ]] || die "trtexec produced no engine (log: $LOG)"
mv -f "$TMP_ENGINE" "$ENGINE"
"${RECORD[@]}"
