#!/usr/bin/env bash
# LIDAS growth of a Llama-3.1-8B-width model from 16 layers (4.5B parameters) to 32 (8.0B) in
# blocks of 4 under pipeline parallelism 4, on 4 nodes of 8 x H100 80GB (32 GPUs): PROP-1
# stages of 16/20/24/28/32 layers over 80k iterations, then 20k at full depth (WSD cooldown).
# At every growth step layers move between the 4 pipeline stages (exchanged in memory) and the
# stages are re-balanced; see docs/growth.md.
#
# PP4 is fixed; LAYOUT is what `PLAN=search bash examples/lidas_llama3_4b_to_8b_pp4.sh` ranks
# first with it: TP2 x DP4 with sequence parallelism, no recomputation, 30.0 GB peak per GPU over
# all growth stages and steps (planner; tests/test_plan_examples.py).
#
#   TOKENIZER=/models/Llama-3.1-8B DATA=/data/corpus_text_document NODE_RANK=0 MASTER_ADDR=node0 \
#       bash examples/lidas_llama3_4b_to_8b_pp4.sh
set -euo pipefail
GPUS=32
SAVE=${SAVE:-runs/lidas_llama3_8b}
ARGS=(
  --model-preset llama3.1-8b --num-layers 16 --seq-length 8192 --bf16
  --grow-method lidas --grow-block-size 4 --grow-final-layers 32 --grow-schedule prop --grow-alpha 1
  --grow-iters 80000 --train-iters 100000
  --pipeline-model-parallel-size 4
  --micro-batch-size 1 --global-batch-size 256
  --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather
  --lr 3e-4 --min-lr 0 --lr-warmup-iters 2000 --lr-decay-style WSD --lr-wsd-decay-style linear
  --lr-wsd-decay-iters 20000 --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0
  --save "$SAVE" --load "$SAVE" --save-interval 2000 --log-interval 10
)
LAYOUT=(--tensor-model-parallel-size 2 --sequence-parallel)
source "$(dirname "$0")/_plan_or_run.sh"
