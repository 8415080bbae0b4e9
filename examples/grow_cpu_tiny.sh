#!/usr/bin/env bash
# CPU-sized depth growth (~1-2 minutes on a laptop CPU): the tiny preset grown with LIDAS from
# 4 to 12 layers (k = 3, PROP-1 over T = 240 iterations: grows after iterations 40 and 120),
# then a 60-iteration WSD cooldown at full depth.  Byte-level tokenizer, embedded corpus.
#
#   bash examples/grow_cpu_tiny.sh                 # one process
#   NPROC=2 bash examples/grow_cpu_tiny.sh --pipeline-model-parallel-size 2   # two gloo ranks
#
# Then: python -m megatron_growloop.growth.lineage /tmp/growloop_grow_cpu_tiny
set -euo pipefail
NPROC=${NPROC:-1}
SAVE=${SAVE:-/tmp/growloop_grow_cpu_tiny}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
if [ "$NPROC" -gt 1 ]; then LAUNCH=(torchrun --nproc_per_node "$NPROC" -m); else LAUNCH=(python -m); fi

"${LAUNCH[@]}" megatron_growloop.pretrain \
    --model-preset tiny --num-layers 4 --tokenizer-type ByteTokenizer \
    --grow-method lidas --grow-block-size 4 --grow-final-layers 12 \
    --grow-schedule prop --grow-alpha 1 --grow-iters 240 \
    --train-iters 300 --lr 3e-3 --min-lr 0 --lr-warmup-iters 20 \
    --lr-decay-style WSD --lr-wsd-decay-iters 60 \
    --micro-batch-size 4 --seq-length 128 \
    --save "$SAVE" --save-interval 100 --log-interval 20 --eval-interval 100 --eval-iters 4 "$@"
