"""The growth step inside a running (torchrun) training job.

Mediated by the model-space (``fully_reshardable``) state, so it is correct for every
TP/PP/DP layout and both optimizers:

1. take model + optimizer state in model space and keep it -- in memory when no layer
   changes pipeline stage, else in a torch_dist checkpoint in a scratch directory on fast
   local storage (``/dev/shm`` when all ranks share one node); see :mod:`.transfer`;
2. drop the model, DDP and optimizer; ``Trainer.build(new_depth)`` builds config, model (new
   balanced pipeline layout: layers move between stages), DDP and optimizer, and re-points
   the kept LR scheduler;
3. load through the *source view* (new layer ``g`` reads old layer ``src[g]``) with the dedup
   loader: weights, fp32 main params, both Adam moments and the Adam step come back; the
   iteration counter, consumed samples, data iterators, RNG and scheduler never left memory.

Never deep-copies live modules.  Hooks called by the trainer: :func:`check_resume_depth`
(setup), :func:`maybe_grow` (before each step), :func:`flops_report` (end of training).
"""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
import time
from typing import Dict, List, Optional

import torch

from .. import platform
from ..accounting import ArchShape
from ..errors import UsageError
from ..model.config import stage_sizes_for
from ..training import checkpointing
from . import flops as growth_flops
from .operators import Lineage, compose, grow_lineage, initial_lineage
from ..training.optimizer_state import ensure_optimizer_state, load_optimizer_state
from .source_view import DedupLoadStrategy, source_view_sharded_state_dict
from .transfer import CheckpointTransfer, ExchangeTransfer, MemoryTransfer, memory_transfer_possible

__all__ = ["DedupLoadStrategy", "check_resume_depth", "maybe_grow", "grow", "flops_report", "scratch_base"]

# Test/debug hook: when set, every growth step saves the freshly grown state (before any
# training at the new depth) as a regular checkpoint under $MEGATRON_GROWLOOP_GROWTH_DUMP/step_<s>.
DUMP_ENV = "MEGATRON_GROWLOOP_GROWTH_DUMP"


# ------------------------------------------------------------------------------ resume
def check_resume_depth(trainer) -> None:
    """After setup: the depth (resumed or not) must be a state the growth plan passes through."""
    plan = trainer.growth_plan
    depth, it = trainer.num_layers, trainer.state.iteration
    done, rest = divmod(depth - plan.start_depth, plan.block_size)
    if rest or not 0 <= done <= len(plan.maps):
        raise UsageError(
            f"the checkpoint has {depth} layers, which the growth plan ({plan.start_depth} -> {plan.final_depth} "
            f"in steps of {plan.block_size}) never has; check --num-layers/--grow-* against the run being resumed"
        )
    meta = getattr(trainer, "_load_meta", None) or {}
    saved = meta.get("growth")
    if saved and not trainer.args.finetune:
        for key, ours in (("method", plan.method), ("block_size", plan.block_size),
                          ("start_depth", plan.start_depth), ("final_depth", plan.final_depth),
                          ("growth_iterations", plan.growth_iterations)):
            if saved.get(key) != ours:
                raise UsageError(
                    f"--load {trainer.args.load!r} was grown with {key}={saved.get(key)} but this run has "
                    f"{key}={ours}; resume with the same --grow-* flags and --num-layers"
                )
    due = plan.depth_at(it)
    if depth > due:
        raise UsageError(
            f"the checkpoint at iteration {it} has {depth} layers but the growth plan reaches only {due} by then"
        )
    trainer.state.growth_steps_done = done
    if len(trainer.state.lineage) != depth:
        if done:
            raise UsageError(f"the checkpoint has {depth} layers but its lineage metadata lists {len(trainer.state.lineage)}")
        trainer.state.lineage = [l.to_dict() for l in initial_lineage(depth)]


# ------------------------------------------------------------------------------ growth step
def maybe_grow(trainer) -> bool:
    """Grow before the next training step if the plan says so; True if the model changed."""
    plan = trainer.growth_plan
    if plan is None:
        return False
    due = plan.steps_due(trainer.state.iteration, trainer.num_layers)
    if not due:
        return False
    grow(trainer, due)
    return True


def scratch_base(args, needed_bytes: int = 0) -> str:
    """Where a checkpoint-mediated growth step writes its temporary checkpoint (visible to all ranks).

    ``/dev/shm`` (RAM-backed) when all ranks share one node and it has room for ``needed_bytes``
    with a margin (containers often mount a small one), else ``<save>/growth_scratch``.
    """
    if getattr(args, "grow_scratch_dir", None):
        return args.grow_scratch_dir
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if local == world and os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        if shutil.disk_usage("/dev/shm").free > 1.5 * needed_bytes:
            return "/dev/shm"  # one node: a RAM-backed file system is visible to all ranks
    if getattr(args, "save", None):
        return os.path.join(args.save, "growth_scratch")
    return tempfile.gettempdir()


def _release(trainer) -> None:
    """Drop every reference to the old model/DDP/optimizer so their memory can be freed."""
    if trainer.scheduler is not None:
        trainer.scheduler.optimizer = None
    cfg = trainer.config
    if cfg is not None:
        for name in ("grad_scale_func", "no_sync_func", "grad_sync_func", "param_sync_func", "finalize_model_grads_func"):
            if hasattr(cfg, name):
                setattr(cfg, name, None)
    trainer.model = []
    trainer.optimizer = None
    if platform.has_cuda():  # give the old model's device memory back before building the new one
        gc.unfreeze()
        gc.collect()
        gc.freeze()
        torch.cuda.empty_cache()


def _checkpoint_bytes(trainer) -> int:
    """Rough size of the scratch checkpoint: weights + fp32 param + two moments per parameter."""
    local = sum(p.numel() * (p.element_size() + 12) for p in trainer.unwrapped.parameters())
    a = trainer.args
    return int(local * a.tensor_model_parallel_size * a.pipeline_model_parallel_size)


def _checkpoint_transfer(trainer) -> CheckpointTransfer:
    return CheckpointTransfer(scratch_base(trainer.args, _checkpoint_bytes(trainer)), f"it{trainer.state.iteration}")


def _choose_transfer(trainer, src: List[int], new_depth: int):
    mode = getattr(trainer.args, "grow_transfer", None) or "auto"
    if mode == "checkpoint":
        return _checkpoint_transfer(trainer)
    old_layers = [layer.layer_number - 1 for layer in trainer.unwrapped.decoder.layers]
    possible = memory_transfer_possible(src, old_layers, stage_sizes_for(trainer.args, new_depth, None))
    if possible:
        return MemoryTransfer()
    if mode == "memory":
        raise UsageError(
            "--grow-transfer memory: layers would move to another pipeline stage at this growth step; "
            "use --grow-transfer auto, exchange or checkpoint"
        )
    return ExchangeTransfer()


def grow(trainer, steps: List[int]) -> Dict[str, float]:
    """Apply growth steps ``steps`` (0-based, consecutive) to the live trainer in one rebuild."""
    plan, st = trainer.growth_plan, trainer.state
    t_start = time.perf_counter()
    old_depth = trainer.num_layers
    src = compose(plan.maps[steps[0]: steps[-1] + 1])
    new_depth = len(src)
    lineage = [Lineage(**d) for d in st.lineage]
    for s in steps:
        lineage = grow_lineage(lineage, plan.method, plan.block_size, s + 1)
    rng = checkpointing._rng_state()

    # 1. the current state in model space (weights + fp32 params + Adam moments + step)
    transfer = _choose_transfer(trainer, src, new_depth)
    # megatron's DistributedOptimizer.sharded_state_dict runs gc.collect() (twice per growth
    # step); with the process' long-lived objects frozen those collections stay cheap.
    gc.freeze()
    try:
        model_sd = checkpointing.model_sharded_state_dict(trainer.model)
        state = {
            "model": model_sd,
            "optimizer": trainer.optimizer.sharded_state_dict(model_sd, metadata=checkpointing.OPTIM_METADATA),
        }
        transfer.save(state)
        del state, model_sd
        t_saved = time.perf_counter()

        # 2. rebuild at the new depth (new pipeline layout), keeping the scheduler
        _release(trainer)
        trainer.build(new_depth, None)
        t_built = time.perf_counter()

        # 3. load every new layer from its source layer
        model = trainer.unwrapped
        view = source_view_sharded_state_dict(model, src, old_depth)
        ensure_optimizer_state(trainer.optimizer)
        request = {
            "model": view,
            "optimizer": trainer.optimizer.sharded_state_dict(view, is_loading=True,
                                                              metadata=checkpointing.OPTIM_METADATA),
        }
        loaded = transfer.load(request)
        model.load_state_dict(loaded["model"], strict=True)
        load_optimizer_state(trainer.optimizer, loaded["optimizer"])
        del loaded, request, view
    except BaseException:
        transfer.cleanup(collective=False)
        raise
    finally:
        gc.unfreeze()
    transfer.cleanup()
    trainer.scheduler.step(0)  # lr/wd of the schedule position into the new param groups
    checkpointing._set_rng_state(rng)
    t_loaded = time.perf_counter()

    st.growth_steps_done = steps[-1] + 1
    st.lineage = [l.to_dict() for l in lineage]
    times = {"save_s": t_saved - t_start, "rebuild_s": t_built - t_saved, "load_s": t_loaded - t_built,
             "total_s": t_loaded - t_start}
    trainer.last_growth = {"steps": list(steps), "old_depth": old_depth, "new_depth": new_depth, "src": src,
                           "transfer": transfer.name, **times}
    _log_event(trainer, steps, old_depth, new_depth, src, times, transfer.name)
    dump = os.environ.get(DUMP_ENV)
    if dump:
        checkpointing.save_checkpoint(os.path.join(dump, f"step_{steps[-1] + 1}"), st.iteration, trainer.model,
                                      trainer.optimizer, trainer.scheduler, common={"state": st.to_dict()},
                                      metadata={**trainer.checkpoint_metadata(), "growth_src": src,
                                                "growth_transfer": transfer.name})
    return times


def _log_event(trainer, steps, old_depth, new_depth, src, times, transfer) -> None:
    plan, it = trainer.growth_plan, trainer.state.iteration
    logger = getattr(trainer, "logger", None)
    rep = flops_report(trainer)
    sizes = stage_sizes_for(trainer.args, trainer.num_layers, trainer.loop)
    layout = f"; pipeline stages hold {sizes} layers" if sizes else ""
    text = (
        f"growth step {steps[-1] + 1}/{len(plan.maps)} ({plan.method}) before iteration {it + 1}: "
        f"{old_depth} -> {new_depth} layers{layout}; new layer i copies old layer {src}; "
        f"took {times['total_s']:.3f} s ({transfer} transfer: save {times['save_s']:.3f}, rebuild {times['rebuild_s']:.3f}, "
        f"load {times['load_s']:.3f}); so far {rep['text']}"
    )
    if logger is not None:
        logger.text(text)
        logger.log(it, {"growth/num-layers": new_depth, "growth/step-time-s": times["total_s"],
                        "growth/flops-ratio-vs-final-depth": rep["ratio"]}, console=False)
    elif trainer.is_logging_rank:
        print(text, flush=True)


# ------------------------------------------------------------------------------ FLOPs
def flops_report(trainer) -> Dict[str, object]:
    """Training FLOPs spent so far against a model of the final depth trained on the same tokens."""
    plan, st = trainer.growth_plan, trainer.state
    shape = ArchShape.from_config(trainer.config, trainer.padded_vocab_size, trainer.tied)
    rep = growth_flops.report(shape, trainer.args.seq_length, st.tokens, st.training_flops, plan.final_depth,
                              trainer.unwrapped.effective_depth)
    rep["planned_depth_proportional_ratio"] = float(growth_flops.depth_proportional_ratio(plan, max(
        plan.grow_iters, trainer.args.train_iters)))
    rep["text"] = "growth FLOPs: " + rep["text"]
    return rep
