"""Torch-native fused operations for the local spec, and which kernel fusions this machine has.

* :class:`RMSNorm`: the local spec's normalisation on ``torch.nn.functional.rms_norm`` (torch's
  fused RMSNorm kernel on a GPU).  Unlike megatron-core's ``WrappedTorchNorm``
  (``megatron/core/transformer/torch_norm.py``, which asserts ``not sequence_parallel``) it
  supports sequence parallelism: like megatron's ``FusedLayerNorm``
  (``megatron/core/fusions/fused_layer_norm.py``) it marks its weight ``sequence_parallel`` so
  that ``finalize_model_grads`` all-reduces the weight's gradient over the tensor-parallel group.
  Its state dict is ``{"weight"}``, the same as ``torch.nn.RMSNorm``'s, so checkpoints are
  unchanged.
* :class:`Kernels`: what this process can run -- CUDA, Transformer Engine, apex's and
  megatron's CUDA extensions.  :meth:`megatron_growloop.model.implementation.Implementation.config_kwargs`
  uses it to turn the requested fusion flags into the ``TransformerConfig`` fields that can
  actually run here.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from .. import platform


class RMSNorm(torch.nn.Module):
    """RMSNorm through ``F.rms_norm``, with megatron-core's norm constructor signature."""

    def __init__(
        self,
        config,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: str = "RMSNorm",
    ):
        super().__init__()
        if getattr(config, "normalization", "RMSNorm") != "RMSNorm":
            raise ValueError(f"RMSNorm built for normalization={config.normalization!r}")
        self.hidden_size = (int(hidden_size),)
        self.eps = float(eps)
        self.zero_centered_gamma = bool(zero_centered_gamma or getattr(config, "layernorm_zero_centered_gamma", False))
        self.weight = torch.nn.Parameter(
            torch.zeros(hidden_size, dtype=config.params_dtype)
            if self.zero_centered_gamma
            else torch.ones(hidden_size, dtype=config.params_dtype)
        )
        self.sequence_parallel = bool(getattr(config, "sequence_parallel", False))
        # finalize_model_grads all-reduces the gradients of parameters marked so (sequence parallel)
        setattr(self.weight, "sequence_parallel", self.sequence_parallel)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.fill_(0.0 if self.zero_centered_gamma else 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight + 1 if self.zero_centered_gamma else self.weight
        return F.rms_norm(x, self.hidden_size, weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.hidden_size[0]}, eps={self.eps}, sequence_parallel={self.sequence_parallel}"


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The unfused formula (Hugging Face's ``LlamaRMSNorm``): what :class:`RMSNorm` must equal."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


@dataclass(frozen=True)
class Kernels:
    """The fused kernels this process can run (detected once; tests construct their own)."""

    cuda: bool = False
    transformer_engine: bool = False
    masked_softmax_cuda: bool = False
    """megatron's ``scaled_masked_softmax_cuda`` extensions (used by ``--no-masked-softmax-fusion``'s default)."""
    grad_accum_fusion_cuda: bool = False
    """apex's ``fused_weight_gradient_mlp_cuda`` (the local linears' gradient-accumulation fusion)."""
    persistent_layer_norm_cuda: bool = False
    """apex's ``FastLayerNormFN`` (``apex.contrib.layer_norm``: megatron-core's persistent LayerNorm)."""

    @staticmethod
    @lru_cache(maxsize=1)
    def detect() -> "Kernels":
        cuda = platform.has_cuda()
        return Kernels(
            cuda=cuda,
            transformer_engine=cuda and platform.te_importable(),
            masked_softmax_cuda=cuda
            and _importable("scaled_masked_softmax_cuda")
            and _importable("scaled_upper_triang_masked_softmax_cuda"),
            grad_accum_fusion_cuda=cuda and _importable("fused_weight_gradient_mlp_cuda"),
            persistent_layer_norm_cuda=cuda and _importable("apex.contrib.layer_norm"),
        )


def compile_layers(model) -> int:
    """``--torch-compile``: ``torch.compile`` each transformer layer of ``model`` in place.

    ``nn.Module.compile`` keeps the module (parameters, hooks, state-dict keys), so DDP,
    checkpoints and the looped block's schedule see the same layers; every layer of a block has
    the same code, so the compiled graph is reused across layers (one compile per stage and
    grad mode).  Returns the number of layers compiled."""
    layers = list(model.decoder.layers)
    for layer in layers:
        layer.compile()
    return len(layers)
