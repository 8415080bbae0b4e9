#!/usr/bin/env bash
# LIDAS-grown SmolLM-360M as in the paper (App. A; Kapl et al. protocol), one 8-GPU node:
#   start at 4 layers, insert a block of B=4 layers at the layer-wise middle after each stage,
#   k = 32/4 = 8 stages with PROP-1 budgets over T = 170k iterations, then 30k iterations of
#   WSD cooldown at full depth (200k in total) on a math-heavy blend (20% math).
# Growth happens after iterations 4722, 14166, 28333, 47222, 70833, 99166, 132222 (printed at
# start); copied layers bring their Adam moments, the LR schedule continues without reset.
#
#   DATA=/data/smollm_corpus_text_document MATH=/data/nemotron_cc_math_text_document \
#       bash examples/grow_lidas_360m.sh
#
# Global batch 512 x 2048 tokens ~ 1M tokens/step (~200B tokens), the same hyper-parameters as
# the baseline (examples/pretrain_smollm_360m.sh) -- the paper does not retune them for growth.
# Re-running the command resumes (also across growth steps) from $SAVE.
set -euo pipefail
: "${DATA:?set DATA to an indexed-dataset prefix (tools/preprocess_data.py)}"
: "${MATH:?set MATH to the math cooldown prefix}"
NPROC=${NPROC:-8}
SAVE=${SAVE:-runs/lidas_360m}
torchrun --nproc_per_node "$NPROC" ${NNODES:+--nnodes $NNODES} ${NODE_RANK:+--node_rank $NODE_RANK} \
    ${MASTER_ADDR:+--master_addr $MASTER_ADDR} ${MASTER_PORT:+--master_port $MASTER_PORT} \
    -m megatron_growloop.pretrain \
    --model-preset smollm-360m --seq-length 2048 --num-layers 4 \
    --grow-method lidas --grow-block-size 4 --grow-final-layers 32 \
    --grow-schedule prop --grow-alpha 1 --grow-iters 170000 \
    --tensor-model-parallel-size 1 --pipeline-model-parallel-size 1 \
    --micro-batch-size 8 --global-batch-size 512 \
    --train-iters 200000 --lr 3e-3 --min-lr 0 --lr-warmup-iters 2000 \
    --lr-decay-style WSD --lr-wsd-decay-style linear --lr-wsd-decay-iters 30000 \
    --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0 \
    --bf16 --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather \
    --data-path "$DATA" --cooldown-data-path 0.8 "$DATA" 0.2 "$MATH" \
    --tokenizer-type HuggingFaceTokenizer --tokenizer-model HuggingFaceTB/SmolLM-360M \
    --save "$SAVE" --load "$SAVE" --save-interval 5000 \
    --eval-interval 5000 --eval-iters 20 --log-interval 50 "$@"
