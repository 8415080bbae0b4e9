"""Build a model and its optimizer: the one factory the trainer, growth, resharding and
fine-tuning share.

:func:`build_stack` turns an :class:`~megatron_growloop.model.arch.Arch`, a
:class:`~megatron_growloop.model.parallel.ParallelLayout` and an
:class:`~megatron_growloop.model.implementation.Implementation` into this rank's model
chunk wrapped as Megatron-LM wraps it (``Float16Module`` for bf16/fp16, megatron-core's
``DistributedDataParallel``) plus the Megatron (distributed) optimizer, and wires the
config callbacks the pipeline schedules call (as ``megatron/training/training.py``'s
``setup_model_and_optimizer`` and ``train`` do).  The LR scheduler is not part of the
stack: it outlives rebuilds (growth keeps one schedule).
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import List, Optional

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.module import Float16Module

from .. import platform
from ..looping.spec import RepeatBlock
from ..model.arch import Arch
from ..model.fusions import compile_layers
from ..model.gpt import GrowLoopGPTModel, build_model
from ..model.implementation import Implementation
from ..model.layout_init import initialize_layout_independent
from ..model.parallel import ParallelLayout
from .checkpointing import unwrap
from .fused_optimizer import install_foreach_multi_tensor_ops, use_torch_fused_adam


@dataclass(frozen=True)
class OptimizerSettings:
    """AdamW and gradient-synchronisation settings (Megatron-LM flag names)."""

    lr: float = 3e-3
    min_lr: float = 0.0
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    use_distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False

    @classmethod
    def from_args(cls, args) -> "OptimizerSettings":
        return cls(**{name: getattr(args, name) for name in cls.__dataclass_fields__})


@dataclass
class ModelStack:
    """This rank's model chunk (DDP-wrapped) and its optimizer."""

    chunks: List[DistributedDataParallel]
    optimizer: object

    @property
    def model(self) -> GrowLoopGPTModel:
        """The unwrapped model (no DDP / Float16Module)."""
        return unwrap(self.chunks[0])

    @property
    def config(self):
        return self.model.config

    def release(self) -> None:
        """Drop every reference to the model, DDP and optimizer so their memory can be freed."""
        cfg = self.config
        for name in ("grad_scale_func", "no_sync_func", "grad_sync_func", "param_sync_func",
                     "finalize_model_grads_func"):
            if hasattr(cfg, name):
                setattr(cfg, name, None)
        self.chunks, self.optimizer = [], None
        if platform.has_cuda():  # give the device memory back before the next model is built
            frozen = gc.get_freeze_count()  # growth freezes long-lived objects; the old model is one
            gc.unfreeze()
            gc.collect()
            if frozen:
                gc.freeze()
            torch.cuda.empty_cache()


def build_stack(
    arch: Arch,
    layout: ParallelLayout,
    impl: Implementation,
    optim: OptimizerSettings,
    repeat_blocks=(),
    init_seed: Optional[int] = None,
) -> ModelStack:
    """Model + DDP + Megatron optimizer for ``arch`` on this rank, ready for the pipeline schedules.

    ``init_seed``: draw the initial weights as a function of (seed, parameter name, global layer)
    only (:mod:`~megatron_growloop.model.layout_init`: every TP/PP/DP layout starts from the
    weights of one process); None: megatron-core's per-rank initialization."""
    # megatron-core initializes first even when the weights are re-drawn: its init also marks the
    # tensor-parallel weights (set_tensor_model_parallel_attributes in _initialize_affine_weight_gpu),
    # which the gradient-norm computation needs; without it TP>1 training clips differently.
    model = build_model(arch, layout, impl, [RepeatBlock.parse(str(b)) for b in repeat_blocks])
    if init_seed is not None:
        initialize_layout_independent(model, init_seed)
    config = model.config
    if impl.torch_compile:
        compile_layers(model)
    if impl.half:
        # As Megatron-LM: cast every parameter (norms included) to the 16-bit dtype and convert
        # inputs/outputs at the pipeline ends; the optimizer keeps fp32 main params.
        model = Float16Module(config, model)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=optim.overlap_grad_reduce,
        overlap_param_gather=optim.overlap_param_gather,
        use_distributed_optimizer=optim.use_distributed_optimizer,
        check_for_nan_in_grad=False,
    )
    ddp = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)
    ddp.broadcast_params()
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=optim.lr,
        min_lr=optim.min_lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1,
        adam_beta2=optim.adam_beta2,
        adam_eps=optim.adam_eps,
        clip_grad=optim.clip_grad,
        bf16=impl.dtype == "bf16",
        fp16=impl.dtype == "fp16",
        params_dtype=impl.params_dtype,
        use_distributed_optimizer=optim.use_distributed_optimizer,
        overlap_param_gather=optim.overlap_param_gather,
    )
    install_foreach_multi_tensor_ops()  # torch's fused kernels where megatron-core falls back (no TE/apex)
    optimizer = get_megatron_optimizer(opt_config, [ddp])
    use_torch_fused_adam(optimizer)
    config.grad_scale_func = optimizer.scale_loss
    config.no_sync_func = ddp.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    if optim.overlap_grad_reduce:
        config.grad_sync_func = ddp.start_grad_sync
    if optim.overlap_param_gather:
        config.param_sync_func = ddp.start_param_sync
    return ModelStack([ddp], optimizer)


def build_scheduler(optimizer, args) -> OptimizerParamScheduler:
    """Megatron-LM's ``get_optimizer_param_scheduler`` for the ``pretrain`` flags (iterations)."""
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if args.lr_warmup_iters > 0 else args.lr,
        max_lr=args.lr,
        min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_iters,
        lr_decay_steps=args.lr_decay_iters,
        lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay,
        end_wd=args.weight_decay,
        wd_incr_steps=args.train_iters,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
        wsd_decay_steps=args.lr_wsd_decay_iters,
        lr_wsd_decay_style=args.lr_wsd_decay_style,
    )

