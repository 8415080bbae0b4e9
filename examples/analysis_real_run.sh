#!/usr/bin/env bash
# The analysis real run of docs/analysis.md: four small models trained on CPU with the
# project's own recipes (baseline, LIDAS-grown, Loop(2x4), Loop(2-2x2-2); all 8 layer
# applications deep, `small` preset, 300 iterations on the embedded corpus), `analysis all`
# on each and on SmolLM2-135M-Instruct (the real-weights fixture), then `compare`.
#
#   bash examples/analysis_real_run.sh                  # everything (~1.5-2 h on 2 CPU cores)
#   STEPS="analyse compare" bash examples/analysis_real_run.sh   # reuse trained models
#   OUT=docs/figures/analysis bash examples/analysis_real_run.sh # where the figures go
set -euo pipefail
RUNS=${RUNS:-runs/analysis_models}
OUT=${OUT:-runs/analysis_out}
STEPS=${STEPS:-"train analyse smollm2 compare"}
JOBS=${JOBS:-2}  # analyses run in parallel, one thread each
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1
mkdir -p "$RUNS" "$OUT"

COMMON="--model-preset small --train-iters 300 --micro-batch-size 4 --lr 3e-3 --lr-warmup-iters 20
        --lr-decay-style cosine --log-interval 50 --seed 1234"
MODELS=("baseline:Baseline" "lidas:LIDAS(B=2)" "loop_2x4:Loop(2x4)" "loop_2-2x2-2:Loop(2-2x2-2)")

if [[ " $STEPS " == *" train "* ]]; then
  python -m megatron_growloop.pretrain $COMMON --save "$RUNS/baseline" --metrics-file "$RUNS/baseline.jsonl"
  python -m megatron_growloop.pretrain $COMMON --num-layers 2 --grow-method lidas --grow-block-size 2 \
      --grow-final-layers 8 --grow-iters 220 --save "$RUNS/lidas" --metrics-file "$RUNS/lidas.jsonl"
  python -m megatron_growloop.pretrain $COMMON --num-layers 2 --loop 2x4 \
      --save "$RUNS/loop_2x4" --metrics-file "$RUNS/loop_2x4.jsonl"
  python -m megatron_growloop.pretrain $COMMON --num-layers 6 --loop 2-2x2-2 \
      --save "$RUNS/loop_2-2x2-2" --metrics-file "$RUNS/loop_2-2x2-2.jsonl"
fi

analyse() {  # analyse NAME LABEL
  python -m megatron_growloop.analysis all --load "$RUNS/$1" --label "$2" \
    --data default --num-prompts 16 --seq-len 128 --batch-size 4 --num-splits 4 \
    --lens-prompts 32 --lens-steps 20 --lens-batch-size 2 --lens-init lstsq \
    --task va_basic_d0 --template continuation --task-items 40 --swap-items 40 --swap-widths 1,2 \
    --with-sweeps --tasks va_basic_d0,copy_random --limit 40 --block-size 2 --repeats 1,2,3 \
    --shots 0,1,2,5 --out "$OUT/$1" > "$OUT/$1.log" 2>&1
  echo "analysed $1 -> $OUT/$1"
}

if [[ " $STEPS " == *" analyse "* ]]; then
  for pair in "${MODELS[@]}"; do
    analyse "${pair%%:*}" "${pair#*:}" &
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done
  done
  wait
fi

if [[ " $STEPS " == *" smollm2 "* ]]; then
  HF=$(python -c "from megatron_growloop.convert import smollm2_hf_dir; print(smollm2_hf_dir())")
  python -m megatron_growloop.analysis all --hf "$HF" --label SmolLM2-135M-Instruct \
    --data pydoc --num-prompts 16 --seq-len 128 --batch-size 4 --num-splits 2 \
    --lens-prompts 32 --lens-steps 10 --lens-batch-size 2 --lens-init lstsq \
    --task copy_real --template continuation --task-items 40 --swap-items 40 --swap-widths 1,2 \
    --swap-positions 0:29:2 --out "$OUT/smollm2" > "$OUT/smollm2.log" 2>&1
  echo "analysed SmolLM2 -> $OUT/smollm2"
fi

if [[ " $STEPS " == *" compare "* ]]; then
  python -m megatron_growloop.analysis compare "$OUT/baseline" "$OUT/lidas" "$OUT/loop_2x4" "$OUT/loop_2-2x2-2" \
    --out "$OUT/compare_small"
  python -m megatron_growloop.analysis compare "$OUT/baseline" "$OUT/lidas" "$OUT/loop_2x4" "$OUT/loop_2-2x2-2" \
    "$OUT/smollm2" --normalize-depth --out "$OUT/compare_all"
fi
