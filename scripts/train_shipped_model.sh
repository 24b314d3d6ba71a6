#!/usr/bin/env bash
# Reproduce the project's shipped model from nothing, with the project's own commands:
#   1. synthetic shape scenes (controlnet data scenes), a training and a held-out set;
#   2. the VAE of the `shapes` preset from scratch (controlnet train --task vae);
#   3. its UNet and text encoder from scratch on that VAE (--task base);
#   4. a Canny ControlNet on the frozen base (the default task);
#   5. the evaluation of the ControlNet and of the base alone on the held-out set (controlnet eval);
#   6. the package's float16 files (src/controlnet/weights/).
#
# Every stage resumes from its last checkpoint (--resume latest) and a finished stage is skipped,
# so after an interruption run the script again. Working state lives outside the work tree, in
# $WORK (default ~/.cache/controlnet-shipped). Run it in the background:
#
#   nohup scripts/train_shipped_model.sh > ~/.cache/controlnet-shipped.log 2>&1 &
#
# SMOKE=1 shrinks every stage to a few steps: a check that the whole chain runs (about a minute).
# `scripts/train_shipped_model.sh experiment` then also runs the zero-convolution ablation
# (docs/experiments.md) and draws its figures.
set -euo pipefail

cd "$(dirname "$0")/.."
CONTROLNET=${CONTROLNET:-.venv/bin/controlnet}
WORK=${WORK:-$HOME/.cache/controlnet-shipped}
SIZE=128
if [[ "${SMOKE:-0}" == "1" ]]; then
    TRAIN_COUNT=64 HELD_OUT=8 VAE_STEPS=4 BASE_STEPS=4 CN_STEPS=4 EVAL_COUNT=2 EVAL_IMAGES=1 EVERY=2 CN_VALIDATE_EVERY=2
else
    TRAIN_COUNT=${TRAIN_COUNT:-20000} HELD_OUT=${HELD_OUT:-200}
    VAE_STEPS=${VAE_STEPS:-2000} BASE_STEPS=${BASE_STEPS:-3000} CN_STEPS=${CN_STEPS:-2000}
    EVAL_COUNT=${EVAL_COUNT:-100} EVAL_IMAGES=${EVAL_IMAGES:-4} EVERY=${EVERY:-500}
    CN_VALIDATE_EVERY=${CN_VALIDATE_EVERY:-100}
fi
mkdir -p "$WORK"
echo "$(date -u +%FT%TZ) shipped model: work folder $WORK"

stage() {  # stage NAME EXPORT_FILE ARGS...: train unless its export exists, resuming if it can
    local name=$1 export=$2
    shift 2
    if [[ -e "$export" ]]; then
        echo "$(date -u +%FT%TZ) $name: done already ($export)"
        return
    fi
    echo "$(date -u +%FT%TZ) $name: training"
    "$CONTROLNET" train --resume latest --checkpoint-every "$EVERY" --validate-every "$EVERY" \
        --log-every 50 --seed 0 "$@"
    echo "$(date -u +%FT%TZ) $name: finished"
}

# 1. Data: the held-out set uses another seed, so no scene is in both.
[[ -e "$WORK/data/prompt.json" ]] || "$CONTROLNET" data scenes --out "$WORK/data" --count "$TRAIN_COUNT" --size $SIZE --seed 0
[[ -e "$WORK/held-out/prompt.json" ]] || "$CONTROLNET" data scenes --out "$WORK/held-out" --count "$HELD_OUT" --size $SIZE --seed 1

# 2-4. The models.
stage vae "$WORK/vae/vae.safetensors" --task vae --model-config shapes --data "$WORK/data" --out "$WORK/vae" \
    --max-steps "$VAE_STEPS" --batch-size 16 --learning-rate 1e-3 --lr-schedule cosine --lr-warmup-steps 100 \
    --mixed-precision bf16 --gradient-loss-weight 1.0
stage base "$WORK/base/base.safetensors" --task base --model-config shapes --base "$WORK/vae/vae.safetensors" \
    --data "$WORK/data" --out "$WORK/base" --max-steps "$BASE_STEPS" --batch-size 32 --learning-rate 5e-4 \
    --lr-schedule cosine --lr-warmup-steps 200 --proportion-empty-prompts 0.1 --ema-decay 0.999
# The ControlNet validates often (8 scenes): its curves are the zero-convolution run of the
# experiment below. No EMA (nor has the original's ControlNet training): over 2000 steps an average
# with decay 0.999 would lag the sudden convergence by about a thousand steps.
CONTROLNET_SETTINGS=(--base "$WORK/base/base.safetensors" --data "$WORK/data" --max-steps "$CN_STEPS"
    --batch-size 32 --learning-rate 1e-3 --lr-warmup-steps 100
    --validate-every "$CN_VALIDATE_EVERY" --validation-count 8)
stage controlnet "$WORK/controlnet/controlnet.safetensors" "${CONTROLNET_SETTINGS[@]}" --out "$WORK/controlnet"

# 5. Scores on the held-out scenes, with the ControlNet and from the prompts alone.
[[ -e "$WORK/eval-control/results.json" ]] || "$CONTROLNET" eval --data "$WORK/held-out" \
    --base "$WORK/base/base.safetensors" --controlnet "$WORK/controlnet/controlnet.safetensors" \
    --out "$WORK/eval-control" --count "$EVAL_COUNT" --images-per-condition "$EVAL_IMAGES"
[[ -e "$WORK/eval-base/results.json" ]] || "$CONTROLNET" eval --data "$WORK/held-out" \
    --base "$WORK/base/base.safetensors" --no-control \
    --out "$WORK/eval-base" --count "$EVAL_COUNT" --images-per-condition "$EVAL_IMAGES"

# 6. The package's files, in float16 (half the size; the weights are used in bf16 or fp16 anyway).
# A SMOKE run writes them into its work folder, never over the shipped ones.
SHIP_TO=${SHIP_TO:-$([[ "${SMOKE:-0}" == "1" ]] && echo "$WORK/ship" || echo src/controlnet/weights)}
mkdir -p "$SHIP_TO"
"$CONTROLNET" convert "$WORK/base/base.safetensors" "$SHIP_TO/shapes.safetensors" --to ldm --dtype fp16 --overwrite
"$CONTROLNET" convert "$WORK/controlnet/controlnet.safetensors" "$SHIP_TO/shapes-canny.safetensors" \
    --to ldm --dtype fp16 --overwrite
echo "$(date -u +%FT%TZ) shipped model: all stages done; package files in $SHIP_TO"

# 7. The paper's ablation (docs/experiments.md), only when asked: `train_shipped_model.sh experiment`.
# The same ControlNet training with its zero convolutions initialised from a Gaussian instead; then
# the figures in docs/experiments/ from both runs.
if [[ "${1:-}" == "experiment" ]]; then
    stage gaussian "$WORK/controlnet-gaussian/controlnet.safetensors" "${CONTROLNET_SETTINGS[@]}" \
        --control-init gaussian --out "$WORK/controlnet-gaussian"
    "${PYTHON:-.venv/bin/python}" scripts/experiment_figures.py --zero "$WORK/controlnet" \
        --gaussian "$WORK/controlnet-gaussian" --out "${FIGURES:-docs/experiments}"
    echo "$(date -u +%FT%TZ) experiment: done; figures in ${FIGURES:-docs/experiments}"
fi
