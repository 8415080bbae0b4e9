"""``python -m megatron_growloop.plan``: will this run fit, with which layout, how fast?

Takes ``pretrain``'s flags (model preset and overrides, ``--loop``, ``--grow-*``, TP/PP, sequence
parallelism, distributed optimizer, batch sizes, ``--recompute-*``, ``--bf16``/FP8) plus the
cluster: ``--gpus N --gpu-memory-gb 80``.  Starts no process group and allocates no weights.

    python -m megatron_growloop.plan --model-preset llama3.1-8b --bf16 --gpus 8 \\
        --tensor-model-parallel-size 2 --sequence-parallel --use-distributed-optimizer \\
        --micro-batch-size 1 --global-batch-size 128 --recompute-granularity selective
    python -m megatron_growloop.plan --model-preset llama3.1-70b --bf16 --gpus 1024 \\
        --global-batch-size 1024 --micro-batch-size 1 --use-distributed-optimizer --search
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from ..errors import UsageError, cli_errors
from ..growth.cli import add_growth_args, plan_from_args, validate_growth_args
from ..model.arch import pad_vocab_size
from ..model.implementation import Implementation
from ..model.parallel import ParallelLayout
from ..model.presets import get_preset
from ..training.arguments import Launch, parse_args
from ..training.resume import resolve_arch
from .inputs import Cluster, RunSetup
from .planner import plan_run
from .report import format_plan, format_search
from .search import search

PROG = "megatron_growloop.plan"


def add_planner_args(parser) -> None:
    g = parser.add_argument_group("cluster and planner")
    g.add_argument("--gpus", type=int, default=None, help="GPUs of the run (default: TP x PP, i.e. DP 1)")
    g.add_argument("--gpu-memory-gb", type=float, default=80.0, help="memory of one GPU, GB (1e9 bytes)")
    g.add_argument("--gpu-peak-tflops", type=float, default=989.0,
                   help="dense bf16 peak of one GPU (H100 SXM 989); FP8 counts twice this")
    g.add_argument("--assume-mfu", type=float, default=0.40,
                   help="model-FLOPs utilisation a GPU reaches without bubbles, recomputation or exposed "
                        "communication; the step time estimate charges those on top")
    g.add_argument("--gpus-per-node", type=int, default=8)
    g.add_argument("--intra-node-bandwidth-gbs", type=float, default=450.0, help="per-GPU NVLink bandwidth, GB/s")
    g.add_argument("--inter-node-bandwidth-gbs", type=float, default=50.0, help="per-GPU network bandwidth, GB/s")
    g.add_argument("--search", action="store_true",
                   help="rank every feasible TP x PP x DP layout (and recomputation setting, unless given) "
                        "for --gpus by estimated step time")
    g.add_argument("--top", type=int, default=15, help="layouts shown by --search (all are in --json)")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    g.add_argument("--plan-device", choices=["cuda", "cpu"], default="cuda",
                   help="plan the GPU kernels (default) or the CPU ones (what the CPU tests measure)")
    g.add_argument("--virtual-pipeline-model-parallel-size", type=int, default=None,
                   help="not supported (megatron_growloop runs one model chunk per pipeline stage)")
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None, help="not supported")


def cluster_from_args(args) -> Cluster:
    for name in ("gpu_memory_gb", "gpu_peak_tflops", "intra_node_bandwidth_gbs", "inter_node_bandwidth_gbs"):
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if not 0 < args.assume_mfu <= 1:
        raise UsageError(f"--assume-mfu must be in (0, 1], got {args.assume_mfu}")
    if args.gpus_per_node < 1:
        raise UsageError(f"--gpus-per-node must be >= 1, got {args.gpus_per_node}")
    return Cluster(gpu_memory_gb=args.gpu_memory_gb, peak_tflops=args.gpu_peak_tflops, assume_mfu=args.assume_mfu,
                   gpus_per_node=args.gpus_per_node, intra_node_gbs=args.intra_node_bandwidth_gbs,
                   inter_node_gbs=args.inter_node_bandwidth_gbs)


def vocab_size_of(args) -> int:
    """The unpadded vocabulary: ``--vocab-size``, else the preset's (the tokenizer is not loaded)."""
    if getattr(args, "vocab_size", None):
        return int(args.vocab_size)
    return int(get_preset(args.model_preset).vocab_size)


def setup_from_launch(launch: Launch, gpus: int, padded_vocab_size: Optional[int] = None,
                      device: str = "cuda") -> RunSetup:
    """The run ``pretrain`` would start with these (validated) flags on ``gpus`` GPUs: the same
    architecture record (a resumed checkpoint's depth and vocabulary padding included)."""
    args = launch.args
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    if padded_vocab_size is None:
        padded_vocab_size = pad_vocab_size(vocab_size_of(args), args.make_vocab_size_divisible_by, tp)
    return RunSetup(
        arch=resolve_arch(args, padded_vocab_size, launch.resume),
        layout=ParallelLayout.from_args(args),
        impl=Implementation.from_args(args),
        dp=gpus // (tp * pp),
        micro_batch_size=args.micro_batch_size,
        global_batch_size=args.global_batch_size,
        distributed_optimizer=bool(args.use_distributed_optimizer),
        overlap_grad_reduce=bool(args.overlap_grad_reduce),
        overlap_param_gather=bool(args.overlap_param_gather),
        growth=plan_from_args(args),
        train_iters=args.train_iters,
        device=device,
        grow_transfer="checkpoint" if getattr(args, "grow_transfer", None) == "checkpoint" else "memory",
        recurrence=getattr(args, "loop_recurrence", None),
    )


def _pre_parse(argv: List[str]):
    """``--gpus``, ``--search`` and TP/PP, needed before the full parse validates against a world size."""
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    p.add_argument("--gpus", type=int, default=None)
    p.add_argument("--search", action="store_true")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--virtual-pipeline-model-parallel-size", type=int, default=None)
    p.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None)
    known, _ = p.parse_known_args(argv)
    return known


def parse(argv: Optional[List[str]] = None) -> Launch:
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = _pre_parse(argv)
    if pre.virtual_pipeline_model_parallel_size or pre.num_layers_per_virtual_pipeline_stage:
        raise UsageError("virtual pipeline stages are not supported: megatron_growloop runs one model chunk per "
                         "pipeline stage (drop --virtual-pipeline-model-parallel-size / "
                         "--num-layers-per-virtual-pipeline-stage)")
    tp, pp = pre.tensor_model_parallel_size, pre.pipeline_model_parallel_size
    if tp < 1 or pp < 1:
        raise UsageError(f"TP and PP sizes must be >= 1, got TP {tp}, PP {pp}")
    gpus = pre.gpus
    if gpus is None:
        if pre.search:
            raise UsageError("--search needs --gpus N")
        gpus = tp * pp
    if gpus < 1:
        raise UsageError(f"--gpus must be >= 1, got {gpus}")
    if gpus % (tp * pp):
        raise UsageError(f"--gpus {gpus} is not a multiple of TP x PP = {tp}x{pp} = {tp * pp}")
    launch = parse_args(argv, world_size=gpus, extra_args_providers=[add_growth_args, add_planner_args],
                        extra_validators=[validate_growth_args], planning=True, prog=PROG)
    launch.args.gpus = gpus
    return launch


def _given(argv: List[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def main(argv: Optional[List[str]] = None) -> dict:
    with cli_errors(PROG):
        launch = parse(argv)
        args = launch.args
        cluster = cluster_from_args(args)
        setup = setup_from_launch(launch, args.gpus, device=args.plan_device)
        if args.search:
            given = list(sys.argv[1:] if argv is None else argv)
            result = search(setup, cluster, vocab_size=vocab_size_of(args),
                            search_recompute=args.recompute_granularity is None,
                            tp_sizes=[setup.layout.tp] if _given(given, "--tensor-model-parallel-size") else None,
                            pp_sizes=[setup.layout.pp] if _given(given, "--pipeline-model-parallel-size") else None)
            out = result.to_json()
            print(json.dumps(out, indent=1) if args.json else format_search(result, args.top), flush=True)
            return out
        plan = plan_run(setup, cluster)
        out = plan.to_json()
        print(json.dumps(out, indent=1) if args.json else format_plan(plan), flush=True)
        return out


if __name__ == "__main__":
    main(sys.argv[1:])
