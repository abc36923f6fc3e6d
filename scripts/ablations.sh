#!/bin/bash
# The ablation rows of docs/ablations.md: each row is the v2 recipe (recipes/smollm2-135m.yaml,
# QTALE) with one change, trained into runs/ablate/NAME (resumable) and measured on held-out KL
# into docs/ablations/heldout_kl_NAME.json (a row whose JSON exists is skipped, so a stopped run
# continues where it was). `bash scripts/ablations.sh [NAME ...]` runs the named rows (default:
# all, in the order below); then `python scripts/ablation_table.py` prints the table.
# ~25 min of training and ~3 min of measurement per row on a 2-core AMX box (teacher cached).
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
V2="--model smollm2-135m --loss distill --lora-rank 16 --lora-lr 1e-3 --steps 200 --batch-size 4
    --seq-len 256 --lr 1e-2 --target-ratio 0.6 --lambda1 5 --lambda1-warmup 30 --lambda2 0.1 --dtype bfloat16
    --teacher-cache runs/teacher --save-every 20 --method qtale"
DATA="corpus:mmlu corpus:pydoc ../shared/data/commonsense/ARC-Easy/train.json
      ../shared/data/commonsense/ARC-Challenge/train.json ../shared/data/commonsense/openbookqa/train.json
      ../shared/data/commonsense/boolq/train.json"
RECORDS="../shared/data/commonsense/ARC-Easy/train.json ../shared/data/commonsense/ARC-Challenge/train.json
         ../shared/data/commonsense/openbookqa/train.json ../shared/data/commonsense/boolq/train.json"
# name|flags that change (later flags override V2's)
ROWS=(
  "loralr3e-4|--lora-lr 3e-4"
  "full4|--full-every 4"
  "lambda2_0.3|--lambda2 0.3"
  "rank0|--lora-rank 0"
  "omega0.5|--target-ratio 0.5"
  "tau0.5|--tau 0.5"
  "first4|--first-routed-layer 4"
  "lambda1_1|--lambda1 1"
  "warmup0|--lambda1-warmup 0"
  "steps400|--steps 400"
  "records|--data $RECORDS"
  "seq512|--seq-len 512 --batch-size 2"
  "dllm_full4|--method dllm --full-every 4"
  "steps400_full4|--steps 400 --full-every 4"
  "seed1|--seed 1"  # v2 itself with another seed: how far one seed moves a row
)
# rows that continue another run where its 200 steps ended, when that run (with its optimizer
# state) is here: data order and Gumbel noise depend on (seed, step) only, so the continued run is
# the uninterrupted 400-step one
declare -A CONTINUES=([steps400]=runs/smollm2-135m/train/qtale [steps400_full4]=runs/ablate/full4)
declare -A FLAGS
order=()
for row in "${ROWS[@]}"; do FLAGS[${row%%|*}]=${row#*|}; order+=("${row%%|*}"); done
[ $# -gt 0 ] && order=("$@")  # the named rows, in the order given
for name in "${order[@]}"; do
  [ -n "${FLAGS[$name]+x}" ] || { echo "== $name: no such row (${!FLAGS[*]})"; exit 2; }
  flags=${FLAGS[$name]}
  out=runs/ablate/$name; js=docs/ablations/heldout_kl_$name.json
  if [ -f "$js" ]; then echo "== $name: done ($js)"; continue; fi
  echo "== $name: $flags ($(date +%H:%M))"
  src=${CONTINUES[$name]:-}
  if [ -n "$src" ] && [ ! -e "$out" ] && [ -f "$src/optimizer.pt" ]; then
    mkdir -p runs/ablate && cp -r "$src" "$out"
  fi
  resume=; [ -f "$out/train_state.json" ] && resume=--resume
  # shellcheck disable=SC2086  # word splitting of the flag lists is intended
  $PY -m qtale_export.cli train $V2 --data $DATA $flags --out "$out" $resume || { echo "== $name: training failed"; exit 1; }
  $PY scripts/heldout_kl.py "$out" --no-layer-drop --out "$js" || { echo "== $name: held-out KL failed"; exit 1; }
done
