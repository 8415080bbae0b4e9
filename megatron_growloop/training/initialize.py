"""Process-group, parallel-state and RNG initialisation (Megatron-LM's ``initialize``)."""

from __future__ import annotations

import datetime
import os
import random
import socket

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from .. import platform


def init_distributed(
    tp: int = 1, pp: int = 1, backend: str | None = None, timeout_minutes: int = 10, seed: int = 1234,
    te_rng_tracker: bool = False, use_cudagraphable_rng: bool = False,
) -> None:
    """Start torch.distributed (env:// from torchrun, or a 1-process group), megatron-core's
    parallel state and its RNG tracker.  Idempotent for the process group.

    ``te_rng_tracker``/``use_cudagraphable_rng``: the RNG tracker CUDA graphs need, set as
    Megatron-LM's ``initialize.py`` does (``use_cudagraphable_rng=args.cuda_graph_impl != "none"``)."""
    device = platform.setup()
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        backend = backend or ("nccl" if device == "cuda" else "gloo")
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        distributed_timeout_minutes=timeout_minutes,
    )
    set_seed(seed, te_rng_tracker, use_cudagraphable_rng)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_seed(seed: int, te_rng_tracker: bool = False, use_cudagraphable_rng: bool = False) -> None:
    """Seed every RNG; pipeline stages get different seeds as in Megatron-LM, and the
    tensor-parallel tracker gets Megatron's per-TP-rank seeds (graph-safe when CUDA graphs
    are used: megatron-core asserts otherwise when a layer is captured)."""
    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed, te_rng_tracker=te_rng_tracker, use_cudagraphable_rng=use_cudagraphable_rng,
                                    force_reset_rng=True)


def rng_options(args) -> dict:
    """The RNG-tracker options of a run: Megatron-LM's ``initialize.py`` makes the RNG graph-safe
    whenever CUDA graphs are on, and ``arguments.py`` turns on the TE tracker for them."""
    graphs = getattr(args, "cuda_graph_impl", "none") not in (None, "none")
    te = bool(getattr(args, "te_rng_tracker", False)) or (
        graphs and "transformer_engine" in (args.transformer_impl, args.cuda_graph_impl))
    return {"te_rng_tracker": te, "use_cudagraphable_rng": graphs}


def teardown() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0
