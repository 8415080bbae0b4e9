"""The plan of one training run: parameters, memory per rank, growth, FLOPs and step time.

>>> from megatron_growloop.plan import plan_run
>>> p = plan_run(setup, Cluster(gpu_memory_gb=80))
>>> p.fits, p.to_json()["per_rank"][0]["memory_gb"]["peak"]

Pure counting: no process group, no tensor is allocated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from .compute import StepTime, flops_per_step, step_time, training_flops
from .growth import GrowthStage, GrowthStep, growth_plan_memory
from .inputs import GB, Cluster, RunSetup
from .memory import StageMemory, stage_memory
from .params import unique_params


@dataclass(frozen=True)
class Plan:
    setup: RunSetup
    cluster: Cluster
    stages: List[StageMemory]
    params_total: int
    flops_per_step: float
    step: StepTime
    training_flops: Optional[float]
    growth_stages: Optional[List[GrowthStage]] = None
    growth_steps: Optional[List[GrowthStep]] = None

    @property
    def capacity(self) -> float:
        return self.cluster.gpu_memory_gb * GB

    @property
    def limiting_stage(self) -> StageMemory:
        """The stage whose ranks need the most memory (they decide whether the run fits)."""
        return max(self.stages, key=lambda s: s.peak)

    @property
    def peak(self) -> int:
        """The largest per-rank peak over the run: every growth stage and step when growing."""
        worst = self.limiting_stage.peak
        for g in self.growth_stages or ():
            worst = max(worst, max(s.peak for s in g.stages))
        for st in self.growth_steps or ():
            worst = max(worst, max(r.device_peak for r in st.ranks))
        return worst

    @property
    def fits(self) -> bool:
        return self.peak <= self.capacity

    @property
    def mean_step_seconds(self) -> float:
        """Step time averaged over ``--train-iters`` for a growing run (deeper stages are slower)."""
        if not self.growth_stages:
            return self.step.seconds
        total, iters = 0.0, 0
        for g in self.growth_stages:
            t = step_time(self.setup.at_depth(g.num_layers), self.cluster, g.stages).seconds
            total += t * g.iterations
            iters += g.iterations
        rest = max((self.setup.train_iters or 0) - iters, 0)
        if rest:
            last = self.growth_stages[-1]
            total += rest * step_time(self.setup.at_depth(last.num_layers), self.cluster, last.stages).seconds
            iters += rest
        return total / iters

    def to_json(self) -> Dict[str, Any]:
        s = self.setup
        out: Dict[str, Any] = {
            "model": _model_json(s),
            "layout": {"gpus": s.gpus, "tp": s.layout.tp, "pp": s.layout.pp, "dp": s.dp,
                       "sequence_parallel": s.sequence_parallel, "distributed_optimizer": s.distributed_optimizer,
                       "stage_layers": s.stage_sizes(), "stage_applications": s.stage_applications(),
                       "micro_batch_size": s.micro_batch_size, "global_batch_size": s.global_batch,
                       "num_microbatches": s.num_microbatches, "recompute": _recompute_str(s),
                       "dtype": s.impl.dtype, "fp8": s.impl.fp8_format, "transformer_impl": s.impl.transformer_impl},
            "params_total": self.params_total,
            "params_sum_over_ranks": sum(st.params for st in self.stages) * s.layout.tp,
            "per_rank": [_rank_json(st, tp_rank) for st in self.stages for tp_rank in range(s.layout.tp)],
            "limiting_rank": {"pp_rank": self.limiting_stage.pp_rank, "tp_rank": 0,
                              "peak_gb": _gb(self.limiting_stage.peak)},
            "flops_per_step": self.flops_per_step,
            "training_flops": self.training_flops,
            "step_time_s": self.step.seconds,
            "ideal_step_time_s": self.step.ideal_seconds,
            "bottleneck_stage": self.step.bottleneck_stage,
            "assume_mfu": self.cluster.assume_mfu,
            "gpu_memory_gb": self.cluster.gpu_memory_gb,
            "peak_gb": _gb(self.peak),
            "fits": self.fits,
        }
        if self.growth_stages is not None:
            out["growth_stages"] = [
                {"stage": g.index, "num_layers": g.num_layers, "iterations": g.iterations,
                 "params_total": unique_params(s.arch.with_depth(g.num_layers)),
                 "peak_gb": _gb(max(st.peak for st in g.stages)),
                 "per_rank": [_rank_json(st, 0) for st in g.stages]}
                for g in self.growth_stages
            ]
            out["growth_steps"] = [
                {"step": st.index + 1, "from_layers": st.from_layers, "to_layers": st.to_layers,
                 "after_iteration": st.before_iteration,
                 "peak_gb": _gb(max(r.device_peak for r in st.ranks)),
                 "transfer_gb": _gb(max(r.transfer for r in st.ranks)),
                 "per_rank": [{"pp_rank": r.pp_rank, "source_gb": _gb(r.source), "target_gb": _gb(r.target),
                               "save_transient_gb": _gb(r.save_transient), "transfer_gb": _gb(r.transfer),
                               "transfer_bytes": r.transfer, "received_layers": r.received_layers,
                               "copied_layers": r.copied_layers, "peak_gb": _gb(r.device_peak)}
                              for r in st.ranks]}
                for st in self.growth_steps
            ]
            out["mean_step_time_s"] = self.mean_step_seconds
        return out


def _gb(n: float) -> float:
    return round(n / GB, 3)


def _rank_json(st: StageMemory, tp_rank: int) -> Dict[str, Any]:
    return {
        "tp_rank": tp_rank, "pp_rank": st.pp_rank, "params": st.params, "layers": st.layers,
        "applications": st.applications, "in_flight_microbatches": st.in_flight,
        "memory_gb": {"weights": _gb(st.weights), "grads": _gb(st.grads), "optimizer": _gb(st.optimizer),
                      "activations": _gb(st.activations), "peak": _gb(st.peak)},
        "memory_bytes": {"weights": st.weights, "grads": st.grads, "optimizer": st.optimizer,
                         "activations": st.activations, "transient": st.transient, "peak": st.peak},
    }


def _recompute_str(s: RunSetup) -> str:
    g = s.impl.recompute_granularity
    if g == "full":
        return f"full/{s.impl.recompute_method or 'uniform'}/{s.impl.recompute_num_layers or 1}"
    return g or "none"


def _model_json(s: RunSetup) -> Dict[str, Any]:
    a = s.arch
    return {"num_layers": a.num_layers, "effective_depth": a.effective_depth, "loop": str(a.loop) if a.loop else None,
            "hidden_size": a.hidden_size, "padded_vocab_size": a.padded_vocab_size, "seq_length": a.seq_length,
            "tied_embeddings": a.tied,
            "recurrence": None if s.recurrence is None else {
                **s.recurrence.to_meta(), "memory_at_loop": str(s.worst_step().step_loop),
                "memory_stage_grad_applications": s.worst_step().stage_grad_applications(),
                "expected_repeats": sum(k * p for k, p in s.recurrence.pmf().items())},
            "growth": None if s.growth is None else {"method": s.growth.method, "block_size": s.growth.block_size,
                                                     "final_layers": s.growth.final_depth}}


def plan_run(setup: RunSetup, cluster: Cluster = Cluster()) -> Plan:
    stages = stage_memory(setup)
    growth = growth_plan_memory(setup)
    return Plan(
        setup=setup,
        cluster=cluster,
        stages=stages,
        params_total=unique_params(setup.arch),
        flops_per_step=flops_per_step(setup),
        step=step_time(setup, cluster, stages),
        training_flops=training_flops(setup, setup.train_iters),
        growth_stages=growth[0] if growth else None,
        growth_steps=growth[1] if growth else None,
    )
