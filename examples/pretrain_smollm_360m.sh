#!/usr/bin/env bash
# SmolLM-360M baseline on one 8-GPU node (bf16, Transformer Engine spec, distributed optimizer),
# WSD schedule with the paper's cooldown: 200k steps, the last 30k (15%) with a math-heavy blend.
#
#   DATA=/data/smollm_corpus_text_document MATH=/data/nemotron_cc_math_text_document \
#       bash examples/pretrain_smollm_360m.sh
#
# Global batch 512 x 2048 tokens ~ 1M tokens/step, as in the SmolLM recipes the paper follows.
set -euo pipefail
: "${DATA:?set DATA to an indexed-dataset prefix (tools/preprocess_data.py)}"
: "${MATH:?set MATH to the math cooldown prefix}"
NPROC=${NPROC:-8}
torchrun --nproc_per_node "$NPROC" ${NNODES:+--nnodes $NNODES} ${NODE_RANK:+--node_rank $NODE_RANK} \
    ${MASTER_ADDR:+--master_addr $MASTER_ADDR} ${MASTER_PORT:+--master_port $MASTER_PORT} \
    -m megatron_growloop.pretrain \
    --model-preset smollm-360m --seq-length 2048 \
    --tensor-model-parallel-size 1 --pipeline-model-parallel-size 1 \
    --micro-batch-size 8 --global-batch-size 512 \
    --train-iters 200000 --lr 3e-3 --min-lr 0 --lr-warmup-iters 2000 \
    --lr-decay-style WSD --lr-wsd-decay-style linear --lr-wsd-decay-iters 30000 \
    --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0 \
    --bf16 --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather \
    --data-path "$DATA" --cooldown-data-path 0.8 "$DATA" 0.2 "$MATH" \
    --tokenizer-type HuggingFaceTokenizer --tokenizer-model HuggingFaceTB/SmolLM-360M \
    --save "${SAVE:-runs/smollm_360m}" --load "${SAVE:-runs/smollm_360m}" --save-interval 5000 \
    --eval-interval 5000 --eval-iters 20 --log-interval 50 "$@"
