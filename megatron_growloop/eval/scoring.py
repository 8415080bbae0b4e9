"""Scoring multiple-choice items with any scorer, and evaluating the primitives.

A *scorer* is anything with ``loglikelihood(requests) -> list[float]`` where a
request is a ``(context, continuation)`` pair (lm-eval's layout).  Real models are
wrapped by :func:`~megatron_growloop.eval.engine.model_scorer`; tests plug in the
oracle / constant / random scorers of :mod:`megatron_growloop.eval.oracle`.

>>> from megatron_growloop.eval import primitives, scoring
>>> items = primitives.generate_task("va_basic_d1", n=100, seed=0)
>>> scores = scoring.score_choices(model, tokenizer, items)   # scores[i][j]: item i, choice j
>>> result, records = scoring.evaluate_items(scoring.as_scorer(model, tokenizer), items)
>>> result.acc, result.acc_stderr, result.acc_norm
"""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, List, Optional, Protocol, Sequence, Tuple

from . import metrics, primitives
from .engine import model_scorer
from .metrics import TaskResult
from .templates import get_template


class Scorer(Protocol):
    def loglikelihood(self, requests: Sequence[Tuple[str, str]]) -> List[float]: ...


def as_scorer(model_or_scorer, tokenizer=None, **engine_kwargs) -> Scorer:
    """A scorer as is, or ``(model, tokenizer)`` wrapped in a :class:`LogProbEngine`."""
    if hasattr(model_or_scorer, "loglikelihood") and tokenizer is None:
        return model_or_scorer

    return model_scorer(model_or_scorer, tokenizer, **engine_kwargs)


def score_choices(model_or_scorer, tokenizer=None, items: Sequence[primitives.Item] = (), **engine_kwargs
                  ) -> List[List[float]]:
    """Log-likelihood of every choice of every item: ``scores[i][j]`` for item i, choice j."""
    scorer = as_scorer(model_or_scorer, tokenizer, **engine_kwargs)
    flat: List[Tuple[str, str]] = []
    for it in items:
        flat.extend(it.requests())
    lls = scorer.loglikelihood(flat)
    out, k = [], 0
    for it in items:
        out.append([float(x) for x in lls[k : k + len(it.choices)]])
        k += len(it.choices)
    return out


def evaluate_items(scorer: Scorer, items: Sequence[primitives.Item]) -> Tuple[TaskResult, List[Dict[str, Any]]]:
    """Accuracy (``acc``, ``acc_norm``, standard errors) of ``scorer`` on items of one task."""
    if not items:
        raise ValueError("no items to evaluate")
    task = items[0].task
    records = metrics.score_items(items, score_choices(scorer, None, items))
    return metrics.aggregate(task, records, primitives.get_task(task).chance), records


def evaluate_primitives(
    scorer: Scorer,
    tasks="all",
    limit: int = 100,
    seed: int = 0,
    num_fewshot: int = primitives.DEFAULT_NUM_FEWSHOT,
    template=primitives.DEFAULT_TEMPLATE,
    log: Optional[Callable[[str], None]] = None,
) -> Dict[str, Any]:
    """Evaluate ``limit`` items of each task; returns ``{"results": {task: TaskResult dict},
    "samples": {task: records}, "config": ...}``."""
    names = primitives.resolve_tasks(tasks)
    results, samples = {}, {}
    for name in names:
        t0 = time.time()
        items = primitives.generate_task(name, limit, seed=seed, num_fewshot=num_fewshot, template=template)
        res, recs = evaluate_items(scorer, items)
        results[name] = res.to_dict()
        samples[name] = recs
        if log:
            log(f"{name:14s} acc {res.acc:.3f} ± {res.acc_stderr:.3f}  acc_norm {res.acc_norm:.3f} ± "
                f"{res.acc_norm_stderr:.3f}  (n={res.n}, chance {res.chance:.2f}, {time.time() - t0:.1f}s)")
    summary = _summary(results)
    return {
        "results": results,
        "summary": summary,
        "samples": samples,
        "config": {"tasks": names, "limit": limit, "seed": seed, "num_fewshot": num_fewshot,
                   "template": get_template(template).name},
    }


def _summary(results: Dict[str, Dict[str, Any]]) -> Dict[str, float]:
    if not results:
        return {}
    vals = list(results.values())
    return {
        "mean_acc": sum(r["acc"] for r in vals) / len(vals),
        "mean_acc_norm": sum(r["acc_norm"] for r in vals) / len(vals),
    }
