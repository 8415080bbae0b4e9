"""CPU compatibility layer for megatron-core.

megatron-core assumes CUDA: it allocates buffers with ``device="cuda"`` or
``device=torch.cuda.current_device()``, calls ``torch.cuda.synchronize()``,
keeps its tensor-parallel RNG in CUDA generators and checks ``Tensor.type()``
against ``torch.cuda.*Tensor`` names.  On a machine without a GPU this module
maps all of that onto the CPU so that the *unmodified* megatron-core code paths
(GPTModel, pipeline schedules, DistributedDataParallel, the distributed
optimizer, torch_dist checkpoints) run over gloo.

Everything lives here and nowhere else.  :func:`activate` is a no-op when CUDA
is available, so nothing of this is ever used on a GPU machine.

What it does, exactly:

* a :class:`torch.overrides.TorchFunctionMode` that rewrites CUDA device
  arguments (``"cuda"``, ``"cuda:N"``, ``torch.device("cuda")``, integer device
  ordinals) to ``"cpu"`` in every torch call, turns ``Tensor.cuda()`` and
  ``Tensor.pin_memory()`` into no-ops and answers ``Tensor.type()`` with the
  CUDA type names Megatron's optimizers check;
* ``Module.cuda()`` is a no-op;
* ``torch.cuda.current_device/synchronize/set_device/empty_cache`` and the
  memory statistics become harmless; streams and events become inert objects;
* autograd's engine entry point re-enters the mode, so that code run during a
  backward pass (megatron's re-entrant activation recomputation re-runs whole
  layer forwards there) still sees CUDA requests mapped to the CPU -- a
  ``Tensor.backward()`` call reaches the engine from inside the mode's own
  handler, where torch has popped the mode off the stack;
* the "CUDA" RNG (``torch.cuda.get_rng_state``/``set_rng_state``/``manual_seed``
  and megatron's ``_get_cuda_rng_state``/``_set_cuda_rng_state``) is the CPU
  default generator, so Megatron's RNG tracker forks and restores the state that
  CPU kernels (dropout, init) actually draw from.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any

import torch
import torch.autograd as autograd
import torch.autograd.graph as graph
from megatron.core.tensor_parallel import random as mrandom
from torch.overrides import TorchFunctionMode

__all__ = ["activate", "is_active", "map_device", "CudaToCpuMode"]

_LOCK = threading.Lock()
_STATE: dict[str, Any] = {"active": False, "mode": None, "saved": {}}

_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
    torch.float64: "torch.cuda.DoubleTensor",
    torch.int64: "torch.cuda.LongTensor",
    torch.int32: "torch.cuda.IntTensor",
    torch.uint8: "torch.cuda.ByteTensor",
    torch.bool: "torch.cuda.BoolTensor",
}


def map_device(device: Any) -> Any:
    """Return ``"cpu"`` for any CUDA device spelling, else ``device`` unchanged."""
    if device is None:
        return None
    if isinstance(device, torch.device):
        return torch.device("cpu") if device.type == "cuda" else device
    if isinstance(device, str):
        return "cpu" if device.startswith("cuda") else device
    if isinstance(device, int) and not isinstance(device, bool):
        # Without CUDA every integer ordinal refers to a CUDA device.
        return "cpu"
    return device


def _is_device_like(x: Any) -> bool:
    return isinstance(x, torch.device) or (isinstance(x, str) and x.startswith("cuda")) or (
        isinstance(x, int) and not isinstance(x, bool)
    )


class CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device requests to the CPU for every torch function call."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if kwargs:
            if "device" in kwargs:
                kwargs["device"] = map_device(kwargs["device"])
            if kwargs.get("pin_memory"):
                kwargs["pin_memory"] = False
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.pin_memory:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            t = args[0]
            if t.device.type == "cpu":
                return _CUDA_TYPE_NAMES.get(t.dtype, func(*args))
            return func(*args)
        if func is torch.Tensor.to and len(args) > 1 and _is_device_like(args[1]):
            args = (args[0], map_device(args[1])) + tuple(args[2:])
        return func(*args, **kwargs)


class _InertStream:
    """Stand-in for ``torch.cuda.Stream``: work on the CPU is synchronous."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        return None

    def wait_event(self, *args, **kwargs):
        return None

    def synchronize(self):
        return None

    def record_event(self, event=None):
        return event or _InertEvent()

    def query(self):
        return True


class _InertEvent:
    """Stand-in for ``torch.cuda.Event``; timing falls back to wall clock."""

    def __init__(self, *args, **kwargs):
        self._t = None

    def record(self, stream=None):
        self._t = time.perf_counter()

    def synchronize(self):
        return None

    def wait(self, stream=None):
        return None

    def query(self):
        return True

    def elapsed_time(self, other: "_InertEvent") -> float:
        if self._t is None or other._t is None:
            return 0.0
        return (other._t - self._t) * 1000.0


_DEFAULT_STREAM = _InertStream()


def _cpu_get_rng_state(device: Any = "cuda", *args, **kwargs) -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, *args, **kwargs) -> None:
    torch.set_rng_state(new_state.cpu() if new_state.device.type != "cpu" else new_state)


def _cpu_manual_seed(seed: int) -> None:
    # Not torch.manual_seed: that calls torch.cuda.manual_seed_all (this function) again.
    torch.default_generator.manual_seed(int(seed))


def _patch(obj: Any, name: str, value: Any) -> None:
    saved = _STATE["saved"]
    key = (id(obj), name)
    if key not in saved:
        saved[key] = (obj, name, getattr(obj, name, None))
    setattr(obj, name, value)


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    _patch(cuda, "current_device", lambda: 0)
    _patch(cuda, "synchronize", lambda *a, **k: None)
    _patch(cuda, "set_device", lambda *a, **k: None)
    _patch(cuda, "empty_cache", lambda *a, **k: None)
    _patch(cuda, "device_count", lambda: 0)
    for stat in ("memory_allocated", "max_memory_allocated", "memory_reserved", "max_memory_reserved"):
        _patch(cuda, stat, lambda *a, **k: 0)
    _patch(cuda, "reset_peak_memory_stats", lambda *a, **k: None)
    _patch(cuda, "memory_stats", lambda *a, **k: {})
    _patch(cuda, "Stream", _InertStream)
    _patch(cuda, "Event", _InertEvent)
    _patch(cuda, "stream", lambda *a, **k: contextlib.nullcontext())
    _patch(cuda, "current_stream", lambda *a, **k: _DEFAULT_STREAM)
    _patch(cuda, "default_stream", lambda *a, **k: _DEFAULT_STREAM)
    _patch(cuda, "get_rng_state", _cpu_get_rng_state)
    _patch(cuda, "set_rng_state", _cpu_set_rng_state)
    _patch(cuda, "manual_seed", _cpu_manual_seed)
    _patch(cuda, "manual_seed_all", _cpu_manual_seed)
    _patch(cuda.random, "get_rng_state", _cpu_get_rng_state)
    _patch(cuda.random, "set_rng_state", _cpu_set_rng_state)
    nvtx = cuda.nvtx
    for fn in ("range_push", "range_pop", "mark"):
        _patch(nvtx, fn, lambda *a, **k: None)
    _patch(nvtx, "range", lambda *a, **k: contextlib.nullcontext())
    _patch(torch.nn.Module, "cuda", lambda self, device=None: self)


def _patch_autograd_engine() -> None:
    """Run every backward pass with the CPU mode on the torch-function mode stack."""

    original = graph._engine_run_backward

    def _engine_run_backward(*args, **kwargs):
        mode = _STATE["mode"]
        stack = torch.overrides._get_current_function_mode_stack()
        if mode is None or any(m is mode for m in stack):
            return original(*args, **kwargs)
        with mode:
            return original(*args, **kwargs)

    _patch(graph, "_engine_run_backward", _engine_run_backward)
    _patch(autograd, "_engine_run_backward", _engine_run_backward)


def _patch_megatron() -> None:
    """Point megatron-core's private CUDA RNG helpers at the CPU generator."""
    _patch(mrandom, "_get_cuda_rng_state", lambda *a, **k: torch.get_rng_state())
    _patch(mrandom, "_set_cuda_rng_state", _cpu_set_rng_state)


def is_active() -> bool:
    """True when the CPU layer is installed in this process."""
    return bool(_STATE["active"])


def activate(force: bool = False) -> bool:
    """Install the CPU layer if CUDA is unavailable (or ``force``).

    Returns True when the layer is active afterwards.  Idempotent.
    """
    with _LOCK:
        if _STATE["active"]:
            return True
        if torch.cuda.is_available() and not force:
            return False
        _patch_torch_cuda()
        _patch_autograd_engine()
        _patch_megatron()
        mode = CudaToCpuMode()
        mode.__enter__()
        _STATE["mode"] = mode
        _STATE["active"] = True
        return True
