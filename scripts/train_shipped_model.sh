#!/usr/bin/env bash
# Reproduce the project's shipped model from nothing, with the project's own commands:
#   1. synthetic shape scenes (controlnet data scenes), a training and a held-out set;
#   2. the VAE of the `shapes` preset from scratch (controlnet train --task vae);
#   3. its UNet and text encoder from scratch on that VAE (--task base);
#   4. a Canny ControlNet on the frozen base (the default task);
#   5. the evaluation of the ControlNet and of the base alone on the held-out set (controlnet eval).
#
# Every stage resumes from its last checkpoint (--resume latest) and a finished stage is skipped,
# so after an interruption run the script again. Working state lives outside the work tree, in
# $WORK (default ~/.cache/controlnet-shipped). Run it in the background:
#
#   nohup scripts/train_shipped_model.sh > ~/.cache/controlnet-shipped.log 2>&1 &
#
# SMOKE=1 shrinks every stage to a few steps: a check that the whole chain runs (about a minute).
set -euo pipefail

cd "$(dirname "$0")/.."
CONTROLNET=${CONTROLNET:-.venv/bin/controlnet}
WORK=${WORK:-$HOME/.cache/controlnet-shipped}
SIZE=128
if [[ "${SMOKE:-0}" == "1" ]]; then
    TRAIN_COUNT=64 HELD_OUT=8 VAE_STEPS=4 BASE_STEPS=4 CN_STEPS=4 EVAL_COUNT=2 EVAL_IMAGES=1 EVERY=2
else
    TRAIN_COUNT=${TRAIN_COUNT:-20000} HELD_OUT=${HELD_OUT:-200}
    VAE_STEPS=${VAE_STEPS:-2000} BASE_STEPS=${BASE_STEPS:-3000} CN_STEPS=${CN_STEPS:-2000}
    EVAL_COUNT=${EVAL_COUNT:-100} EVAL_IMAGES=${EVAL_IMAGES:-4} EVERY=${EVERY:-500}
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
    --mixed-precision bf16
stage base "$WORK/base/base.safetensors" --task base --model-config shapes --base "$WORK/vae/vae.safetensors" \
    --data "$WORK/data" --out "$WORK/base" --max-steps "$BASE_STEPS" --batch-size 32 --learning-rate 5e-4 \
    --lr-schedule cosine --lr-warmup-steps 200 --proportion-empty-prompts 0.1 --ema-decay 0.999
stage controlnet "$WORK/controlnet/controlnet.safetensors" --base "$WORK/base/base.safetensors" \
    --data "$WORK/data" --out "$WORK/controlnet" --max-steps "$CN_STEPS" --batch-size 32 --learning-rate 1e-4 \
    --lr-warmup-steps 100 --ema-decay 0.999

# 5. Scores on the held-out scenes, with the ControlNet and from the prompts alone.
"$CONTROLNET" eval --data "$WORK/held-out" --base "$WORK/base/base.safetensors" \
    --controlnet "$WORK/controlnet/controlnet.safetensors" --out "$WORK/eval-control" \
    --count "$EVAL_COUNT" --images-per-condition "$EVAL_IMAGES"
"$CONTROLNET" eval --data "$WORK/held-out" --base "$WORK/base/base.safetensors" --no-control \
    --out "$WORK/eval-base" --count "$EVAL_COUNT" --images-per-condition "$EVAL_IMAGES"
echo "$(date -u +%FT%TZ) shipped model: all stages done; weights in $WORK/{base,controlnet}"
