#!/usr/bin/env bash
# CPU-sized math cooldown (a few minutes on a laptop CPU): the recipe of
# examples/cooldown_math_360m.sh at toy scale.  A 12-layer tiny model (hidden 64, byte tokenizer)
# is pretrained on the embedded corpus for the 170-iteration stable phase of a 200-iteration WSD
# schedule (skipped when $BASE already holds it), then cooled down for the last 30 iterations
# (15%) with the blend switched to 80% embedded corpus + 20% math.
#
#   bash examples/cooldown_math_cpu.sh                       # one process
#   NPROC=2 bash examples/cooldown_math_cpu.sh --pipeline-model-parallel-size 2
#
# MATH defaults to the synthetic arithmetic and variable-assignment corpus
# (megatron_growloop.data.math_corpus); DATA to the embedded default corpus.
# examples/retrofit_cooldown_cpu.sh runs the same with --retrofit-loop 8:12:2.
set -euo pipefail
NPROC=${NPROC:-1}
BASE=${BASE:-/tmp/growloop_cooldown_cpu_base}
SAVE=${SAVE:-/tmp/growloop_cooldown_math_cpu}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
if [ "$NPROC" -gt 1 ]; then LAUNCH=(torchrun --nproc_per_node "$NPROC" -m); else LAUNCH=(python -m); fi
DATA=${DATA:-$(python -m megatron_growloop.data.math_corpus --tokenizer-type ByteTokenizer --default)}
MATH=${MATH:-$(python -m megatron_growloop.data.math_corpus --tokenizer-type ByteTokenizer)}
SCHEDULE=(--model-preset tiny --num-layers 12 --tokenizer-type ByteTokenizer --seq-length 128
          --micro-batch-size 4 --global-batch-size 8 --train-iters 200 --lr 3e-3 --min-lr 0
          --lr-warmup-iters 10 --lr-decay-style WSD --lr-wsd-decay-style linear --lr-wsd-decay-iters 30
          --log-interval 10 --data-path "$DATA")
if [ ! -f "$BASE/latest_checkpointed_iteration.txt" ]; then
    echo "stable phase: iterations 1-170 -> $BASE" >&2
    "${LAUNCH[@]}" megatron_growloop.pretrain "${SCHEDULE[@]}" --exit-interval 170 --save "$BASE"
fi
if [ -f "$SAVE/latest_checkpointed_iteration.txt" ]; then LOAD=$SAVE; else LOAD=$BASE; fi
echo "cooldown: iterations 171-200 with 20% math -> $SAVE" >&2
"${LAUNCH[@]}" megatron_growloop.pretrain "${SCHEDULE[@]}" --use-checkpoint-args \
    --cooldown-data-path 0.8 "$DATA" 0.2 "$MATH" --load "$LOAD" --save "$SAVE" \
    --eval-interval 10 --eval-iters 4 "$@"
