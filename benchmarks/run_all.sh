#!/usr/bin/env bash
# Every CPU benchmark of docs/benchmarks.md, in sequence (run on an otherwise idle machine).
#   bash benchmarks/run_all.sh            # ~20-25 min on 2 cores; JSON in benchmarks/results/
set -euo pipefail
cd "$(dirname "$0")/.."
R=benchmarks/results
export PYTHONWARNINGS=ignore
python benchmarks/train_throughput.py --out $R/train_throughput_cpu.json
OMP_NUM_THREADS=1 python benchmarks/looping.py
python benchmarks/growth.py --repeats 3 --iters 10 --json $R/growth.json
python benchmarks/growth.py --repeats 3 --iters 10 --grow-transfer checkpoint --json $R/growth_checkpoint.json
OMP_NUM_THREADS=1 python -m torch.distributed.run --nproc_per_node 2 benchmarks/growth.py --repeats 2 --method midas \
    --pipeline-model-parallel-size 2 --json $R/growth_pp2_midas.json
OMP_NUM_THREADS=1 python -m torch.distributed.run --nproc_per_node 2 benchmarks/growth.py --repeats 2 --method midas \
    --pipeline-model-parallel-size 2 --grow-transfer checkpoint --json $R/growth_pp2_midas_checkpoint.json
python benchmarks/convert.py --rounds 3
HF=$(python -c "from megatron_growloop.convert import smollm2_hf_dir; print(smollm2_hf_dir())")
python benchmarks/eval.py --hf "$HF" --tasks copy_random,va_basic_d2 --limit 5 --out $R/eval.json
python benchmarks/plan_search.py --repeats 5
python benchmarks/plan_accuracy.py
python benchmarks/attention_backends.py --presets small smollm-135m --out $R/attention_backends_cpu.json
OMP_NUM_THREADS=1 python benchmarks/cpu_vs_hf.py --out $R/cpu_vs_hf.json
python benchmarks/init_cost.py --preset smollm-1.7b --out $R/init_cost.json
python benchmarks/ckpt_reliability.py --preset smollm-135m --rounds 3 --out $R/ckpt_reliability.json
OMP_NUM_THREADS=1 python benchmarks/recurrence.py
OMP_NUM_THREADS=1 python benchmarks/recurrence.py --hidden 128 --backprop-depth 2 --memory-depths 1 \
    --out $R/recurrence_truncated.json
python benchmarks/sft.py --out $R/sft.json
