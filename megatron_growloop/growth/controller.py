"""The growth step inside a running (torchrun) training job, as a trainer controller.

A growth step is a pure index map (:mod:`.operators`: new layer ``g`` copies old layer
``src[g]``) plus a transfer of the model-space state, done through the trainer's public
interface:

1. ``trainer.model_space_state()``: weights, fp32 main params, both Adam moments and the
   step, kept by a transfer (:mod:`.transfer`) -- in host memory, each rank its own shards
   (what moves between ranks goes point to point when the new model is filled), or through a
   scratch checkpoint;
2. ``trainer.rebuild(arch.with_depth(new), fill)``: the trainer drops its model, DDP and
   optimizer and builds them at the new depth (pipeline stages re-balanced), keeping the LR
   scheduler, the counters, the data iterators and the RNG;
3. ``fill`` loads every new layer from its source layer through the *source view*
   (:mod:`.source_view`).

Never deep-copies live modules.
"""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from ..errors import UsageError
from ..training.controller import Controller
from . import flops as growth_flops
from .operators import Lineage, compose, grow_lineage, initial_lineage
from .plan import GrowthPlan
from .source_view import source_view_sharded_state_dict
from .transfer import CheckpointTransfer, MemoryTransfer


@dataclass(frozen=True)
class GrowthOptions:
    """How growth steps are carried out (not when: that is the :class:`GrowthPlan`)."""

    transfer: str = "auto"
    scratch_dir: Optional[str] = None
    save_dir: Optional[str] = None
    dump_dir: Optional[str] = None

    @classmethod
    def from_args(cls, args) -> "GrowthOptions":
        return cls(args.grow_transfer or "auto", args.grow_scratch_dir, args.save, args.grow_dump_dir)


# ------------------------------------------------------------------------------ resume
def check_resume(plan: GrowthPlan, depth: int, iteration: int, lineage: List[Dict[str, int]],
                 saved: Optional[Dict[str, Any]], load: Optional[str]) -> Tuple[int, List[Dict[str, int]]]:
    """``(growth steps done, lineage)`` for a run that starts at ``depth`` and ``iteration``.

    The depth (resumed or not) must be a state the plan passes through and not ahead of it;
    a checkpoint grown with other growth flags (``saved``: its ``growth`` record) is refused."""
    done, rest = divmod(depth - plan.start_depth, plan.block_size)
    if rest or not 0 <= done <= len(plan.maps):
        raise UsageError(
            f"the checkpoint has {depth} layers, which the growth plan ({plan.start_depth} -> {plan.final_depth} "
            f"in steps of {plan.block_size}) never has; check --num-layers/--grow-* against the run being resumed"
        )
    if saved:
        ours = plan.to_meta()
        for key in ("method", "block_size", "start_depth", "final_depth", "growth_iterations"):
            if saved.get(key) != ours[key]:
                raise UsageError(
                    f"--load {load!r} was grown with {key}={saved.get(key)} but this run has "
                    f"{key}={ours[key]}; resume with the same --grow-* flags and --num-layers"
                )
    due = plan.depth_at(iteration)
    if depth > due:
        raise UsageError(
            f"the checkpoint at iteration {iteration} has {depth} layers but the growth plan reaches only {due} by then"
        )
    if len(lineage) != depth:
        if done:
            raise UsageError(f"the checkpoint has {depth} layers but its lineage metadata lists {len(lineage)}")
        lineage = [l.to_dict() for l in initial_lineage(depth)]
    return done, lineage


# ------------------------------------------------------------------------------ transfers
def scratch_base(scratch_dir: Optional[str], save_dir: Optional[str], needed_bytes: int = 0) -> str:
    """Where a checkpoint-mediated growth step writes its temporary checkpoint (visible to all ranks).

    An explicit ``--grow-scratch-dir``; else ``/dev/shm`` (RAM-backed) when all ranks share one
    node and it has room for ``needed_bytes`` with a margin (containers often mount a small one);
    else ``<save>/growth_scratch``.
    """
    if scratch_dir:
        return scratch_dir
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if local == world and os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        if shutil.disk_usage("/dev/shm").free > 1.5 * needed_bytes:
            return "/dev/shm"  # one node: a RAM-backed file system is visible to all ranks
    if save_dir:
        return os.path.join(save_dir, "growth_scratch")
    return tempfile.gettempdir()


def _checkpoint_bytes(trainer) -> int:
    """Rough size of the scratch checkpoint: weights + fp32 param + two moments per parameter."""
    local = sum(p.numel() * (p.element_size() + 12) for p in trainer.unwrapped.parameters())
    return int(local * trainer.layout.tp * trainer.layout.pp)


class GrowthController(Controller):
    """Grows the trainer's model at the iterations of a :class:`GrowthPlan`."""

    def __init__(self, plan: GrowthPlan, options: GrowthOptions = GrowthOptions()):
        self.plan = plan
        self.options = options
        self.steps_done = 0
        self.last_growth: Optional[Dict[str, Any]] = None

    # -------------------------------------------------------------- controller hooks
    def setup(self, trainer, resume: Optional[Dict[str, Any]]) -> None:
        saved = (resume or {}).get("growth") if not trainer.args.finetune else None
        self.steps_done, trainer.state.lineage = check_resume(
            self.plan, trainer.arch.num_layers, trainer.state.iteration, trainer.state.lineage, saved,
            trainer.args.load,
        )

    def before_step(self, trainer) -> None:
        due = self.plan.steps_due(trainer.state.iteration, trainer.arch.num_layers)
        if due:
            self.grow(trainer, due)

    def checkpoint_metadata(self, trainer) -> Dict[str, Any]:
        return {"growth": {**self.plan.to_meta(), "steps_done": self.steps_done}}

    def describe(self) -> str:
        return self.plan.describe()

    def finish(self, trainer) -> Dict[str, Any]:
        report = self.flops_report(trainer)
        trainer.log_text(report["text"])
        return {"growth_flops": report}

    # -------------------------------------------------------------- the growth step
    def _transfer(self, trainer):
        if self.options.transfer == "checkpoint":
            base = scratch_base(self.options.scratch_dir, self.options.save_dir, _checkpoint_bytes(trainer))
            return CheckpointTransfer(base, f"it{trainer.state.iteration}")
        return MemoryTransfer()  # "auto", "memory" and its former name "exchange"

    def grow(self, trainer, steps: List[int]) -> Dict[str, float]:
        """Apply growth steps ``steps`` (0-based, consecutive) in one rebuild."""
        plan = self.plan
        t_start = time.perf_counter()
        old_depth = trainer.arch.num_layers
        src = compose(plan.maps[steps[0]: steps[-1] + 1])
        new_arch = trainer.arch.with_depth(len(src))
        lineage = [Lineage(**d) for d in trainer.state.lineage]
        for s in steps:
            lineage = grow_lineage(lineage, plan.method, plan.block_size, s + 1)
        transfer = self._transfer(trainer)
        marks = {}

        def fill(stack) -> None:
            marks["built"] = time.perf_counter()
            transfer.fill(stack, source_view_sharded_state_dict(stack.model, src, old_depth))

        # megatron's DistributedOptimizer.sharded_state_dict runs gc.collect() (twice per growth
        # step); with the process' long-lived objects frozen those collections stay cheap.
        gc.freeze()
        try:
            transfer.capture(trainer)
            marks["saved"] = time.perf_counter()
            trainer.rebuild(new_arch, fill)
        except BaseException:
            transfer.cleanup(collective=False)
            raise
        finally:
            gc.unfreeze()
        transfer.cleanup()
        t_loaded = time.perf_counter()

        self.steps_done = steps[-1] + 1
        trainer.state.lineage = [l.to_dict() for l in lineage]
        times = {"save_s": marks["saved"] - t_start, "rebuild_s": marks["built"] - marks["saved"],
                 "load_s": t_loaded - marks["built"], "total_s": t_loaded - t_start}
        stats = transfer.stats()
        self.last_growth = {"steps": list(steps), "old_depth": old_depth, "new_depth": new_arch.num_layers,
                            "src": src, "transfer": transfer.name, "transfer_stats": stats, **times}
        if isinstance(transfer, MemoryTransfer):
            self.last_growth.update(max_buffer_bytes=transfer.store.max_buffer_bytes, host_bytes=transfer.host_bytes)
        self._log_event(trainer, steps, old_depth, src, times, f"{transfer.name} transfer, {stats}")
        if self.options.dump_dir:  # inspection: model-space optimizer state, comparable layer by layer
            trainer.save(os.path.join(self.options.dump_dir, f"step_{steps[-1] + 1}"),
                         extra_metadata={"growth_src": src, "growth_transfer": transfer.name},
                         optimizer_format="fully_reshardable")
        return times

    def _log_event(self, trainer, steps, old_depth, src, times, transfer) -> None:
        plan, it = self.plan, trainer.state.iteration
        rep = self.flops_report(trainer)
        new_depth = trainer.arch.num_layers
        sizes = trainer.layout.stage_sizes(trainer.arch)
        layout = f"; pipeline stages hold {sizes} layers" if sizes else ""
        trainer.log_text(
            f"growth step {steps[-1] + 1}/{len(plan.maps)} ({plan.method}) before iteration {it + 1}: "
            f"{old_depth} -> {new_depth} layers{layout}; new layer i copies old layer {src}; "
            f"took {times['total_s']:.3f} s ({transfer}: save {times['save_s']:.3f}, rebuild "
            f"{times['rebuild_s']:.3f}, load {times['load_s']:.3f}); so far {rep['text']}"
        )
        trainer.log_scalars(it, {"growth/num-layers": new_depth, "growth/step-time-s": times["total_s"],
                                 "growth/flops-ratio-vs-final-depth": rep["ratio"]})

    # -------------------------------------------------------------- FLOPs
    def flops_report(self, trainer) -> Dict[str, object]:
        """Training FLOPs spent so far against a model of the final depth trained on the same tokens."""
        plan, st = self.plan, trainer.state
        rep = growth_flops.report(trainer.arch.shape, trainer.args.seq_length, st.tokens, st.training_flops,
                                  plan.final_depth, trainer.unwrapped.effective_depth)
        rep["planned_depth_proportional_ratio"] = float(growth_flops.depth_proportional_ratio(
            plan, max(plan.grow_iters, trainer.args.train_iters)))
        rep["text"] = "growth FLOPs: " + rep["text"]
        return rep
