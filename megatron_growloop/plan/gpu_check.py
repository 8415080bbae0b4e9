"""The planner's item of the single-GPU check script (``benchmarks/gpu_check.sh``): the peak memory
the planner predicts for a run, as one JSON object, to compare with what the same run measures
(``torch.cuda.max_memory_allocated``; the trainer writes it as ``peak_memory_bytes`` in
``--metrics-file`` records).

    python -m megatron_growloop.plan.gpu_check --model-preset smollm-1.7b --bf16 --mock-data \\
        --vocab-size 49152 --micro-batch-size 4 --seq-length 2048 --use-distributed-optimizer

takes exactly the run's ``pretrain`` flags (``WORLD_SIZE`` from the environment, default 1) and
plans what ``pretrain`` would print at start-up: the same kernels (Transformer Engine when it is
importable on the GPU), the same padded vocabulary.  Output keys: ``predicted_peak_bytes`` (the
largest rank), ``predicted`` (its weights / grads / optimizer / activations / transient bytes),
``layout``, ``kernels`` and ``plan_line``.  :func:`compare` turns a measured peak into the check's
verdict (``ratio`` = measured / predicted).

What ``max_memory_allocated`` sees and the planner does not count: allocator rounding, the
cuBLAS/Transformer Engine workspaces and small per-step temporaries; so the expected ratio is a
little above 1 (the check script states its own tolerance).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict
from typing import Dict, List, Optional

from ..errors import cli_errors
from ..growth.cli import add_growth_args, validate_growth_args
from ..training.arguments import parse_args
from .memory import kernels_of
from .report import startup_line
from .startup import plan_for_run


def predicted_peak(argv: List[str], world_size: Optional[int] = None) -> Dict[str, object]:
    world = int(world_size if world_size is not None else os.environ.get("WORLD_SIZE", "1"))
    launch = parse_args(list(argv), world_size=world, extra_args_providers=[add_growth_args],
                        extra_validators=[validate_growth_args])  # pretrain's flags (pretrain.parse_pretrain_args)
    args = launch.args
    plan = plan_for_run(launch, world)
    lim = plan.limiting_stage
    s = plan.setup
    return {
        "model_preset": args.model_preset,
        "predicted_peak_bytes": lim.peak,
        "predicted": {"weights": lim.weights, "grads": lim.grads, "optimizer": lim.optimizer,
                      "activations": lim.activations, "transient": lim.transient},
        "limiting_pp_rank": lim.pp_rank,
        "params_total": plan.params_total,
        "layout": {"gpus": s.gpus, "tp": s.layout.tp, "pp": s.layout.pp, "dp": s.dp,
                   "sequence_parallel": s.sequence_parallel, "distributed_optimizer": s.distributed_optimizer,
                   "micro_batch_size": s.micro_batch_size, "num_microbatches": s.num_microbatches,
                   "seq_length": s.arch.seq_length, "padded_vocab_size": s.arch.padded_vocab_size,
                   "dtype": s.impl.dtype, "recompute": s.impl.recompute_granularity or "none"},
        "kernels": asdict(kernels_of(s)),
        "plan_line": startup_line(plan),
    }


def compare(prediction: Dict[str, object], measured_peak_bytes: int) -> Dict[str, object]:
    """The check's numbers: measured / predicted peak of the limiting rank."""
    predicted = int(prediction["predicted_peak_bytes"])
    return {"predicted_peak_bytes": predicted, "measured_peak_bytes": int(measured_peak_bytes),
            "ratio": measured_peak_bytes / predicted if predicted else float("nan")}


def main(argv: Optional[List[str]] = None) -> dict:
    with cli_errors("megatron_growloop.plan.gpu_check"):
        out = predicted_peak(sys.argv[1:] if argv is None else argv)
        print(json.dumps(out, indent=1), flush=True)
        return out


if __name__ == "__main__":
    main()
