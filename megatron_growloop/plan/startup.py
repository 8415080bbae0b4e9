"""The planner's line for ``pretrain``'s own layout, printed at start-up (as Megatron-LM prints
its theoretical memory report, ``megatron/training/theoretical_memory_usage.py``), and
``pretrain --dry-run``, which stops there."""

from __future__ import annotations

import os

import torch

from .. import platform
from ..data.tokenizer import build_tokenizer
from ..model.arch import pad_vocab_size
from ..training.arguments import Launch
from .cli import setup_from_launch
from .inputs import Cluster
from .planner import Plan, plan_run
from .report import startup_line


def padded_vocab_for_run(args) -> int:
    """The padded vocabulary the trainer computes: the tokenizer's (``--vocab-size`` with
    ``--mock-data``), padded for TP; a resumed checkpoint's padding wins (``resolve_arch``)."""
    if args.mock_data and args.vocab_size is not None:
        vocab = args.vocab_size
    else:
        vocab = build_tokenizer(args.tokenizer_type, args.tokenizer_model).vocab_size  # cached for the trainer
    return pad_vocab_size(vocab, args.make_vocab_size_divisible_by, args.tensor_model_parallel_size)


def plan_for_run(launch: Launch, world_size: int) -> Plan:
    device = "cuda" if platform.has_cuda() else "cpu"
    setup = setup_from_launch(launch, world_size, padded_vocab_size=padded_vocab_for_run(launch.args), device=device)
    return plan_run(setup, Cluster(gpu_memory_gb=_device_memory_gb()))


def _device_memory_gb() -> float:
    if platform.has_cuda():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 1e9
    return Cluster().gpu_memory_gb


def announce(launch: Launch, world_size: int) -> Plan:
    """Print the planner's line on rank 0 and return the plan."""
    plan = plan_for_run(launch, world_size)
    if os.environ.get("RANK", "0") == "0":
        print(startup_line(plan), flush=True)
    return plan
