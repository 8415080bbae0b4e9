"""Platform selection: the one place that knows whether we run on GPU or CPU.

On a GPU machine nothing here changes torch or megatron-core; on a CPU-only
machine :func:`setup` installs :mod:`megatron_growloop.platform.cpu`.
"""

from __future__ import annotations

import os

import torch

from . import cpu

__all__ = ["setup", "has_cuda", "te_importable", "dist_backend", "device", "cpu"]


def has_cuda() -> bool:
    """True when a real CUDA device is usable (the CPU layer is never needed then)."""
    if cpu.is_active():
        return False
    return torch.cuda.is_available()


def setup() -> str:
    """Prepare the process for megatron-core; return ``"cuda"`` or ``"cpu"``.

    Idempotent.  On CPU, also limits intra-op threads to what ``OMP_NUM_THREADS``
    asks for (torchrun sets it to 1 per worker), so that several ranks on one
    small machine do not oversubscribe it.
    """
    if torch.cuda.is_available() and not cpu.is_active():
        return "cuda"
    cpu.activate()
    threads = os.environ.get("OMP_NUM_THREADS")
    if threads and threads.isdigit() and int(threads) > 0:
        torch.set_num_threads(int(threads))
    return "cpu"


def dist_backend() -> str:
    """The torch.distributed backend for this platform (nccl on GPU, gloo on CPU)."""
    return "nccl" if has_cuda() else "gloo"


def device() -> torch.device:
    """The device tensors of this rank live on."""
    if has_cuda():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def te_importable() -> bool:
    """True when Transformer Engine's PyTorch part imports (an optional dependency)."""
    try:
        import transformer_engine.pytorch  # noqa: F401

        return True
    except Exception:
        return False
