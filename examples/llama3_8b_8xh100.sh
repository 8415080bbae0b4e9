#!/usr/bin/env bash
# Llama-3.1-8B pretraining on one node of 8 x H100 80GB (seq 8192, 128 x 8192 = 1M tokens/step).
#
# LAYOUT is what `PLAN=search bash examples/llama3_8b_8xh100.sh` ranks first: TP2 (within the
# node) x DP4 with sequence parallelism and no recomputation, 59.0 GB peak per GPU (planner);
# tests/test_plan_examples.py keeps it so.  Check before booking: PLAN=1 bash examples/llama3_8b_8xh100.sh
#
#   TOKENIZER=/models/Llama-3.1-8B DATA=/data/corpus_text_document bash examples/llama3_8b_8xh100.sh
set -euo pipefail
GPUS=8
SAVE=${SAVE:-runs/llama3_8b}
ARGS=(
  --model-preset llama3.1-8b --seq-length 8192 --bf16
  --micro-batch-size 1 --global-batch-size 128
  --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather
  --train-iters 200000 --lr 3e-4 --min-lr 3e-5 --lr-warmup-iters 2000 --lr-decay-style cosine
  --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0
  --save "$SAVE" --load "$SAVE" --save-interval 2000 --log-interval 10
)
LAYOUT=(--tensor-model-parallel-size 2 --pipeline-model-parallel-size 1 --sequence-parallel)
source "$(dirname "$0")/_plan_or_run.sh"
