#!/usr/bin/env bash
# The paper's math cooldown (§5.2, Tables 2-3) for SmolLM-360M-sized runs, one 8-GPU node:
# continue a run from its stable-phase checkpoint at iteration 170000 through the WSD decay
# (the last 30000 of 200000 iterations = 15%) with the blend switched to 80% DATA + 20% MATH
# at iteration 170000 (--cooldown-data-path; the switch defaults to the first decay iteration).
#
#   BASE=runs/smollm_360m DATA=/data/smollm_corpus_text_document \
#   MATH=/data/nemotron_cc_math_text_document bash examples/cooldown_math_360m.sh
#
# BASE: a baseline, LIDAS or looped 360M run stopped at the cooldown start, e.g.
# examples/pretrain_smollm_360m.sh or examples/grow_lidas_360m.sh with --exit-interval 170000.
# Its architecture (depth, loop, lineage) is taken from the checkpoint (--use-checkpoint-args),
# and so are the optimizer state, the LR-schedule position and the data position.
# MATH: without it the synthetic arithmetic and variable-assignment corpus
# (megatron_growloop.data.math_corpus) stands in -- it exercises the recipe, it is not real math
# data (the paper uses FineMath-4+ or Nemotron-CC-Math-4+).
# Re-running the command resumes from $SAVE.  Extra flags are passed on ("$@"); the retrofit
# recipe (examples/retrofit_cooldown_360m.sh) adds --retrofit-loop 8:12:2.
set -euo pipefail
: "${BASE:?set BASE to the pretraining run to cool down (its checkpoint at iteration 170000)}"
: "${DATA:?set DATA to the pretraining indexed-dataset prefix (tools/preprocess_data.py)}"
TOKENIZER=HuggingFaceTB/SmolLM-360M
if [ -z "${MATH:-}" ]; then
    echo "MATH is not set: using the synthetic arithmetic/assignment corpus as math data" >&2
    MATH=$(python -m megatron_growloop.data.math_corpus --tokenizer-model "$TOKENIZER")
fi
NPROC=${NPROC:-8}
SAVE=${SAVE:-runs/cooldown_math_360m}
if [ -f "$SAVE/latest_checkpointed_iteration.txt" ]; then LOAD=$SAVE; else LOAD=$BASE; fi
torchrun --nproc_per_node "$NPROC" ${NNODES:+--nnodes $NNODES} ${NODE_RANK:+--node_rank $NODE_RANK} \
    ${MASTER_ADDR:+--master_addr $MASTER_ADDR} ${MASTER_PORT:+--master_port $MASTER_PORT} \
    -m megatron_growloop.pretrain \
    --model-preset smollm-360m --seq-length 2048 --use-checkpoint-args \
    --tensor-model-parallel-size 1 --pipeline-model-parallel-size 1 \
    --micro-batch-size 8 --global-batch-size 512 \
    --train-iters 200000 --lr 3e-3 --min-lr 0 --lr-warmup-iters 2000 \
    --lr-decay-style WSD --lr-wsd-decay-style linear --lr-wsd-decay-iters 30000 \
    --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0 \
    --bf16 --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather \
    --data-path "$DATA" --cooldown-data-path 0.8 "$DATA" 0.2 "$MATH" \
    --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$TOKENIZER" \
    --load "$LOAD" --save "$SAVE" --save-interval 5000 \
    --eval-interval 5000 --eval-iters 20 --log-interval 50 "$@"
