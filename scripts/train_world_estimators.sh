#!/usr/bin/env bash
# The world estimators that `controlnet eval` scores world models with (docs/model-card.md,
# "Scoring the world models"), from nothing, with the project's own commands:
#   1. a training world (5,000 samples, seed 7) and the held-out world (300 samples, seed 1: the
#      one the models are scored on; no sample in both);
#   2. image -> depth and image -> seg estimators (controlnet train-estimator), each about 20
#      minutes on one CPU core, scored on the held-out world at every checkpoint;
#   3. their float16 files into the package (src/controlnet/weights/world-estimator-*.safetensors).
#
# Working state lives in $WORK (default ~/.cache/controlnet-eval-estimators). Run the script again
# after an interruption: a written dataset is kept, a training resumes from its checkpoint (and
# only exports again once finished). Deterministic from the seeds (on the same machine and threads).
#
#   OMP_NUM_THREADS=1 nohup scripts/train_world_estimators.sh > ~/.cache/controlnet-eval-estimators.log 2>&1 &
set -euo pipefail

cd "$(dirname "$0")/.."
CONTROLNET=${CONTROLNET:-.venv/bin/controlnet}
WORK=${WORK:-$HOME/.cache/controlnet-eval-estimators}
STEPS=${STEPS:-1200}
mkdir -p "$WORK"

for set in "train 5000 7" "held-out 300 1"; do
    read -r name count seed <<<"$set"
    if [[ ! -e "$WORK/$name/prompt.json" ]]; then
        "$CONTROLNET" data world --out "$WORK/$name" --count "$count" --seed "$seed"
    fi
done
for task in depth seg; do
    "$CONTROLNET" train-estimator --task "$task" --data "$WORK/train" --validation-data "$WORK/held-out" \
        --out "$WORK/$task" --steps "$STEPS" --seed 0
    cp "$WORK/$task/world-estimator-$task.safetensors" src/controlnet/weights/
done
