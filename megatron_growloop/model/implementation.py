"""How a model is executed: layer implementation, precision, kernels, recomputation.

:class:`Implementation` is the one place for everything that changes *how* the same
architecture runs but not *what* it computes: Transformer Engine or the local spec,
the attention backend, bf16/fp16/FP8, CUDA graphs, activation recomputation and the
kernel fusions.  Flags that Megatron-LM has keep their Megatron-LM names and defaults
(``megatron/training/arguments.py`` at ``core_v0.16.1``; :func:`add_fusion_args` defines
them); :meth:`Implementation.config_kwargs` is their translation into megatron-core
``TransformerConfig`` fields *for the kernels this machine has* (:class:`~.fusions.Kernels`).

Fusion defaults, as in Megatron-LM (``--no-X`` switches a default-on fusion off):

==================================  ==========  ====================================================
flag                                default     runs where
==================================  ==========  ====================================================
``--no-masked-softmax-fusion``      on          unfused attention with megatron's CUDA softmax kernels
``--no-bias-swiglu-fusion``         on (GPU)    megatron-core's SwiGLU kernel (``torch.compile``)
``--no-bias-dropout-fusion``        on (GPU)    megatron-core's bias-dropout-add (``torch.compile``)
``--no-rope-fusion``                on          Transformer Engine's fused RoPE (needs TE)
``--cross-entropy-loss-fusion``     off         megatron-core's fused vocab-parallel cross-entropy
``--cross-entropy-fusion-impl``     native      ``native`` (megatron-core, ``torch.compile``) or ``te``
``--torch-compile``                 off         ``torch.compile`` of every transformer layer (project flag)
``--no-gradient-accumulation-fusion``  on       wgrad GEMM accumulating into ``main_grad``: TE linears, or
                                                apex's ``fused_weight_gradient_mlp_cuda`` for local linears;
                                                **off for a model with a loop** (see below)
``--no-persist-layer-norm``         on          apex's persistent LayerNorm kernel (inert for RMSNorm models)
==================================  ==========  ====================================================

``deallocate_pipeline_outputs`` is always on, as Megatron-LM sets it
(``megatron/training/arguments.py`` ``core_transformer_config_from_args``): a pipeline stage frees
the data of its output tensor once it is sent, keeping only the autograd graph.

**Gradient-accumulation fusion and loops.**  With the fusion, TE's linear (and megatron's
``LinearWithGradAccumulationAndAsyncCommunication``) writes the weight gradient into
``main_grad`` with ``accumulate=False`` for the forward call made with
``is_first_microbatch=True``.  In a looped block that call is the *first application* of the
layer, whose backward runs *last*: it would overwrite the other k-1 applications' contributions
(under FP8 at every step, in bf16 on the first step and after each growth).  A model whose
architecture has a loop, or inference-time repeat blocks, therefore runs with the fusion off (the
start-up line says so); plain and grown models keep it.  Turning it off costs a separate
``main_grad += wgrad`` per linear, which is what megatron-core does without apex or TE.

A default-on fusion whose kernel is missing here is simply off (Megatron-LM would stop with an
error; a default is not a request).  megatron-core builds its SwiGLU, bias-dropout-add and
native cross-entropy kernels with ``torch.compile`` (``megatron/core/jit.py``): on a GPU that is
what Megatron-LM runs; on a CPU the first compile of a process costs ~20 s against a saving of
milliseconds per step, so there ``--no-bias-*-fusion``'s default is off, and an explicit
``--cross-entropy-loss-fusion`` is honoured anywhere.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
from megatron.core.transformer.enums import AttnBackend

from ..errors import UsageError
from .fusions import Kernels

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# --attention-backend: Megatron-LM's AttnBackend names plus ``sdpa`` (torch's fused kernel on the
# local spec).  On the local spec ``auto`` is ``sdpa``; ``unfused``/``local`` are megatron-core's
# DotProductAttention; ``flash``/``fused`` name Transformer Engine kernels.
ATTENTION_BACKENDS = ("auto", "sdpa", "flash", "fused", "unfused", "local")
LOCAL_ATTENTION = {"auto": "sdpa", "sdpa": "sdpa", "unfused": "unfused", "local": "unfused"}


@dataclass(frozen=True)
class Implementation:
    transformer_impl: str = "local"
    attention_backend: str = "auto"
    dtype: str = "fp32"
    fp8_format: Optional[str] = None
    fp8_recipe: str = "delayed"
    cuda_graph_impl: str = "none"
    cuda_graph_warmup_steps: int = 3
    recompute_granularity: Optional[str] = None
    recompute_method: Optional[str] = None
    recompute_num_layers: Optional[int] = None
    # ---- kernel fusions: Megatron-LM names; None = Megatron-LM's default where the kernel is worth it
    masked_softmax_fusion: bool = True
    bias_swiglu_fusion: Optional[bool] = None
    bias_dropout_fusion: Optional[bool] = None
    apply_rope_fusion: bool = True
    cross_entropy_loss_fusion: bool = False
    cross_entropy_fusion_impl: str = "native"
    torch_compile: bool = False
    gradient_accumulation_fusion: bool = True
    persist_layer_norm: bool = True

    def __post_init__(self):
        if self.transformer_impl not in ("local", "transformer_engine"):
            raise UsageError(
                f"unknown --transformer-impl {self.transformer_impl!r}; choose transformer_engine or local"
            )
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise UsageError(
                f"unknown --attention-backend {self.attention_backend!r}; choose one of {', '.join(ATTENTION_BACKENDS)}"
            )
        if self.transformer_impl == "local" and self.attention_backend not in LOCAL_ATTENTION:
            raise UsageError(
                f"--attention-backend {self.attention_backend} is a Transformer Engine kernel; the local spec "
                "runs sdpa (default) or unfused (or use --transformer-impl transformer_engine)"
            )
        if self.transformer_impl == "transformer_engine" and self.attention_backend == "sdpa":
            raise UsageError(
                "--attention-backend sdpa runs on the local spec: add --transformer-impl local "
                "(Transformer Engine chooses its own kernels with --attention-backend auto)"
            )
        if self.cross_entropy_fusion_impl not in ("native", "te"):
            raise UsageError(
                f"unknown --cross-entropy-fusion-impl {self.cross_entropy_fusion_impl!r}; choose native or te"
            )

    @classmethod
    def from_args(cls, args) -> "Implementation":
        full = getattr(args, "recompute_granularity", None) == "full"
        return cls(
            transformer_impl=getattr(args, "transformer_impl", None) or "local",
            attention_backend=getattr(args, "attention_backend", None) or "auto",
            dtype="bf16" if getattr(args, "bf16", False) else "fp16" if getattr(args, "fp16", False) else "fp32",
            fp8_format=getattr(args, "fp8_format", None),
            fp8_recipe=getattr(args, "fp8_recipe", None) or "delayed",
            cuda_graph_impl=getattr(args, "cuda_graph_impl", None) or "none",
            cuda_graph_warmup_steps=int(getattr(args, "cuda_graph_warmup_steps", 3)),
            recompute_granularity=getattr(args, "recompute_granularity", None),
            recompute_method=getattr(args, "recompute_method", None) if full else None,
            recompute_num_layers=getattr(args, "recompute_num_layers", None) if full else None,
            masked_softmax_fusion=getattr(args, "masked_softmax_fusion", True),
            bias_swiglu_fusion=getattr(args, "bias_swiglu_fusion", None),
            bias_dropout_fusion=getattr(args, "bias_dropout_fusion", None),
            apply_rope_fusion=getattr(args, "apply_rope_fusion", True),
            cross_entropy_loss_fusion=getattr(args, "cross_entropy_loss_fusion", False),
            cross_entropy_fusion_impl=getattr(args, "cross_entropy_fusion_impl", None) or "native",
            torch_compile=getattr(args, "torch_compile", False),
            gradient_accumulation_fusion=getattr(args, "gradient_accumulation_fusion", True),
            persist_layer_norm=not getattr(args, "no_persist_layer_norm", False),
        )

    @property
    def params_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def half(self) -> bool:
        """bf16 or fp16: the model is wrapped in megatron-core's ``Float16Module``."""
        return self.dtype != "fp32"

    @property
    def core_attention(self) -> str:
        """``sdpa`` or ``unfused`` (the local spec's module), or ``te`` (Transformer Engine's)."""
        if self.transformer_impl == "transformer_engine":
            return "te"
        return LOCAL_ATTENTION[self.attention_backend]

    def fusions(self, kernels: Optional[Kernels] = None, looped: bool = False) -> Dict[str, Any]:
        """The fusion fields of ``TransformerConfig`` that run on ``kernels`` (default: this machine),
        for a model with (``looped``) or without layers applied more than once per step."""
        k = Kernels.detect() if kernels is None else kernels
        if self.cross_entropy_loss_fusion and self.cross_entropy_fusion_impl == "te" and not k.transformer_engine:
            raise UsageError(
                "--cross-entropy-fusion-impl te needs Transformer Engine (not importable here); "
                "use --cross-entropy-fusion-impl native"
            )

        def compiled(requested: Optional[bool]) -> bool:  # megatron-core kernels built by torch.compile
            return k.cuda if requested is None else bool(requested)

        return dict(
            masked_softmax_fusion=bool(self.masked_softmax_fusion and k.masked_softmax_cuda),
            bias_activation_fusion=compiled(self.bias_swiglu_fusion),
            bias_dropout_fusion=compiled(self.bias_dropout_fusion),
            apply_rope_fusion=bool(self.apply_rope_fusion and k.transformer_engine),
            cross_entropy_loss_fusion=bool(self.cross_entropy_loss_fusion),
            cross_entropy_fusion_impl=self.cross_entropy_fusion_impl,
            gradient_accumulation_fusion=bool(
                self.gradient_accumulation_fusion
                and not looped
                and (k.transformer_engine if self.transformer_impl == "transformer_engine" else k.grad_accum_fusion_cuda)
            ),
            persist_layer_norm=bool(self.persist_layer_norm and k.persistent_layer_norm_cuda),
        )

    def fusion_summary(self, kernels: Optional[Kernels] = None, looped: bool = False) -> str:
        """For start-up lines: the fusions that run, and why a requested one does not."""
        fused = self.fusions(kernels, looped)
        names = dict(masked_softmax_fusion="masked-softmax", bias_activation_fusion="bias-swiglu",
                     bias_dropout_fusion="bias-dropout-add", apply_rope_fusion="rope",
                     cross_entropy_loss_fusion=f"cross-entropy ({self.cross_entropy_fusion_impl})",
                     gradient_accumulation_fusion="grad-accum", persist_layer_norm="persist-layer-norm")
        on = [n for key, n in names.items() if fused[key]]
        if self.torch_compile:
            on.append("torch.compile")
        text = "fusions: " + (", ".join(on) if on else "none")
        if looped and self.gradient_accumulation_fusion and not fused["gradient_accumulation_fusion"]:
            text += " (grad-accum fusion off: looped layers)"
        return text

    def describe(self) -> str:
        """One phrase for start-up lines: layer implementation, attention backend, precision."""
        attention = self.attention_backend if self.transformer_impl == "transformer_engine" else self.core_attention
        fp8 = f", FP8 {self.fp8_format}/{self.fp8_recipe}" if self.fp8_format else ""
        return f"impl {self.transformer_impl}, attention {attention}, {self.dtype}{fp8}"

    def warnings(self, cuda: bool, fallback: Optional[str] = None) -> List[str]:
        """What a user on a GPU should not miss: a silent fallback, or fp32 where bf16 is the norm."""
        out = [fallback] if fallback else []
        if cuda and self.dtype == "fp32":
            out.append("running in fp32 on a GPU: pass --bf16 (Megatron-LM's usual precision) unless fp32 is intended")
        return out

    def config_kwargs(self, kernels: Optional[Kernels] = None, looped: bool = False) -> Dict[str, Any]:
        """megatron-core ``TransformerConfig`` fields for this implementation (``looped``: some layer
        is applied more than once per step)."""

        dtype = self.params_dtype
        kw: Dict[str, Any] = dict(
            params_dtype=dtype,
            pipeline_dtype=dtype,
            bf16=self.dtype == "bf16",
            fp16=self.dtype == "fp16",
            recompute_granularity=self.recompute_granularity,
            recompute_method=self.recompute_method,
            recompute_num_layers=self.recompute_num_layers,
            deallocate_pipeline_outputs=True,
        )
        kw.update(self.fusions(kernels, looped))
        if self.transformer_impl == "transformer_engine":
            kw["attention_backend"] = AttnBackend[self.attention_backend]
            if self.fp8_format:
                kw["fp8"] = self.fp8_format
                kw["fp8_recipe"] = self.fp8_recipe
        else:
            kw["attention_backend"] = AttnBackend.local
        if self.cuda_graph_impl not in (None, "none"):
            kw["cuda_graph_impl"] = self.cuda_graph_impl
            kw["cuda_graph_warmup_steps"] = self.cuda_graph_warmup_steps
        return kw


def add_fusion_args(parser: argparse.ArgumentParser) -> None:
    """The kernel-fusion flags, named and defaulted as Megatron-LM's (``megatron/training/arguments.py``)."""
    g = parser.add_argument_group("kernel fusions (Megatron-LM names; a default-on fusion runs where its kernel exists)")
    g.add_argument("--no-masked-softmax-fusion", action="store_false", dest="masked_softmax_fusion",
                   help="disable megatron's fused scale+mask+softmax CUDA kernel (unfused attention only)")
    g.add_argument("--no-bias-swiglu-fusion", action="store_false", dest="bias_swiglu_fusion", default=None,
                   help="disable megatron-core's fused SwiGLU (default: on with CUDA, off on CPU)")
    g.add_argument("--no-bias-dropout-fusion", action="store_false", dest="bias_dropout_fusion", default=None,
                   help="disable megatron-core's fused bias-dropout-add (default: on with CUDA, off on CPU)")
    g.add_argument("--no-rope-fusion", action="store_false", dest="apply_rope_fusion",
                   help="disable Transformer Engine's fused RoPE (used when TE is importable)")
    g.add_argument("--cross-entropy-loss-fusion", action="store_true",
                   help="megatron-core's fused vocab-parallel cross-entropy")
    g.add_argument("--cross-entropy-fusion-impl", choices=["native", "te"], default="native",
                   help="native: megatron-core's (no TE needed); te: Transformer Engine's")
    g.add_argument("--no-gradient-accumulation-fusion", action="store_false", dest="gradient_accumulation_fusion",
                   help="disable fusing the weight-gradient accumulation into the GEMM (TE, or apex for local "
                        "linears; always off for looped models)")
    g.add_argument("--no-persist-layer-norm", action="store_true",
                   help="disable apex's persistent LayerNorm kernel (only for LayerNorm models with apex)")
    g.add_argument("--torch-compile", action="store_true",
                   help="torch.compile every transformer layer (training and no-cache inference)")
