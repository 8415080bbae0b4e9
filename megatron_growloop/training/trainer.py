"""The training loop on megatron-core: DDP, the Megatron optimizer, pipeline schedules.

One :class:`Trainer` owns the model chunks, the DDP wrapper, the optimizer and the
LR scheduler.  :meth:`Trainer.build` can be called again at another depth (depth
growth rebuilds everything but the scheduler, the counters and the data
iterators).
"""

from __future__ import annotations

import math
import os
import resource
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func

from .. import accounting, platform
from ..data.datasets import BatchSchedule, MicroBatchIterator, build_gpt_datasets, parse_blend
from ..data.tokenizer import build_tokenizer
from ..errors import UsageError
from ..growth.operators import Lineage, initial_lineage
from ..looping.spec import LoopSpec, RepeatBlock
from ..model.config import ARCH_FIELDS, GrowLoopConfig, build_transformer_config, stage_sizes_for
from ..model.gpt import GrowLoopGPTModel, build_model
from . import checkpointing
from .initialize import init_distributed
from .logger import MetricsLogger


def pad_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    multiple = divisible_by * tp
    return int(math.ceil(vocab_size / multiple) * multiple)


@dataclass
class TrainState:
    iteration: int = 0
    consumed_train_samples: int = 0
    consumed_valid_samples: int = 0
    training_flops: float = 0.0
    tokens: int = 0
    growth_steps_done: int = 0
    lineage: List[Dict[str, int]] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Token-summed loss; megatron-core divides by the global token count (per-token loss)."""
    losses = output_tensor.float().view(-1)
    mask = loss_mask.view(-1).float()
    total = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([total.detach().clone(), mask.sum().detach()])
    return total, num_tokens, {"lm loss": report}


def forward_step(data_iterator, model):
    batch = next(data_iterator)
    dev = platform.device()
    tokens = batch["tokens"].to(dev, non_blocking=True)
    labels = batch["labels"].to(dev, non_blocking=True)
    loss_mask = batch["loss_mask"].to(dev, non_blocking=True)
    position_ids = batch["position_ids"].to(dev, non_blocking=True)
    output = model(tokens, position_ids, None, labels=labels)
    return output, partial(loss_func, loss_mask)


def peak_memory_bytes() -> int:
    if platform.has_cuda():
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class Trainer:
    def __init__(self, args):
        self.args = args
        init_distributed(
            args.tensor_model_parallel_size,
            args.pipeline_model_parallel_size,
            backend=args.distributed_backend,
            timeout_minutes=args.distributed_timeout_minutes,
            seed=args.seed,
        )
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.is_logging_rank = self.rank == self.world_size - 1  # on the last pipeline stage
        self.tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model) if not args.mock_data or args.vocab_size is None else None
        vocab = self.tokenizer.vocab_size if self.tokenizer is not None else args.vocab_size
        self.padded_vocab_size = pad_vocab_size(vocab, args.make_vocab_size_divisible_by, args.tensor_model_parallel_size)
        self.state = TrainState()
        self.num_layers = args.num_layers
        self.loop = args.loop
        self.state.lineage = [l.to_dict() for l in initial_lineage(self.num_layers)]
        self.model: List[torch.nn.Module] = []
        self.optimizer = None
        self.scheduler = None
        self.config: Optional[GrowLoopConfig] = None
        self.growth_plan = getattr(args, "growth_plan", None)
        self._load_meta: Optional[Dict[str, Any]] = None

    # ------------------------------------------------------------------ building
    @property
    def tied(self) -> bool:
        return not self.args.untie_embeddings_and_output_weights

    def build(self, num_layers: int, loop: Optional[str]) -> None:
        """(Re)build config, model, DDP and optimizer at ``num_layers`` unique layers."""
        args = self.args
        self.config = build_transformer_config(args, num_layers=num_layers, loop=loop)
        model = build_model(
            self.config,
            vocab_size=self.padded_vocab_size,
            max_sequence_length=args.max_position_embeddings,
            rotary_base=args.rotary_base,
            share_embeddings_and_output_weights=self.tied,
            transformer_impl=args.transformer_impl,
            rope_scaling=bool(getattr(args, "rope_scaling", False)),
            rope_scaling_factor=float(getattr(args, "rope_scaling_factor", None) or 8.0),
        )
        if platform.has_cuda():
            model.cuda(torch.cuda.current_device())
        if args.bf16 or args.fp16:
            # As Megatron-LM: cast every parameter (norms included) to the 16-bit dtype and convert
            # inputs/outputs at the pipeline ends; the optimizer keeps fp32 main params.
            from megatron.core.transformer.module import Float16Module

            model = Float16Module(self.config, model)
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=args.overlap_grad_reduce,
            overlap_param_gather=args.overlap_param_gather,
            use_distributed_optimizer=args.use_distributed_optimizer,
            check_for_nan_in_grad=False,
        )
        ddp = DistributedDataParallel(config=self.config, ddp_config=ddp_config, module=model)
        ddp.broadcast_params()
        self.model = [ddp]
        opt_config = OptimizerConfig(
            optimizer="adam",
            lr=args.lr,
            min_lr=args.min_lr,
            weight_decay=args.weight_decay,
            adam_beta1=args.adam_beta1,
            adam_beta2=args.adam_beta2,
            adam_eps=args.adam_eps,
            clip_grad=args.clip_grad,
            bf16=args.bf16,
            fp16=args.fp16,
            params_dtype=self.config.params_dtype,
            use_distributed_optimizer=args.use_distributed_optimizer,
            overlap_param_gather=args.overlap_param_gather,
        )
        self.optimizer = get_megatron_optimizer(opt_config, self.model)
        if self.scheduler is None:
            self.scheduler = self._build_scheduler()
        else:  # keep the schedule position; point it at the new optimizer
            self.scheduler.optimizer = self.optimizer
            self.scheduler.step(0)
        cfg = self.config
        cfg.grad_scale_func = self.optimizer.scale_loss
        cfg.no_sync_func = ddp.no_sync
        cfg.finalize_model_grads_func = finalize_model_grads
        if args.overlap_grad_reduce:
            cfg.grad_sync_func = ddp.start_grad_sync
        if args.overlap_param_gather:
            cfg.param_sync_func = ddp.start_param_sync
        self.num_layers, self.loop = num_layers, loop

    def _build_scheduler(self) -> OptimizerParamScheduler:
        a = self.args
        return OptimizerParamScheduler(
            self.optimizer,
            init_lr=0.0 if a.lr_warmup_iters > 0 else a.lr,
            max_lr=a.lr,
            min_lr=a.min_lr,
            lr_warmup_steps=a.lr_warmup_iters,
            lr_decay_steps=a.lr_decay_iters,
            lr_decay_style=a.lr_decay_style,
            start_wd=a.weight_decay,
            end_wd=a.weight_decay,
            wd_incr_steps=a.train_iters,
            wd_incr_style="constant",
            use_checkpoint_opt_param_scheduler=False,
            override_opt_param_scheduler=True,
            wsd_decay_steps=a.lr_wsd_decay_iters,
            lr_wsd_decay_style=a.lr_wsd_decay_style,
        )

    @property
    def unwrapped(self) -> GrowLoopGPTModel:
        return checkpointing.unwrap(self.model[0])

    # ------------------------------------------------------------------ metadata
    def arch_metadata(self) -> Dict[str, Any]:
        a = self.args
        return {
            "num_layers": self.num_layers,
            "hidden_size": a.hidden_size,
            "num_attention_heads": a.num_attention_heads,
            "num_query_groups": a.num_query_groups,
            "ffn_hidden_size": a.ffn_hidden_size,
            "kv_channels": a.kv_channels,
            "seq_length": a.seq_length,
            "max_position_embeddings": a.max_position_embeddings,
            "rotary_base": a.rotary_base,
            "rope_scaling": bool(getattr(a, "rope_scaling", False)),
            "rope_scaling_factor": float(getattr(a, "rope_scaling_factor", 8.0)),
            "norm_epsilon": a.norm_epsilon,
            "init_method_std": a.init_method_std,
            "untie_embeddings_and_output_weights": bool(a.untie_embeddings_and_output_weights),
            "padded_vocab_size": self.padded_vocab_size,
            "make_vocab_size_divisible_by": a.make_vocab_size_divisible_by,
            "loop": self.loop,
        }

    def checkpoint_metadata(self) -> Dict[str, Any]:
        a = self.args
        meta = {
            "arch": self.arch_metadata(),
            "model_preset": a.model_preset,
            "tokenizer": {
                "type": a.tokenizer_type,
                "model": a.tokenizer_model,
                "vocab_size": self.tokenizer.vocab_size if self.tokenizer else a.vocab_size,
            },
            "accounting": accounting.summary(
                self.config, self.padded_vocab_size, self.tied, a.seq_length, self.unwrapped.effective_depth
            ),
            "training_flops": self.state.training_flops,
            "consumed_train_samples": self.state.consumed_train_samples,
            "tokens": self.state.tokens,
            "lineage": self.state.lineage,
            "growth": None,
        }
        if self.growth_plan is not None:
            p = self.growth_plan
            meta["growth"] = {
                "method": p.method,
                "block_size": p.block_size,
                "start_depth": p.start_depth,
                "final_depth": p.final_depth,
                "grow_iters": p.grow_iters,
                "alpha": p.alpha,
                "budgets": p.budgets,
                "growth_iterations": p.growth_iterations,
                "steps_done": self.state.growth_steps_done,
            }
        return meta

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> Optional[str]:
        if not self.args.save:
            return None
        path = checkpointing.save_checkpoint(
            self.args.save,
            self.state.iteration,
            self.model,
            self.optimizer,
            self.scheduler,
            common={"state": self.state.to_dict()},
            metadata=self.checkpoint_metadata(),
        )
        return path

    def _resolve_resume(self) -> None:
        """Take depth, loop and lineage from the checkpoint being resumed."""
        a = self.args
        meta = checkpointing.read_metadata(a.load)
        arch = meta.get("arch", {})
        for name in ("hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size", "kv_channels",
                     "untie_embeddings_and_output_weights", "rope_scaling"):
            if name in arch and arch[name] != getattr(a, name, None):
                flag = "--use-rope-scaling" if name == "rope_scaling" else "--" + name.replace("_", "-")
                raise UsageError(
                    f"--load {a.load!r} has {name}={arch[name]} but this run has "
                    f"{flag} {getattr(a, name, None)} (pass --use-checkpoint-args to take the checkpoint's architecture)"
                )
        if "padded_vocab_size" in arch and arch["padded_vocab_size"] != self.padded_vocab_size:
            ckpt_vocab = arch["padded_vocab_size"]
            if ckpt_vocab % a.tensor_model_parallel_size:
                raise UsageError(
                    f"--load {a.load!r} has padded vocabulary {ckpt_vocab}, which TP "
                    f"{a.tensor_model_parallel_size} cannot split; use another TP size"
                )
            self.padded_vocab_size = ckpt_vocab
        self.num_layers = int(arch.get("num_layers", self.num_layers))
        self.loop = arch.get("loop")
        if meta.get("lineage") and not a.finetune:
            self.state.lineage = meta["lineage"]
        elif len(self.state.lineage) != self.num_layers:
            self.state.lineage = [l.to_dict() for l in initial_lineage(self.num_layers)]
        if a.retrofit_loop:
            if self.loop:
                raise UsageError(
                    f"--load {a.load!r} is already looped ({self.loop}); change its k with --loop-repeats"
                )
            block = RepeatBlock.parse(a.retrofit_loop, what="--retrofit-loop")
            self.loop = str(LoopSpec.from_block(self.num_layers, block))
        if a.loop_repeats is not None:
            if not self.loop:
                raise UsageError(f"--loop-repeats: the checkpoint {a.load!r} has no loop")
            self.loop = str(LoopSpec.parse(self.loop).with_repeats(a.loop_repeats))
        self._load_meta = meta

    def _load(self) -> None:
        a = self.args
        optimizer = None if (a.no_load_optim or a.finetune) else self.optimizer
        scheduler = None if (a.no_load_optim or a.finetune) else self.scheduler
        out = checkpointing.load_checkpoint(
            a.load, self.model, optimizer, scheduler, load_rng=not (a.no_load_rng or a.finetune)
        )
        if not a.finetune:
            st = out["common"].get("state")
            if st:
                lineage = self.state.lineage
                self.state = TrainState(**st)
                self.state.lineage = lineage
        if not out["loaded_optimizer"]:
            # Fresh optimizer state (--finetune, --no-load-optim, or a checkpoint without one, e.g. a
            # converted Hugging Face model): its fp32 main params must start from the loaded weights.
            self.optimizer.reload_model_params()

    # ------------------------------------------------------------------ data
    def build_data(self) -> None:
        a = self.args
        self.schedule = BatchSchedule(
            a.micro_batch_size, a.global_batch_size, parallel_state.get_data_parallel_world_size(),
            parallel_state.get_data_parallel_rank(),
        )
        n_train = a.train_iters * a.global_batch_size
        n_eval_rounds = (a.train_iters // a.eval_interval + 1) if a.eval_interval else 1
        n_valid = n_eval_rounds * a.eval_iters * a.global_batch_size
        if a.mock_data:
            from ..data.mock import MockDataset

            self.train_ds = MockDataset(self.padded_vocab_size if self.tokenizer is None else self.tokenizer.vocab_size,
                                        a.seq_length, a.seed)
            self.valid_ds = MockDataset(self.train_ds.vocab_size, a.seq_length, a.seed + 1)
            self.cooldown_ds = None
        else:
            if a.data_path:
                blend = parse_blend(a.data_path)
            else:
                from ..data.default_corpus import default_data_prefix

                if dist.get_rank() == 0:
                    default_data_prefix(self.tokenizer)
                dist.barrier()
                blend = ([default_data_prefix(self.tokenizer, build=False)], None)
            self.train_ds, self.valid_ds, _ = build_gpt_datasets(
                blend, self.tokenizer, a.seq_length, [n_train, n_valid, 0], a.split, a.seed, a.data_cache_path
            )
            self.cooldown_ds = None
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
        cool = a.cooldown_start_iter if self.cooldown_ds is not None else None
        if cool is not None and st.iteration >= cool:
            self.train_iter = MicroBatchIterator(
                self.cooldown_ds, self.schedule, (st.iteration - cool) * a.global_batch_size
            )
            self._in_cooldown = True
        else:
            self.train_iter = MicroBatchIterator(self.train_ds, self.schedule, st.consumed_train_samples)
            self._in_cooldown = False
        self.valid_iter = (
            MicroBatchIterator(self.valid_ds, self.schedule, st.consumed_valid_samples) if self.valid_ds else None
        )

    # ------------------------------------------------------------------ steps
    def _fwd_bwd(self, data_iter, forward_only: bool):
        a = self.args
        fb = get_forward_backward_func()
        return fb(
            forward_step_func=forward_step,
            data_iterator=data_iter,
            model=self.model,
            num_microbatches=self.schedule.num_microbatches,
            seq_length=a.seq_length,
            micro_batch_size=a.micro_batch_size,
            decoder_seq_length=a.seq_length,
            forward_only=forward_only,
        )

    def _reduce_losses(self, losses: List[Dict[str, torch.Tensor]]) -> Optional[float]:
        """Mean loss over the global batch, known on the last pipeline stage."""
        if not parallel_state.is_pipeline_last_stage():
            return None
        total = torch.zeros(2, dtype=torch.float64, device=platform.device())
        for item in losses:
            total += item["lm loss"].to(total)
        dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
        return float(total[0] / total[1].clamp(min=1))

    def train_step(self) -> Dict[str, Any]:
        if self.cooldown_ds is not None and not self._in_cooldown and self.state.iteration >= self.args.cooldown_start_iter:
            self._make_iterators()
        for m in self.model:
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step trains with
        losses = self._fwd_bwd(self.train_iter, forward_only=False)
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
        return self._reduce_losses(all_losses)

    # ------------------------------------------------------------------ main loop
    def setup(self) -> None:
        a = self.args
        if a.load and a.save and os.path.abspath(a.load) == os.path.abspath(a.save):
            # Megatron-LM's auto-resume idiom (--save X --load X): a run that has not saved yet
            # starts from scratch instead of failing.
            if not os.path.exists(os.path.join(a.load, checkpointing.TRACKER)):
                if a.retrofit_loop or a.finetune:
                    raise UsageError(f"--load {a.load!r} holds no checkpoint to continue from")
                if self.is_logging_rank:
                    print(f"no checkpoint in {a.load} yet: starting from scratch", flush=True)
                a.load = None
        if a.load:
            self._resolve_resume()
        self.build(self.num_layers, self.loop)
        if a.load:
            self._load()
        self.build_data()
        if self.growth_plan is not None:
            from ..growth.apply import check_resume_depth

            check_resume_depth(self)

    def describe(self) -> str:
        a = self.args
        s = accounting.summary(self.config, self.padded_vocab_size, self.tied, a.seq_length, self.unwrapped.effective_depth)
        loop = f"Loop({self.loop})" if self.loop else "no loop"
        return (
            f"model: {self.num_layers} unique layers, effective depth {s['effective_depth']} ({loop}), "
            f"hidden {a.hidden_size}, heads {a.num_attention_heads}/{a.num_query_groups}, ffn {a.ffn_hidden_size}, "
            f"vocab {self.padded_vocab_size}; unique parameters {s['unique_parameters']:,}; "
            f"inference {s['inference_flops_per_token'] / 1e9:.3f} GFLOP/token; "
            f"parallel TP={a.tensor_model_parallel_size} PP={a.pipeline_model_parallel_size} "
            f"DP={parallel_state.get_data_parallel_world_size()}; impl {a.transformer_impl}; "
            f"device {'cuda' if platform.has_cuda() else 'cpu'}"
        )

    def _write_metrics(self, it: int, out: Dict[str, Any], depth: int, dt: float) -> None:
        import json

        rec = {
            "iteration": it,
            "loss": out["loss"],
            "lr": out["lr"],
            "grad_norm": None if out["grad_norm"] is None else float(out["grad_norm"]),
            "effective_depth": depth,
            "num_layers": self.num_layers,
            "step_time_s": dt,
            "training_flops": self.state.training_flops,
            "consumed_train_samples": self.state.consumed_train_samples,
            "data": "cooldown" if self._in_cooldown else "main",
            "tokens_per_iteration": self.args.global_batch_size * self.args.seq_length,
            "peak_memory_bytes": peak_memory_bytes(),
        }
        with open(self.args.metrics_file, "a") as f:
            f.write(json.dumps(rec) + "\n")

    def train(self) -> Dict[str, Any]:
        a = self.args
        logger = MetricsLogger(self.is_logging_rank, a.tensorboard_dir, a.train_iters, self.state.iteration)
        self.logger = logger
        logger.text(self.describe())
        if self.growth_plan is not None:
            logger.text(self.growth_plan.describe())
        shape = accounting.ArchShape.from_config(self.config, self.padded_vocab_size, self.tied)
        tokens_per_iter = a.global_batch_size * a.seq_length
        peak = None
        if platform.has_cuda():
            peak = accounting.device_peak_flops(torch.cuda.get_device_name(), fp8=bool(a.fp8_format))
        last = {"loss": None}
        window_t, window_flops, window_tokens, window_n = 0.0, 0.0, 0, 0
        final_eval = None
        while self.state.iteration < a.train_iters:
            if self.growth_plan is not None:
                from ..growth.apply import maybe_grow

                if maybe_grow(self):
                    shape = accounting.ArchShape.from_config(self.config, self.padded_vocab_size, self.tied)
            t0 = time.perf_counter()
            out = self.train_step()
            dt = time.perf_counter() - t0
            depth = self.unwrapped.effective_depth
            flops = shape.training_flops_per_token(depth, a.seq_length) * tokens_per_iter
            self.state.iteration += 1
            self.state.consumed_train_samples += a.global_batch_size
            self.state.tokens += tokens_per_iter
            self.state.training_flops += flops
            window_t += dt
            window_flops += flops
            window_tokens += tokens_per_iter
            window_n += 1
            last = out
            it = self.state.iteration
            if a.metrics_file and self.is_logging_rank:
                self._write_metrics(it, out, depth, dt)
            if it % a.log_interval == 0 or it == a.train_iters:
                tflops = window_flops / window_t / self.world_size / 1e12
                metrics = {
                    "lm loss": out["loss"],
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
                logger.log(it, metrics)
                window_t, window_flops, window_tokens, window_n = 0.0, 0.0, 0, 0
            if a.eval_interval and it % a.eval_interval == 0:
                val = self.evaluate()
                final_eval = val
                if val is not None:
                    logger.log(it, {"validation loss": val, "validation ppl": math.exp(min(val, 50))}, console=False)
                    logger.text(f"validation at iteration {it} | loss {val:.4f} | ppl {math.exp(min(val, 50)):.2f}")
            if a.save and a.save_interval and it % a.save_interval == 0 and it != a.train_iters:
                self.save()
            if a.exit_interval and it % a.exit_interval == 0:
                break
        saved = self.save() if a.save else None
        summary = {
            "iteration": self.state.iteration,
            "final_loss": last.get("loss"),
            "validation_loss": final_eval,
            "training_flops": self.state.training_flops,
            "checkpoint": saved,
            "tensorboard_dir": a.tensorboard_dir,
        }
        if self.growth_plan is not None:
            from ..growth.apply import flops_report

            summary["growth_flops"] = flops_report(self)
            logger.text(summary["growth_flops"]["text"])
        logger.close()
        return summary
