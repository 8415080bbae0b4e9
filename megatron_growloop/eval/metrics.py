"""Multiple-choice metrics, computed exactly as lm-evaluation-harness does.

* ``acc``: the choice with the highest summed log-likelihood is right.
* ``acc_norm``: the highest log-likelihood divided by the choice's length in
  characters (lm-eval's ``acc_norm``: ``len(choice)``, without the delimiter; equal to
  the byte length for the ASCII choices of the reasoning primitives).  Summed
  log-likelihoods favour short choices (``3`` over ``23``); ``acc_norm`` removes
  most of that bias.
* Ties go to the first choice (``numpy.argmax``).
* Standard error of the mean with the sample standard deviation (``n - 1``), as
  lm-eval's ``mean_stderr``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Sequence

import numpy as np


def predictions(scores: Sequence[float], choices: Sequence[str]) -> Dict[str, int]:
    lls = np.asarray(scores, dtype=np.float64)
    lengths = np.asarray([float(len(c)) for c in choices])
    return {"acc": int(np.argmax(lls)), "acc_norm": int(np.argmax(lls / lengths))}


def mean_stderr(values: Sequence[float]) -> float:
    n = len(values)
    if n < 2:
        return float("nan")
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.std(ddof=1) / math.sqrt(n))


@dataclass
class TaskResult:
    """Accuracy of one task (fractions in [0, 1])."""

    task: str
    n: int
    acc: float
    acc_stderr: float
    acc_norm: float
    acc_norm_stderr: float
    chance: float

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def score_items(items, scores: Sequence[Sequence[float]]) -> List[Dict[str, Any]]:
    """Per-item records: predictions and correctness for both metrics."""
    if len(items) != len(scores):
        raise ValueError(f"{len(items)} items but {len(scores)} score lists")
    out = []
    for item, s in zip(items, scores):
        if len(s) != len(item.choices):
            raise ValueError(f"item {item.task}#{item.index}: {len(item.choices)} choices, {len(s)} scores")
        pred = predictions(s, item.choices)
        out.append({
            "task": item.task, "index": item.index, "gold": item.gold,
            "pred": pred["acc"], "pred_norm": pred["acc_norm"],
            "acc": float(pred["acc"] == item.gold), "acc_norm": float(pred["acc_norm"] == item.gold),
            "loglikelihoods": [float(x) for x in s],
        })
    return out


def aggregate(task: str, records: Sequence[Dict[str, Any]], chance: float) -> TaskResult:
    acc = [r["acc"] for r in records]
    accn = [r["acc_norm"] for r in records]
    n = len(records)
    return TaskResult(
        task=task, n=n,
        acc=float(np.mean(acc)) if n else float("nan"), acc_stderr=mean_stderr(acc),
        acc_norm=float(np.mean(accn)) if n else float("nan"), acc_norm_stderr=mean_stderr(accn),
        chance=chance,
    )
