"""The training loop on megatron-core: DDP, the Megatron optimizer, pipeline schedules.

A :class:`Trainer` holds the architecture record (``arch``), the model stack
(:class:`~.factory.ModelStack`: model chunk, DDP, optimizer), the LR scheduler, the
counters (:class:`TrainState`) and the data iterators.  Controllers (depth growth, a
curriculum on k) change the model between steps through a narrow public interface:

* ``arch``, ``layout``, ``impl``, ``state``, ``args`` (read only);
* :meth:`model_space_state` -- model and optimizer state in model space;
* :meth:`rebuild` -- a new model stack for another architecture, filled by the caller,
  keeping the scheduler, the counters, the data position and the RNG;
* :meth:`set_loop_repeats`, :meth:`set_loop_backprop_depth`, :meth:`log_text`, :meth:`log_scalars`.

The trainer never imports a controller; ``megatron_growloop.pretrain`` composes them.
"""

from __future__ import annotations

import json
import math
import os
import resource
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from .. import accounting, platform
from ..data.datasets import GlobalBatch, MicroBatchIterator, build_gpt_datasets, parse_blend
from ..data.default_corpus import default_data_prefix
from ..data.mock import MockDataset
from ..data.packing import block_causal_mask
from ..data.tokenizer import build_tokenizer
from ..errors import UsageError
from ..looping.ddp import GradReadyCounts
from ..model.arch import Arch, pad_vocab_size
from ..model.config import looped
from ..model.gpt import GrowLoopGPTModel
from ..model.implementation import Implementation
from ..model.parallel import ParallelLayout
from . import checkpointing
from .arguments import Launch
from .controller import Controller
from .cuda_graphs import TECudaGraphs
from .factory import ModelStack, OptimizerSettings, build_scheduler, build_stack
from .fused_optimizer import use_torch_fused_adam
from .initialize import init_distributed, rng_options
from .logger import MetricsLogger
from .optimizer_state import local_optimizer_state
from .loop_curriculum import LoopRepeatsCurriculum
from .random_recurrence import RandomRecurrence
from .resume import resolve_arch
from .stop_conditions import StepVerdict, StopConditions, TrainingDiverged, divergence_message


def loss_value(loss: Optional[torch.Tensor]) -> Optional[float]:
    """The host value of a device loss: the one place the training loop waits for the device."""
    return None if loss is None else float(loss)


DatasetsProvider = Callable[[Sequence[int]], tuple]
"""``[train, valid, test] sample counts -> (train, valid, test)`` datasets (None: not used),
as Megatron-LM's ``train_valid_test_datasets_provider`` passed to ``pretrain(...)``.  A sample
is a dict of ``tokens``, ``labels``, ``loss_mask``, ``position_ids`` (``[seq]`` each) and
optionally ``segment_ids`` (packed sequences).  Without a provider the trainer builds
``GPTDataset`` blends from ``--data-path`` (or mock / embedded data)."""


@dataclass
class TrainState:
    """Counters that a checkpoint carries and a resume restores exactly."""

    iteration: int = 0
    consumed_train_samples: int = 0
    consumed_valid_samples: int = 0
    training_flops: float = 0.0
    tokens: int = 0
    lineage: List[Dict[str, int]] = field(default_factory=list)
    """Per layer: the initial layer it descends from and the growth step that created it
    (maintained by depth growth; carried unchanged otherwise)."""

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TrainState":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Token-summed loss; megatron-core divides by the global token count (per-token loss)."""
    losses = output_tensor.float().view(-1)
    mask = loss_mask.view(-1).float()
    total = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([total.detach().clone(), mask.sum().detach()])
    return total, num_tokens, {"lm loss": report}


def forward_step(data_iterator, model):
    """One micro-batch.  A batch with ``segment_ids`` (packed fine-tuning sequences) gets the
    block-diagonal causal attention mask that keeps its examples apart, as Megatron-LM's
    ``pretrain_gpt.py`` turns a packed batch's ``cu_seqlens`` into ``packed_seq_params``."""
    batch = next(data_iterator)
    dev = platform.device()
    tokens = batch["tokens"].to(dev, non_blocking=True)
    labels = batch["labels"].to(dev, non_blocking=True)
    loss_mask = batch["loss_mask"].to(dev, non_blocking=True)
    position_ids = batch["position_ids"].to(dev, non_blocking=True)
    segments = batch.get("segment_ids")
    attention_mask = None if segments is None else block_causal_mask(segments.to(dev, non_blocking=True))
    output = model(tokens, position_ids, attention_mask, labels=labels)
    return output, partial(loss_func, loss_mask)


def peak_memory_bytes() -> int:
    if platform.has_cuda():
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class Trainer:
    args: Any
    arch: Arch
    layout: ParallelLayout
    impl: Implementation
    state: TrainState
    stack: Optional[ModelStack]

    def __init__(self, launch: Launch, controllers: Sequence[Controller] = (),
                 datasets_provider: Optional[DatasetsProvider] = None):
        args = self.args = launch.args
        self.datasets_provider = datasets_provider
        self.resume = launch.resume
        init_distributed(
            args.tensor_model_parallel_size,
            args.pipeline_model_parallel_size,
            backend=args.distributed_backend,
            timeout_minutes=args.distributed_timeout_minutes,
            seed=args.seed,
            **rng_options(args),
        )
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.is_logging_rank = self.rank == self.world_size - 1  # on the last pipeline stage
        self.tokenizer = (build_tokenizer(args.tokenizer_type, args.tokenizer_model)
                          if not args.mock_data or args.vocab_size is None else None)
        vocab = self.tokenizer.vocab_size if self.tokenizer is not None else args.vocab_size
        padded = pad_vocab_size(vocab, args.make_vocab_size_divisible_by, args.tensor_model_parallel_size)
        self.arch = resolve_arch(args, padded, self.resume)
        self.layout = ParallelLayout.from_args(args)
        self.impl = Implementation.from_args(args)
        self.optim = OptimizerSettings.from_args(args)
        self.state = TrainState()
        self.stack = None
        self.scheduler = None
        self.logger: Optional[MetricsLogger] = None
        self.controllers: List[Controller] = list(controllers)
        if args.loop_repeats_curriculum:
            self.controllers.append(LoopRepeatsCurriculum(args.loop_repeats_curriculum))
        if getattr(args, "loop_recurrence", None) is not None:
            self.controllers.append(RandomRecurrence(args.loop_recurrence))
        if self.impl.cuda_graph_impl == "transformer_engine":
            self.controllers.append(TECudaGraphs(args.cuda_graph_warmup_steps))
        self._grad_ready = GradReadyCounts()

    # ------------------------------------------------------------------ the model stack
    @property
    def model(self) -> List[torch.nn.Module]:
        """The DDP-wrapped model chunks (what megatron-core's schedules take)."""
        return self.stack.chunks

    @property
    def optimizer(self):
        return self.stack.optimizer

    @property
    def unwrapped(self) -> GrowLoopGPTModel:
        return self.stack.model

    @property
    def config(self):
        return self.stack.config

    def _build(self, init_seed: Optional[int] = None) -> None:
        self.stack = build_stack(self.arch, self.layout, self.impl, self.optim, init_seed=init_seed)
        if self.scheduler is None:
            self.scheduler = build_scheduler(self.optimizer, self.args)
        self._grad_ready = GradReadyCounts()  # the counts belong to one DDP

    @contextmanager
    def _params_synced(self):
        """Finish the deferred parameter all-gather of ``--overlap-param-gather`` so the model's
        weights are current (as Megatron-LM disables the forward pre-hooks around a save)."""
        hooked = [m for m in self.model if getattr(m, "use_forward_hook", False)]
        for m in hooked:
            m.disable_forward_pre_hook(param_sync=True)
        try:
            yield
        finally:
            for m in hooked:
                m.enable_forward_pre_hook()

    def model_space_state(self, local_optimizer: bool = False) -> Dict[str, Any]:
        """The model's sharded state dict (current weights: a pending ``--overlap-param-gather``
        all-gather is finished first) and the optimizer's state in model space: the
        ``fully_reshardable`` sharded state dict, or with ``local_optimizer`` this rank's shards
        without any gather (:func:`~.optimizer_state.local_optimizer_state`).  What a rebuilt
        model is filled from."""
        with self._params_synced():
            model_sd = checkpointing.model_sharded_state_dict(self.model)
            if local_optimizer:
                return {"model": model_sd, "optimizer": local_optimizer_state(self.optimizer, model_sd)}
            return {
                "model": model_sd,
                "optimizer": self.optimizer.sharded_state_dict(model_sd, metadata=checkpointing.FULLY_RESHARDABLE),
            }

    def rebuild(self, arch: Arch, fill: Callable[[ModelStack], None]) -> None:
        """Replace the model stack by one for ``arch`` (same layout and implementation; the
        pipeline stages are re-balanced) and let ``fill`` load its state.  The LR scheduler,
        the counters, the data position and the RNG state carry over unchanged."""
        rng = checkpointing.rng_state()
        self.scheduler.optimizer = None
        self.stack.release()
        self.stack = None
        self.arch = arch
        self._build()
        fill(self.stack)
        self.scheduler.optimizer = self.optimizer
        self.scheduler.step(0)  # lr/wd of the schedule position into the new param groups
        checkpointing.set_rng_state(rng)

    def set_loop_repeats(self, repeats: int) -> None:
        """Change k of the looped model between training steps (a new phase, or every step).

        Unique parameters, optimizer state and the pipeline layout stay.  How often each
        parameter's gradient hook fires per step depends on k with activation recomputation;
        :meth:`train_step` gives the DDP bucket groups the counts of the schedule it runs
        (learned in the first step with that schedule, see :mod:`megatron_growloop.looping.ddp`).
        """
        if self.arch.loop is not None and self.arch.loop.repeats == int(repeats):
            return
        self.arch = self.arch.with_repeats(repeats)
        self.unwrapped.set_loop_repeats(repeats)

    def set_loop_backprop_depth(self, depth: Optional[int]) -> None:
        """Back-propagate through only the last ``depth`` applications of the recurrent block
        (None: all of them), between training steps."""
        if self.unwrapped.config.loop_backprop_depth != depth:
            self.unwrapped.set_loop_backprop_depth(depth)

    def _grad_sync_key(self):
        """What the DDP grad-ready counts depend on: nothing without recomputation (autograd
        sums a tied parameter's contributions before its hook fires once), else the schedule
        and the backprop depth (one firing per recomputed segment holding the parameter)."""
        if self.config.recompute_granularity is None:
            return None
        return tuple(self.unwrapped.schedule), self.unwrapped.config.loop_backprop_depth

    # ------------------------------------------------------------------ logging
    def log_text(self, text: str) -> None:
        if self.logger is not None:
            self.logger.text(text)
        elif self.is_logging_rank:
            print(text, flush=True)

    def log_scalars(self, iteration: int, scalars: Dict[str, float]) -> None:
        if self.logger is not None:
            self.logger.log(iteration, scalars, console=False)

    # ------------------------------------------------------------------ metadata
    def accounting(self) -> Dict[str, int]:
        a = self.arch
        return accounting.summary(a, a.padded_vocab_size, a.tied, self.args.seq_length, self.unwrapped.effective_depth,
                                  self.unwrapped.backward_depth)

    def checkpoint_metadata(self) -> Dict[str, Any]:
        a = self.args
        meta = {
            "arch": self.arch.to_meta(),
            "model_preset": a.model_preset,
            "tokenizer": {
                "type": a.tokenizer_type,
                "model": a.tokenizer_model,
                "vocab_size": self.tokenizer.vocab_size if self.tokenizer else a.vocab_size,
            },
            "accounting": self.accounting(),
            "training_flops": self.state.training_flops,
            "consumed_train_samples": self.state.consumed_train_samples,
            "tokens": self.state.tokens,
            "lineage": self.state.lineage or None,
            "growth": None,
        }
        for c in self.controllers:
            meta.update(c.checkpoint_metadata(self))
        return meta

    # ------------------------------------------------------------------ checkpoints
    def save(self, directory: Optional[str] = None, extra_metadata: Optional[Dict[str, Any]] = None,
             optimizer_format: Optional[str] = None) -> Optional[str]:
        """Save a checkpoint of the current state to ``--save`` (or ``directory``); returns its path.

        ``optimizer_format``: the distributed optimizer's sharding (default: ``fully_reshardable``
        with ``--dist-ckpt-optim-fully-reshardable``, else ``dp_reshardable``)."""
        if optimizer_format is None:
            optimizer_format = "fully_reshardable" if self.args.dist_ckpt_optim_fully_reshardable else "dp_reshardable"
        directory = directory or self.args.save
        if not directory:
            return None
        with self._params_synced():
            return checkpointing.save_checkpoint(
                directory,
                self.state.iteration,
                self.model,
                self.optimizer,
                self.scheduler,
                common={"state": self.state.to_dict()},
                metadata={**self.checkpoint_metadata(), **(extra_metadata or {})},
                optimizer_format=optimizer_format,
                checksums=not getattr(self.args, "no_ckpt_checksums", False),
            )

    def _load(self) -> None:
        a = self.args
        fresh_optimizer = a.no_load_optim or a.finetune
        out = checkpointing.load_checkpoint(
            a.load, self.model, None if fresh_optimizer else self.optimizer,
            None if fresh_optimizer else self.scheduler, load_rng=not (a.no_load_rng or a.finetune),
        )
        if not a.finetune:
            st = out["common"].get("state")
            if st:
                self.state = TrainState.from_dict(st)
            self.state.lineage = list(self.resume.get("lineage") or [])
        if not out["loaded_optimizer"]:
            # Fresh optimizer state (--finetune, --no-load-optim, or a checkpoint without one, e.g. a
            # converted Hugging Face model): its fp32 main params must start from the loaded weights.
            self.optimizer.reload_model_params()

    # ------------------------------------------------------------------ data
    def build_data(self) -> None:
        a = self.args
        self.batch = GlobalBatch(
            a.micro_batch_size, a.global_batch_size, parallel_state.get_data_parallel_world_size(),
            parallel_state.get_data_parallel_rank(),
        )
        n_train = a.train_iters * a.global_batch_size
        # no validation split is built unless it is used (a split too small for one sample is refused)
        n_valid = (a.train_iters // a.eval_interval + 1) * a.eval_iters * a.global_batch_size if a.eval_interval else 0
        self.cooldown_ds = None
        if self.datasets_provider is not None:
            self.train_ds, self.valid_ds, _ = self.datasets_provider([n_train, n_valid, 0])
        elif a.mock_data:
            vocab = self.arch.padded_vocab_size if self.tokenizer is None else self.tokenizer.vocab_size
            self.train_ds = MockDataset(vocab, a.seq_length, a.seed)
            self.valid_ds = MockDataset(vocab, a.seq_length, a.seed + 1)
        else:
            if a.data_path:
                blend = parse_blend(a.data_path)
            else:
                # The cache (~/.cache/megatron_growloop, or $MEGATRON_GROWLOOP_CACHE) is per node unless
                # it is on a shared file system: every node's local rank 0 builds it (concurrent
                # builds publish atomically), the other ranks wait.
                if int(os.environ.get("LOCAL_RANK", "0")) == 0:
                    default_data_prefix(self.tokenizer)
                dist.barrier()
                blend = ([default_data_prefix(self.tokenizer, build=False)], None)
            self.train_ds, self.valid_ds, _ = build_gpt_datasets(
                blend, self.tokenizer, a.seq_length, [n_train, n_valid, 0], a.split, a.seed, a.data_cache_path
            )
            if a.cooldown_data_path:
                n_cool = (a.train_iters - a.cooldown_start_iter) * a.global_batch_size
                self.cooldown_ds, _, _ = build_gpt_datasets(
                    parse_blend(a.cooldown_data_path), self.tokenizer, a.seq_length, [max(n_cool, 1), 0, 0],
                    "100,0,0", a.seed, a.data_cache_path,
                )
            if self.train_ds is None:
                raise UsageError("--split leaves no training data")
        self._make_iterators()

    def _make_iterators(self) -> None:
        a, st = self.args, self.state
        loader = dict(num_workers=a.num_workers, pin_memory=torch.cuda.is_available())
        cool = a.cooldown_start_iter if self.cooldown_ds is not None else None
        if cool is not None and st.iteration >= cool:
            self.train_iter = MicroBatchIterator(
                self.cooldown_ds, self.batch, (st.iteration - cool) * a.global_batch_size, **loader
            )
            self._in_cooldown = True
        else:
            self.train_iter = MicroBatchIterator(self.train_ds, self.batch, st.consumed_train_samples, **loader)
            self._in_cooldown = False
        self.valid_iter = (
            MicroBatchIterator(self.valid_ds, self.batch, st.consumed_valid_samples, **loader)
            if self.valid_ds
            else None
        )

    # ------------------------------------------------------------------ steps
    def _fwd_bwd(self, data_iter, forward_only: bool):
        a = self.args
        fb = get_forward_backward_func()
        return fb(
            forward_step_func=forward_step,
            data_iterator=data_iter,
            model=self.model,
            num_microbatches=self.batch.num_microbatches,
            seq_length=a.seq_length,
            micro_batch_size=a.micro_batch_size,
            decoder_seq_length=a.seq_length,
            forward_only=forward_only,
        )

    def _reduce_losses(self, losses: List[Dict[str, torch.Tensor]]) -> Optional[torch.Tensor]:
        """Mean loss over the global batch as a device scalar, on the last pipeline stage.

        As Megatron-LM's ``train_step`` (``megatron/training/training.py``): the per-micro-batch
        ``[sum, tokens]`` pairs are summed and all-reduced over DP on the device, and the ratio
        stays a device tensor -- no host synchronisation.  The host reads it only where a value
        is needed (:func:`loss_value`: log intervals, the metrics file, the end of the run)."""
        if not parallel_state.is_pipeline_last_stage():
            return None
        total = torch.zeros(2, dtype=torch.float32, device=platform.device())
        for item in losses:
            total += item["lm loss"].to(total)
        dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
        return total[0] / total[1].clamp(min=1)

    def train_step(self) -> Dict[str, Any]:
        self._grad_ready.select(self.model, self._grad_sync_key())
        if self.cooldown_ds is not None and not self._in_cooldown and self.state.iteration >= self.args.cooldown_start_iter:
            self._make_iterators()
        for m in self.model:
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step trains with
        losses = self._fwd_bwd(self.train_iter, forward_only=False)
        use_torch_fused_adam(self.optimizer)  # again: loading an unfused run's state restores fused=False
        ok, grad_norm, _ = self.optimizer.step()
        if ok:
            self.scheduler.step(increment=1)
        loss = self._reduce_losses(losses)
        return {"loss": loss, "grad_norm": grad_norm, "ok": ok, "lr": lr}

    @torch.no_grad()
    def evaluate(self) -> Optional[float]:
        if self.valid_iter is None:
            return None
        for m in self.model:
            m.eval()
        all_losses = []
        for _ in range(self.args.eval_iters):
            all_losses.extend(self._fwd_bwd(self.valid_iter, forward_only=True))
            self.state.consumed_valid_samples += self.args.global_batch_size
        for m in self.model:
            m.train()
        return loss_value(self._reduce_losses(all_losses))

    def _diverged(self, it: int, loss: Optional[float], grad_norm: Optional[float], verdict: StepVerdict) -> None:
        """Stop without saving: one line naming the iteration and the last good checkpoint."""
        values = [loss, None if grad_norm is None else float(grad_norm)]
        if self.world_size > 1:  # the last pipeline stage knows the loss; rank 0 prints the message
            dist.broadcast_object_list(values, src=self.world_size - 1)
        a = self.args
        last = (checkpointing.latest_checkpoint(a.save) if a.save else None) or a.load
        self.stop.release()
        raise TrainingDiverged(divergence_message(it, values[0], values[1], verdict, last))

    @torch.no_grad()
    def evaluate_at_repeats(self, repeats: Sequence[int]) -> Dict[int, Optional[float]]:
        """Validation loss of the looped model at each k in ``repeats`` (``--eval-loop-repeats``),
        all on the same ``--eval-iters`` batches; the model's k is restored afterwards."""
        if self.valid_iter is None:
            return {}
        batches = [next(self.valid_iter) for _ in range(self.args.eval_iters * self.batch.num_microbatches)]
        self.state.consumed_valid_samples += self.args.eval_iters * self.args.global_batch_size
        current = self.arch.loop.repeats
        out: Dict[int, Optional[float]] = {}
        for m in self.model:
            m.eval()
        try:
            for k in repeats:
                self.set_loop_repeats(k)
                data = iter(batches)
                losses = []
                for _ in range(self.args.eval_iters):
                    losses.extend(self._fwd_bwd(data, forward_only=True))
                out[k] = loss_value(self._reduce_losses(losses))
        finally:
            self.set_loop_repeats(current)
            for m in self.model:
                m.train()
        return out

    # ------------------------------------------------------------------ main loop
    def setup(self) -> None:
        a = self.args
        if a.fresh_start and self.is_logging_rank:
            print(f"no checkpoint in {a.save} yet: starting from scratch", flush=True)
        # signals are recorded from here on and acted on between training steps
        self.stop = StopConditions(getattr(a, "exit_signal_numbers", ()), getattr(a, "exit_duration_in_mins", None),
                                   getattr(a, "check_for_nan_in_loss_and_grad", True))
        fresh_weights = not a.load and getattr(a, "layout_independent_init", False)
        self._build(init_seed=a.seed if fresh_weights else None)
        if a.load:
            self._load()
        self.build_data()
        for c in self.controllers:
            c.setup(self, self.resume)

    def describe(self) -> str:
        arch = self.arch
        s = self.accounting()
        loop = f"Loop({arch.loop})" if arch.loop else "no loop"
        return (
            f"model: {arch.num_layers} unique layers, effective depth {s['effective_depth']} ({loop}), "
            f"hidden {arch.hidden_size}, heads {arch.num_attention_heads}/{arch.num_query_groups}, "
            f"ffn {arch.ffn_hidden_size}, vocab {arch.padded_vocab_size}; unique parameters {s['unique_parameters']:,}; "
            f"inference {s['inference_flops_per_token'] / 1e9:.3f} GFLOP/token; "
            f"parallel TP={self.layout.tp} PP={self.layout.pp} "
            f"DP={parallel_state.get_data_parallel_world_size()}; {self.impl.describe()}; "
            f"{self.impl.fusion_summary(looped=looped(arch))}; "
            f"device {'cuda' if platform.has_cuda() else 'cpu'}"
        )

    def _write_metrics(self, it: int, out: Dict[str, Any], depth: int, dt: float, extra: Dict[str, Any]) -> None:
        rec = {
            "iteration": it,
            "loss": loss_value(out["loss"]),
            "lr": out["lr"],
            "grad_norm": None if out["grad_norm"] is None else float(out["grad_norm"]),
            "effective_depth": depth,
            "num_layers": self.arch.num_layers,
            "step_time_s": dt,
            "training_flops": self.state.training_flops,
            "consumed_train_samples": self.state.consumed_train_samples,
            "data": "cooldown" if self._in_cooldown else "main",
            "tokens_per_iteration": self.args.global_batch_size * self.args.seq_length,
            "peak_memory_bytes": peak_memory_bytes(),
            **extra,
        }
        with open(self.args.metrics_file, "a") as f:
            f.write(json.dumps(rec) + "\n")

    def train(self) -> Dict[str, Any]:
        a = self.args
        logger = MetricsLogger(self.is_logging_rank, a.tensorboard_dir, a.train_iters, self.state.iteration)
        self.logger = logger
        logger.text(self.describe())
        for line in self.impl.warnings(platform.has_cuda(), getattr(a, "impl_fallback", None)):
            logger.text(f"warning: {line}")
        for c in self.controllers:
            line = c.describe()
            if line:
                logger.text(line)
        tokens_per_iter = a.global_batch_size * a.seq_length
        peak = None
        if platform.has_cuda():
            peak = accounting.device_peak_flops(torch.cuda.get_device_name(), fp8=bool(a.fp8_format))
        last = {"loss": None}
        window_t, window_flops, window_tokens, window_n, window_k = 0.0, 0.0, 0, 0, 0
        window_loss = None  # sum of the window's per-step losses, on the device (Megatron-LM's total_loss_dict)
        final_eval = None
        stopped = None
        while self.state.iteration < a.train_iters:
            for c in self.controllers:
                c.before_step(self)
            t0 = time.perf_counter()
            out = self.train_step()
            if out["loss"] is not None:
                window_loss = out["loss"].detach() if window_loss is None else window_loss + out["loss"]
            it = self.state.iteration + 1
            host_loss = None  # a host value of the loss exists only at log intervals
            if it % a.log_interval == 0 or it == a.train_iters:
                # the host read waits for the device: inside the timed step, so that the window's
                # time is the device's, not only the launches'
                host_loss = loss_value(None if window_loss is None else window_loss / (window_n + 1))
                window_loss = None
            dt = time.perf_counter() - t0
            depth = self.unwrapped.effective_depth
            backward = self.unwrapped.backward_depth  # < depth with truncated backprop
            repeats = self.arch.loop.repeats if self.arch.loop is not None else None
            flops = self.arch.shape.training_flops_per_token(depth, a.seq_length, backward) * tokens_per_iter
            self.state.iteration += 1
            self.state.consumed_train_samples += a.global_batch_size
            self.state.tokens += tokens_per_iter
            self.state.training_flops += flops
            for c in self.controllers:
                c.after_step(self)
            window_t += dt
            window_flops += flops
            window_tokens += tokens_per_iter
            window_n += 1
            window_k += repeats or 0
            last = out
            if a.metrics_file and self.is_logging_rank:  # per-step records: a host read every step
                loop = {} if repeats is None else {"loop_repeats": repeats, "backward_depth": backward}
                self._write_metrics(it, out, depth, dt, loop)
            if it % a.log_interval == 0 or it == a.train_iters:
                tflops = window_flops / window_t / self.world_size / 1e12
                metrics = {
                    "lm loss": host_loss,
                    "learning-rate": out["lr"],
                    "grad-norm": float(out["grad_norm"]) if out["grad_norm"] is not None else None,
                    "tokens-per-sec": window_tokens / window_t,
                    "tflops-per-device": tflops,
                    "effective-depth": depth,
                    "step-time-ms": 1000 * window_t / window_n,
                    "training-flops": self.state.training_flops,
                    "peak-memory-bytes": peak_memory_bytes(),
                }
                if peak:
                    metrics["mfu"] = tflops * 1e12 / peak
                if repeats is not None:
                    metrics["loop-repeats"] = window_k / window_n  # mean k over the interval
                logger.log(it, metrics)
                window_t, window_flops, window_tokens, window_n, window_k = 0.0, 0.0, 0, 0, 0
            # signals, time limit, NaN/Inf: one verdict for all ranks, before anything is saved.  Host
            # values only (stop_conditions.py): the grad norm every step (megatron-core's optimizer
            # returns a float), the loss at log intervals (the window's mean: a NaN at any of its
            # steps shows), None in between.
            verdict = self.stop.check(host_loss, out["grad_norm"])
            if verdict.diverged:
                self._diverged(it, host_loss, out["grad_norm"], verdict)
            if verdict.exit_reason:
                stopped = verdict.exit_reason
                break
            if a.eval_interval and it % a.eval_interval == 0:
                val = self.evaluate()
                final_eval = val
                if val is not None:
                    logger.log(it, {"validation loss": val, "validation ppl": math.exp(min(val, 50))}, console=False)
                    logger.text(f"validation at iteration {it} | loss {val:.4f} | ppl {math.exp(min(val, 50)):.2f}")
                if a.eval_loop_repeats:
                    per_k = self.evaluate_at_repeats(a.eval_loop_repeats)
                    if per_k and None not in per_k.values():
                        logger.log(it, {f"validation loss/k{k}": v for k, v in per_k.items()}, console=False)
                        logger.text(f"validation at iteration {it} by loop repeats | "
                                    + " | ".join(f"k={k} loss {v:.4f}" for k, v in per_k.items()))
            if a.save and a.save_interval and it % a.save_interval == 0 and it != a.train_iters:
                self.save()
            if a.exit_interval and it % a.exit_interval == 0:
                break
        saved = self.save() if a.save else None
        self.stop.release()
        if stopped:
            where = f"checkpoint saved to {saved}" if saved else "no --save directory, nothing saved"
            logger.text(f"{stopped} at iteration {self.state.iteration}: {where}; exiting")
        summary = {
            "stopped": stopped,
            "iteration": self.state.iteration,
            "final_loss": loss_value(last.get("loss")),
            "validation_loss": final_eval,
            "training_flops": self.state.training_flops,
            "checkpoint": saved,
            "tensorboard_dir": a.tensorboard_dir,
        }
        for c in self.controllers:
            summary.update(c.finish(self))
        logger.close()
        return summary
