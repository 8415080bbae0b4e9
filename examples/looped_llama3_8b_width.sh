#!/usr/bin/env bash
# A looped model of Llama-3.1-8B width: Loop(4-8x3-4) -- 16 unique layers (4.5B parameters), a
# middle block of 8 layers applied 3 times, effective depth 32 (the FLOPs of the 8B per token),
# on 8 nodes of 8 x H100 80GB.  See docs/looping.md for the loop notation.
#
# LAYOUT is what `PLAN=search bash examples/looped_llama3_8b_width.sh` ranks first: TP1 x DP64,
# no recomputation, 73.8 GB peak per GPU -- the loop's 24 block applications each keep their
# activations; SDPA attention keeps no s x s scores (planner; tests/test_plan_examples.py).
#
#   TOKENIZER=/models/Llama-3.1-8B DATA=/data/corpus_text_document NODE_RANK=0 MASTER_ADDR=node0 \
#       bash examples/looped_llama3_8b_width.sh
set -euo pipefail
GPUS=64
SAVE=${SAVE:-runs/looped_llama3_8b}
ARGS=(
  --model-preset llama3.1-8b --loop 4-8x3-4 --seq-length 8192 --bf16
  --micro-batch-size 1 --global-batch-size 512
  --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather
  --train-iters 500000 --lr 3e-4 --min-lr 3e-5 --lr-warmup-iters 2000 --lr-decay-style cosine
  --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0
  --save "$SAVE" --load "$SAVE" --save-interval 2000 --log-interval 10
)
LAYOUT=(--tensor-model-parallel-size 1 --pipeline-model-parallel-size 1)
source "$(dirname "$0")/_plan_or_run.sh"
