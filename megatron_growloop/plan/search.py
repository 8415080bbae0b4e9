"""``--search``: every feasible layout of the run for ``--gpus``, ranked by estimated step time.

A layout is a tensor-parallel size TP (dividing the heads, the feed-forward size and the
key/value groups or divided by them), a pipeline size PP (at most the layers of the smallest
model of the run; never cutting a looped block), DP = GPUs / (TP x PP) dividing the global
batch into micro-batches, sequence parallelism whenever TP > 1 with Transformer Engine (it only
saves memory; the local spec refuses it), the
distributed optimizer as given, and -- unless ``--recompute-granularity`` is given -- no,
selective and full (uniform, 1 layer) recomputation.  A TP or PP size given on the command line
is kept (e.g. ``--pipeline-model-parallel-size 4 --search`` ranks the layouts with PP4).  Layouts that fit are ranked by the
estimated step time (averaged over the run for a growing model); the rest follow by peak
memory.  Only counting: no model is built.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..errors import UsageError
from ..model.arch import pad_vocab_size
from ..model.parallel import ParallelLayout
from .inputs import Cluster, RunSetup
from .planner import Plan, plan_run

RECOMPUTE_OPTIONS = ((None, None, None), ("selective", None, None), ("full", "uniform", 1))


@dataclass(frozen=True)
class SearchResult:
    base: RunSetup
    cluster: Cluster
    plans: List[Plan]
    """Fitting layouts first (fastest first), then the others (smallest peak first)."""
    rejected: List[Tuple[str, str]]

    @property
    def fitting(self) -> List[Plan]:
        return [p for p in self.plans if p.fits]

    def to_json(self) -> Dict[str, Any]:
        return {
            "gpus": self.base.gpus,
            "fits": bool(self.fitting),
            "best": _summary(self.fitting[0]) if self.fitting else None,
            "layouts": [_summary(p) for p in self.plans],
            "rejected": [{"layout": k, "reason": why} for k, why in self.rejected],
        }


def layout_name(p: RunSetup) -> str:
    rc = p.impl.recompute_granularity or "none"
    return f"TP{p.layout.tp} PP{p.layout.pp} DP{p.dp}{' SP' if p.sequence_parallel else ''} recompute={rc}"


def _summary(p: Plan) -> Dict[str, Any]:
    lim = p.limiting_stage
    s = p.setup
    return {
        "tp": s.layout.tp, "pp": s.layout.pp, "dp": s.dp, "sequence_parallel": s.sequence_parallel,
        "recompute": s.impl.recompute_granularity or "none", "num_microbatches": s.num_microbatches,
        "stage_layers": s.stage_sizes(),
        "fits": p.fits, "peak_gb": round(p.peak / 1e9, 3),
        "limiting_rank": {"pp_rank": lim.pp_rank, "tp_rank": 0, "peak_gb": round(lim.peak / 1e9, 3)},
        "step_time_s": p.mean_step_seconds, "bottleneck_stage": p.step.bottleneck_stage,
        "flops_per_step": p.flops_per_step,
    }


def _divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def search(base: RunSetup, cluster: Cluster, vocab_size: int, search_recompute: bool = True,
           tp_sizes: Optional[Sequence[int]] = None, pp_sizes: Optional[Sequence[int]] = None) -> SearchResult:
    """``tp_sizes``/``pp_sizes`` restrict the search (a size given on the command line is kept)."""
    gpus = base.gpus
    arch = base.arch
    min_layers = arch.num_layers  # a growing run starts at its smallest depth
    options = RECOMPUTE_OPTIONS if search_recompute else (
        (base.impl.recompute_granularity, base.impl.recompute_method, base.impl.recompute_num_layers),)
    plans: List[Plan] = []
    rejected: List[Tuple[str, str]] = []
    for tp in _divisors(gpus):
        if tp_sizes is not None and tp not in tp_sizes:
            continue
        padded = pad_vocab_size(vocab_size, arch.make_vocab_size_divisible_by, tp)
        tp_arch = replace(arch, padded_vocab_size=padded)
        try:
            tp_arch.check_parallel(tp)
        except UsageError as exc:
            rejected.append((f"TP{tp}", str(exc)))
            continue
        if tp > 1 and arch.seq_length % tp:
            rejected.append((f"TP{tp}", f"sequence parallelism needs --seq-length divisible by {tp}"))
            continue
        for pp in _divisors(gpus // tp):
            if pp_sizes is not None and pp not in pp_sizes:
                continue
            dp = gpus // (tp * pp)
            name = f"TP{tp} PP{pp} DP{dp}"
            if pp > min_layers:
                rejected.append((name, f"{min_layers} layers cannot fill {pp} pipeline stages"))
                continue
            if base.global_batch % (base.micro_batch_size * dp):
                rejected.append((name, f"global batch {base.global_batch} is not a multiple of micro batch x DP = "
                                       f"{base.micro_batch_size}x{dp}"))
                continue
            sp = tp > 1  # both specs support it (the local spec's norms: model/fusions.RMSNorm)
            layout = ParallelLayout(tp=tp, pp=pp, sequence_parallel=sp)
            for granularity, method, num in options:
                impl = replace(base.impl, recompute_granularity=granularity, recompute_method=method,
                               recompute_num_layers=num)
                try:
                    setup = replace(base, arch=tp_arch, layout=layout, impl=impl, dp=dp,
                                    global_batch_size=base.global_batch)
                    plans.append(plan_run(setup, cluster))
                except UsageError as exc:
                    rejected.append((f"{name} recompute={granularity or 'none'}", str(exc)))
    plans.sort(key=lambda p: (not p.fits, p.mean_step_seconds if p.fits else p.peak))
    return SearchResult(base, cluster, plans, rejected)
