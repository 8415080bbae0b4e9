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

It intercepts only the calls that must be rewritten, so ordinary tensor operations
(matmuls, adds, softmax: the ~12,800 calls of a training step) run at full speed.  An
earlier version of this module installed a ``TorchFunctionMode`` that saw *every* torch call
(14 us instead of 8.8 us per small op; generation on CPU is dominated by small ops).  The
calls megatron-core makes that need rewriting were enumerated by tracing that mode over the
training, parallel, checkpointing, growth and generation tests: factory functions with a
``device=`` argument, ``Tensor.to(<cuda device>)``, ``Tensor.cuda()``, ``Tensor.type()`` and
``pin_memory``.  What it does, exactly:

* torch's factory functions (:data:`FACTORIES`: ``torch.empty/zeros/ones/full/arange/tensor/...``
  and ``Tensor.new_*``) are wrapped to rewrite CUDA device arguments (``"cuda"``, ``"cuda:N"``,
  ``torch.device("cuda")``, integer ordinals) to the CPU and to drop ``pin_memory=True``;
* ``Tensor.to`` maps a CUDA device (positional or ``device=``) to the CPU; ``Tensor.cuda()``,
  ``Tensor.pin_memory()`` and ``Module.cuda()`` are no-ops; ``Tensor.type()`` answers with the
  CUDA type names Megatron's optimizers check;
* ``torch.cuda.current_device/synchronize/set_device/empty_cache`` and the
  memory statistics become harmless; streams and events become inert objects;
* the "CUDA" RNG (``torch.cuda.get_rng_state``/``set_rng_state``/``manual_seed``
  and megatron's ``_get_cuda_rng_state``/``_set_cuda_rng_state``) is the CPU
  default generator, so Megatron's RNG tracker forks and restores the state that
  CPU kernels (dropout, init) actually draw from.

The patches are attributes of ``torch``/``torch.Tensor``, so they hold everywhere -- also in
code that autograd runs during a backward pass (megatron's re-entrant activation
recomputation re-runs whole layer forwards there).
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from typing import Any, Callable

import torch
from megatron.core.tensor_parallel import random as mrandom
from torch.utils import _device as torch_device

__all__ = ["activate", "is_active", "map_device", "FACTORIES"]

_LOCK = threading.Lock()
_STATE: dict[str, Any] = {"active": False, "saved": {}}

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

# torch functions that take ``device=`` (and ``pin_memory=``) and create tensors
FACTORIES = (
    "empty", "zeros", "ones", "full", "arange", "range", "linspace", "logspace", "eye",
    "rand", "randn", "randint", "randperm", "normal", "tensor", "as_tensor", "asarray",
    "empty_like", "zeros_like", "ones_like", "full_like", "rand_like", "randn_like", "randint_like",
    "empty_strided", "scalar_tensor", "tril_indices", "triu_indices", "sparse_coo_tensor",
)
TENSOR_FACTORIES = ("new_empty", "new_zeros", "new_ones", "new_full", "new_tensor", "new_empty_strided")


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


def _mapped_factory(fn: Callable) -> Callable:
    """``fn`` with CUDA ``device=`` arguments mapped to the CPU and ``pin_memory`` dropped."""

    @functools.wraps(fn)
    def factory(*args, **kwargs):
        if kwargs:
            if kwargs.get("device") is not None:
                kwargs["device"] = map_device(kwargs["device"])
            if kwargs.get("pin_memory"):
                kwargs["pin_memory"] = False
        return fn(*args, **kwargs)

    return factory


def _mapped_to(to: Callable) -> Callable:
    @functools.wraps(to)
    def tensor_to(self, *args, **kwargs):
        if args and _is_device_like(args[0]):
            args = (map_device(args[0]),) + args[1:]
        if kwargs.get("device") is not None:
            kwargs["device"] = map_device(kwargs["device"])
        return to(self, *args, **kwargs)

    return tensor_to


def _mapped_type(type_: Callable) -> Callable:
    @functools.wraps(type_)
    def tensor_type(self, *args, **kwargs):
        if not args and not kwargs and self.device.type == "cpu":
            name = _CUDA_TYPE_NAMES.get(self.dtype)
            if name is not None:
                return name
        return type_(self, *args, **kwargs)

    return tensor_type


def _identity(self, *args, **kwargs):
    return self


def _warm_identity_caches() -> None:
    """Let torch's cached tables of its own functions record the originals, not our wrappers.

    ``torch.device("meta")`` (``torch.utils._device.DeviceContext``, used by Hugging Face's
    ``from_pretrained``) injects its device only into calls whose function is in the cached set
    ``_device_constructors()``; computed after patching, that set would hold the wrappers and
    miss the original functions the wrappers call, and models would be built off the meta
    device (seen as uninitialised RoPE buffers).  ``torch.overrides`` caches similar tables."""
    torch_device._device_constructors()
    for name in ("get_ignored_functions", "get_default_nowrap_functions", "get_testing_overrides",
                 "_get_overridable_functions", "_get_tensor_methods"):
        fn = getattr(torch.overrides, name, None)
        if fn is not None:
            fn()


def _patch_factories() -> None:
    _warm_identity_caches()
    for name in FACTORIES:
        fn = getattr(torch, name, None)
        if fn is not None:
            _patch(torch, name, _mapped_factory(fn))
    for name in TENSOR_FACTORIES:
        fn = getattr(torch.Tensor, name, None)
        if fn is not None:
            _patch(torch.Tensor, name, _mapped_factory(fn))
    _patch(torch.Tensor, "to", _mapped_to(torch.Tensor.to))
    _patch(torch.Tensor, "type", _mapped_type(torch.Tensor.type))
    _patch(torch.Tensor, "cuda", _identity)
    _patch(torch.Tensor, "pin_memory", _identity)


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


_MISSING = object()


def _patch(obj: Any, name: str, value: Any) -> None:
    saved = _STATE["saved"]
    key = (id(obj), name)
    if key not in saved:
        # a class attribute inherited from a base (Tensor.to from TensorBase) is removed again on undo
        own = vars(obj).get(name, _MISSING) if isinstance(obj, type) else getattr(obj, name, None)
        saved[key] = (obj, name, own)
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
        _patch_factories()
        _patch_torch_cuda()
        _patch_megatron()
        _STATE["active"] = True
        return True


def deactivate() -> None:
    """Undo :func:`activate` (used by the unit tests of this module)."""
    with _LOCK:
        if not _STATE["active"]:
            return
        for obj, name, value in reversed(list(_STATE["saved"].values())):
            if value is _MISSING:
                delattr(obj, name)
            else:
                setattr(obj, name, value)
        _STATE["saved"].clear()
        _STATE["active"] = False
