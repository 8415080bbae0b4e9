#!/usr/bin/env bash
# The fine-tuning real run of docs/evaluation.md (the paper's Fig. 8 protocol at CPU scale):
# SmolLM2-135M-Instruct (the real-weights fixture), plain and with its middle block 13:17
# repeated (fine-tuned and evaluated with layers 13-16 applied twice: retrofitted recurrence),
# fine-tuned on N in {64, 256} examples of va_code_d1 + va_code_d2 (equal shares) x 2 data
# seeds, evaluated 0-shot on 50 held-out items per task; N = 0 is the model as it is.
# ~40 minutes on 2 shared CPU cores (one process).  Rerunning keeps finished cells.
#
#   bash examples/sft_smollm2_real_run.sh                     # -> runs/sft_smollm2/sft.{json,png}
#   OUT=docs/figures/eval bash examples/sft_smollm2_real_run.sh
set -euo pipefail
OUT=${OUT:-runs/sft_smollm2}
export PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1
HF=$(python -c "from megatron_growloop.convert import smollm2_hf_dir; print(smollm2_hf_dir())")
python -m megatron_growloop.eval sweep sft \
    --model "label=SmolLM2-135M,hf=$HF" \
    --model "label=SmolLM2-135M 13:17 x2,hf=$HF,retrofit_loop=13:17:2" \
    --sft-tasks va_code_d1,va_code_d2 --examples 0,64,256 --seeds 0,1 \
    --limit 50 --num-fewshot 0 --template fill_blank \
    --finetune-args "--seq-length 256 --micro-batch-size 4 --global-batch-size 4 --epochs 2 --lr 1e-4 \
--lr-warmup-fraction 0.1 --lr-decay-style cosine --min-lr 0 --weight-decay 0.0 --log-interval 5" \
    --out "$OUT/smollm2_sft.json" "$@"
