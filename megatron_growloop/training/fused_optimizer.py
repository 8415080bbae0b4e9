"""Torch-native fused optimizer kernels where megatron-core falls back to unfused ones.

Without Transformer Engine or apex, megatron-core builds its optimizer from
``torch.optim.AdamW``/``Adam`` (``megatron/core/optimizer/__init__.py``: ``USING_PYTORCH_OPTIMIZER``)
with torch's default per-parameter implementation, and computes gradient norms and clipping with
Python loops (``megatron/core/utils.py``: ``local_multi_tensor_l2_norm``,
``local_multi_tensor_scale``; bound as ``l2_norm_impl``/``multi_tensor_scale_impl`` in
``megatron/core/optimizer/clip_grads.py`` and ``optimizer.py``).  Where TE or apex is installed,
Megatron uses their fused kernels instead (``FusedAdam``, ``amp_C.multi_tensor_*``); this module
gives the fallback torch's own equivalents:

* :func:`use_torch_fused_adam`: torch's single-kernel Adam (``fused=True``; CUDA and CPU).  It
  computes the same update up to rounding (``tests/test_fused_optimizer.py``);
* :func:`install_foreach_multi_tensor_ops`: ``torch._foreach_*`` versions of the two helpers --
  the scale in place (the fallback allocates ``src * scale`` and copies it back for every
  gradient) and the norm without a device-to-host copy (the fallback's ``float(l2)`` is one more host
  synchronisation per step than ``clip_grads`` itself needs).

Neither changes what is stored in a checkpoint beyond the optimizer's ``fused`` hyperparameter,
which :func:`use_torch_fused_adam` re-applies (a checkpoint written by an unfused run restores
``fused=False``).
"""

from __future__ import annotations

from typing import List

import torch
from megatron.core import utils as mutils
from megatron.core.optimizer import clip_grads
from megatron.core.optimizer import optimizer as moptimizer


def _torch_optimizers(optimizer) -> List[torch.optim.Optimizer]:
    """The torch optimizers inside a megatron-core optimizer (chained or not)."""
    chained = getattr(optimizer, "chained_optimizers", None)
    wrappers = chained if chained is not None else [optimizer]
    out = []
    for w in wrappers:
        inner = getattr(w, "optimizer", None)
        if isinstance(inner, torch.optim.Optimizer):
            out.append(inner)
    return out


def use_torch_fused_adam(optimizer) -> int:
    """Switch every torch ``Adam``/``AdamW`` inside ``optimizer`` to torch's fused kernel.

    Idempotent and cheap (call it before each step).  Only torch's own Adam classes are
    touched: TE's/apex's ``FusedAdam`` are already fused.  Returns the number of param groups
    that run fused."""
    n = 0
    for opt in _torch_optimizers(optimizer):
        if type(opt) not in (torch.optim.Adam, torch.optim.AdamW):
            continue
        if any(g.get("differentiable") or g.get("capturable") for g in opt.param_groups):
            continue
        opt.defaults["fused"] = True
        opt.defaults["foreach"] = None
        for group in opt.param_groups:
            group["fused"] = True
            group["foreach"] = None
            n += 1
    return n


def foreach_multi_tensor_scale(chunk_size, noop_flag, tensor_lists, scale):
    """``amp_C.multi_tensor_scale`` semantics (``dst = src * scale``) with ``torch._foreach_*``."""
    src, dst = tensor_lists[0], tensor_lists[1]
    if not dst:
        return
    if all(s is d for s, d in zip(src, dst)):
        torch._foreach_mul_(dst, scale)
    else:
        torch._foreach_copy_(dst, torch._foreach_mul(src, scale))


def foreach_multi_tensor_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """``amp_C.multi_tensor_l2norm`` semantics (the l2 norm of all tensors, as a 1-element tensor
    on their device) with ``torch._foreach_norm``; no host synchronisation."""
    tensors = [t for tl in tensor_lists for t in tl]
    if not tensors:  # megatron-core does not call it so; kept total
        return torch.zeros(1, dtype=torch.float, device="cuda" if torch.cuda.is_available() else "cpu"), None
    norms = torch._foreach_norm(tensors)
    total = torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))
    return total.reshape(1), None


def install_foreach_multi_tensor_ops() -> bool:
    """Replace megatron-core's Python-loop fallbacks (only those) by the ``_foreach`` versions.

    Returns True when megatron-core uses the fallbacks (no TE/apex) and they are now replaced."""
    replaced = False
    for module in (clip_grads, moptimizer):
        if getattr(module, "multi_tensor_scale_impl", None) in (mutils.local_multi_tensor_scale, foreach_multi_tensor_scale):
            module.multi_tensor_scale_impl = foreach_multi_tensor_scale
            replaced = True
    if getattr(clip_grads, "l2_norm_impl", None) in (mutils.local_multi_tensor_l2_norm, foreach_multi_tensor_l2_norm):
        clip_grads.l2_norm_impl = foreach_multi_tensor_l2_norm
        replaced = True
    return replaced
