#!/usr/bin/env bash
# LIDAS-grown SmolLM-360M as in the paper (App. A; Kapl et al. protocol):
#   start at 4 layers, insert a block of B=4 layers in the layer-wise middle after each stage,
#   k = 32/4 = 8 stages with PROP-1 budgets over T = 170k iterations, then 30k iterations of
#   WSD cooldown at full depth (200k in total) on a math-heavy blend (--cooldown-data-path).
# Growth happens after iterations 4722, 14166, 28333, 47222, 70833, 99166, 132222 (printed at
# start); weights and Adam moments of the copied layers are copied, the LR schedule continues.
#
#   DATA_PATH="/data/smollm-corpus_text_document" \
#   COOLDOWN_DATA_PATH="0.8 /data/smollm-corpus_text_document 0.2 /data/nemotron-cc-math-4plus_text_document" \
#   bash examples/grow_lidas_360m.sh
#
# 512 x 2048 tokens per iteration (~1M; ~200B tokens in total).  Hyper-parameters: keep those of
# the baseline you compare with (the paper does); LR and warmup below are SmolLM-style defaults.
set -euo pipefail
: "${DATA_PATH:?set DATA_PATH to a Megatron dataset prefix (or 'W1 P1 W2 P2 ...')}"
NPROC=${NPROC:-8}
SAVE=${SAVE:-checkpoints/lidas_360m}
LR=${LR:-3e-3}
mkdir -p "$SAVE"
LOAD_ARGS=()  # resume (also across growth steps) when the run was interrupted
if [ -f "$SAVE/latest_checkpointed_iteration.txt" ]; then LOAD_ARGS=(--load "$SAVE"); fi
COOLDOWN_ARGS=()
if [ -n "${COOLDOWN_DATA_PATH:-}" ]; then COOLDOWN_ARGS=(--cooldown-data-path ${COOLDOWN_DATA_PATH}); fi

torchrun --nproc_per_node "$NPROC" -m megatron_growloop.pretrain \
    --model-preset smollm-360m --num-layers 4 \
    --grow-method lidas --grow-block-size 4 --grow-final-layers 32 \
    --grow-schedule prop --grow-alpha 1 --grow-iters 170000 \
    --train-iters 200000 --lr "$LR" --min-lr 0 --lr-warmup-iters 2000 \
    --lr-decay-style WSD --lr-wsd-decay-style linear --lr-wsd-decay-iters 30000 \
    --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0 \
    --micro-batch-size 8 --global-batch-size 512 --seq-length 2048 \
    --bf16 --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather \
    --data-path ${DATA_PATH} "${COOLDOWN_ARGS[@]}" --split 989,10,1 \
    --save "$SAVE" "${LOAD_ARGS[@]}" --save-interval 5000 \
    --log-interval 100 --eval-interval 5000 --eval-iters 20 \
    --metrics-file "$SAVE/metrics.jsonl" "$@"
