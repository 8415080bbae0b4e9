#!/usr/bin/env bash
# CPU smoke run: a tiny SmolLM-style model on the embedded default data, 2 processes (DP=2).
# Prints where the checkpoint and tensorboard logs are.
set -euo pipefail
torchrun --nproc_per_node 2 -m megatron_growloop.pretrain \
    --model-preset tiny --train-iters 200 --micro-batch-size 4 --global-batch-size 16 \
    --lr 3e-3 --min-lr 3e-4 --lr-warmup-iters 20 --lr-decay-style cosine \
    --eval-interval 50 --eval-iters 5 --log-interval 10 \
    --save runs/cpu_tiny "$@"
