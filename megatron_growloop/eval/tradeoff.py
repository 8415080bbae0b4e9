"""The paper's Fig. 1 trade-off report: accuracy against unique parameters, inference FLOPs
per token and training FLOPs, with the Pareto front of each panel.

Every number comes from files the project writes, nothing is re-measured:

* the three costs from the checkpoint's ``growloop.json`` (``accounting.unique_parameters``,
  ``accounting.inference_flops_per_token``, ``training_flops``, written by the trainer
  from :mod:`megatron_growloop.accounting`); when the results were computed with another
  schedule than the checkpoint's (``--repeat-block``, ``--loop-repeats``: the result's
  ``model.effective_depth`` differs), the inference FLOPs are those of the evaluated
  effective depth, from the same accounting formula and the checkpoint's architecture;
* the accuracy from a ``primitives`` result JSON: the mean over the tasks of ``--metric``
  (a task group or names) of ``acc_norm`` (or ``acc``), with the standard error of that
  mean from the per-task standard errors.

A name given with several ``--run`` (one per training seed) becomes one point: the mean
over its runs, the error bar the standard error over seeds (the item-level standard error
when there is one run).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

from ..errors import UsageError
from ..model.arch import Arch
from ..training.checkpointing import read_metadata
from . import primitives

AXES = (
    ("unique_parameters", "unique parameters"),
    ("inference_flops_per_token", "inference FLOPs / token"),
    ("training_flops", "training FLOPs"),
)
SCORES = ("acc_norm", "acc")


@dataclass(frozen=True)
class RunSpec:
    """One ``--run NAME=CKPT:RESULTS.json``."""

    name: str
    checkpoint: str
    results: str

    @classmethod
    def parse(cls, text: str) -> "RunSpec":
        name, eq, rest = str(text).partition("=")
        ckpt, colon, results = rest.rpartition(":")
        if not eq or not colon or not name.strip() or not ckpt or not results:
            raise UsageError(f"--run {text!r}: expected NAME=CHECKPOINT:RESULTS.json")
        return cls(name.strip(), ckpt, results)


@dataclass(frozen=True)
class RunPoint:
    """The numbers of one run (one checkpoint, one result file)."""

    name: str
    checkpoint: str
    results: str
    accuracy: float
    stderr: float
    unique_parameters: int
    inference_flops_per_token: int
    training_flops: float
    tokens: int
    effective_depth: int
    unique_layers: int


def _accounting(spec: RunSpec) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    meta = read_metadata(spec.checkpoint)  # one-line UsageError for a missing / partial checkpoint
    acc = meta.get("accounting")
    if not isinstance(acc, dict):
        raise UsageError(f"run {spec.name}: checkpoint {spec.checkpoint} has no 'accounting' in growloop.json")
    for key in ("unique_parameters", "inference_flops_per_token", "effective_depth", "unique_layers"):
        if not isinstance(acc.get(key), (int, float)):
            raise UsageError(f"run {spec.name}: checkpoint {spec.checkpoint}: growloop.json accounting lacks {key!r}")
    if not isinstance(meta.get("training_flops"), (int, float)) or meta["training_flops"] <= 0:
        raise UsageError(f"run {spec.name}: checkpoint {spec.checkpoint}: growloop.json lacks 'training_flops'")
    return meta, acc


def _results(spec: RunSpec) -> Dict[str, Any]:
    path = Path(spec.results)
    if not path.is_file():
        raise UsageError(f"run {spec.name}: results file {spec.results} does not exist")
    try:
        res = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UsageError(f"run {spec.name}: results file {spec.results} is not valid JSON ({exc.msg})") from None
    if not isinstance(res.get("results"), dict):
        raise UsageError(f"run {spec.name}: {spec.results} is not a primitives result (no 'results')")
    return res


def group_accuracy(res: Dict[str, Any], tasks: Sequence[str], score: str, where: str = "") -> Tuple[float, float]:
    """Mean ``score`` over ``tasks`` and its standard error (independent task estimates)."""
    missing = [t for t in tasks if t not in res["results"]]
    if missing:
        raise UsageError(f"{where}results lack task(s) {', '.join(missing)} of the metric group")
    vals = [float(res["results"][t][score]) for t in tasks]
    errs = [float(res["results"][t].get(f"{score}_stderr", float("nan"))) for t in tasks]
    return sum(vals) / len(vals), math.sqrt(sum(e * e for e in errs)) / len(errs)


def evaluated_inference_flops(meta: Dict[str, Any], acc: Dict[str, Any], res: Dict[str, Any]) -> Tuple[int, int]:
    """``(inference FLOPs per token, effective depth)`` of the model as evaluated."""
    depth = int(acc["effective_depth"])
    evaluated = (res.get("model") or {}).get("effective_depth")
    if evaluated is None or int(evaluated) == depth:
        return int(acc["inference_flops_per_token"]), depth
    arch = Arch.from_meta(meta["arch"])
    return int(arch.shape.forward_flops_per_token(int(evaluated), arch.seq_length)), int(evaluated)


def check_same_checkpoint(spec: RunSpec, meta: Dict[str, Any], res: Dict[str, Any]) -> None:
    """Refuse a result file evaluated on another iteration than the checkpoint's accounting.

    The result records the iteration it loaded (``model.iteration``); paths are not
    compared, so moved run directories still work."""
    evaluated = (res.get("model") or {}).get("iteration")
    if evaluated is not None and meta.get("iteration") is not None and int(evaluated) != int(meta["iteration"]):
        raise UsageError(f"run {spec.name}: {spec.results} was evaluated at iteration {evaluated}, but checkpoint "
                         f"{spec.checkpoint} is at iteration {meta['iteration']}; give the evaluated checkpoint")


def load_run(spec: RunSpec, tasks: Sequence[str], score: str) -> RunPoint:
    meta, acc = _accounting(spec)
    res = _results(spec)
    check_same_checkpoint(spec, meta, res)
    mean, se = group_accuracy(res, tasks, score, where=f"run {spec.name}: {spec.results}: ")
    flops, depth = evaluated_inference_flops(meta, acc, res)
    return RunPoint(spec.name, spec.checkpoint, spec.results, mean, se, int(acc["unique_parameters"]), flops,
                    float(meta["training_flops"]), int(meta.get("tokens") or 0), depth, int(acc["unique_layers"]))


def aggregate(points: Sequence[RunPoint]) -> List[Dict[str, Any]]:
    """One record per name (runs of one name = training seeds), in first-seen order."""
    by_name: Dict[str, List[RunPoint]] = {}
    for p in points:
        by_name.setdefault(p.name, []).append(p)
    out = []
    for name, runs in by_name.items():
        n = len(runs)
        mean = sum(r.accuracy for r in runs) / n
        if n > 1:
            sd = math.sqrt(sum((r.accuracy - mean) ** 2 for r in runs) / (n - 1))
            se, basis = sd / math.sqrt(n), "seeds"
        else:
            se, basis = runs[0].stderr, "items"
        rec: Dict[str, Any] = {"name": name, "n_runs": n, "accuracy": mean, "stderr": se, "stderr_over": basis}
        for key, _ in AXES:
            rec[key] = sum(getattr(r, key) for r in runs) / n
        rec["effective_depth"] = runs[0].effective_depth
        rec["unique_layers"] = runs[0].unique_layers
        rec["tokens"] = runs[0].tokens
        rec["runs"] = [asdict(r) for r in runs]
        out.append(rec)
    return out


def pareto_front(records: Sequence[Dict[str, Any]], cost: str) -> List[str]:
    """Names not dominated in (lower ``cost``, higher accuracy), sorted by cost."""
    front = []
    for r in records:
        dominated = any(
            o is not r and o[cost] <= r[cost] and o["accuracy"] >= r["accuracy"]
            and (o[cost] < r[cost] or o["accuracy"] > r["accuracy"])
            for o in records
        )
        if not dominated:
            front.append(r)
    return [r["name"] for r in sorted(front, key=lambda r: r[cost])]


def tradeoff(specs: Sequence[RunSpec], metric: str, score: str = "acc_norm") -> Dict[str, Any]:
    """The report: per-name points, the Pareto front of each axis, and what was averaged."""
    if not specs:
        raise UsageError("give at least one --run NAME=CHECKPOINT:RESULTS.json")
    if score not in SCORES:
        raise UsageError(f"--score {score!r}: choose one of {', '.join(SCORES)}")
    tasks = primitives.resolve_tasks(metric)
    records = aggregate([load_run(s, tasks, score) for s in specs])
    chance = sum(primitives.get_task(t).chance for t in tasks) / len(tasks)
    return {
        "metric": metric,
        "tasks": tasks,
        "score": score,
        "chance": chance,
        "axes": {k: label for k, label in AXES},
        "models": records,
        "pareto": {k: pareto_front(records, k) for k, _ in AXES},
        "note": "costs from growloop.json accounting (training FLOPs cumulative over the run, growth and "
                "retrofit included); accuracy = mean over tasks, error bar = std over runs of one name / "
                "sqrt(n), or the item-level standard error for a single run",
    }
