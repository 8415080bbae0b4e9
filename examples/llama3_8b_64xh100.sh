#!/usr/bin/env bash
# Llama-3.1-8B pretraining on 8 nodes of 8 x H100 80GB (64 GPUs; seq 8192, 512 x 8192 = 4M tokens/step).
#
# LAYOUT is what `PLAN=search bash examples/llama3_8b_64xh100.sh` ranks first: TP2 x DP32 with
# sequence parallelism and no recomputation, 48.4 GB peak per GPU (planner; tests/test_plan_examples.py).
# Run on every node (NODE_RANK=0..7, MASTER_ADDR=<node 0>), or adapt examples/slurm_pretrain.sbatch.
#
#   TOKENIZER=/models/Llama-3.1-8B DATA=/data/corpus_text_document NODE_RANK=0 MASTER_ADDR=node0 \
#       bash examples/llama3_8b_64xh100.sh
set -euo pipefail
GPUS=64
SAVE=${SAVE:-runs/llama3_8b_64}
ARGS=(
  --model-preset llama3.1-8b --seq-length 8192 --bf16
  --micro-batch-size 1 --global-batch-size 512
  --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather
  --train-iters 500000 --lr 3e-4 --min-lr 3e-5 --lr-warmup-iters 2000 --lr-decay-style cosine
  --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0
  --save "$SAVE" --load "$SAVE" --save-interval 2000 --log-interval 10
)
LAYOUT=(--tensor-model-parallel-size 2 --pipeline-model-parallel-size 1 --sequence-parallel)
source "$(dirname "$0")/_plan_or_run.sh"
