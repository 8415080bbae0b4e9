"""Layer-swap interventions (paper §4.1, Fig. 5 and 11; Kapl et al.).

A swap of width ``w`` at position ``i`` exchanges the applications at effective-depth
positions ``[i, i+w)`` and ``[i+w, i+2w)`` (``w = 1``: two adjacent layers; ``w = 2``: two
adjacent 2-layer blocks).  It is an edit of the model's application schedule
(``decoder.set_global_schedule``), so it applies to baseline, grown, looped and converted
models alike; the schedule is restored afterwards.  For each position the accuracy of a
task is measured with the evaluation package's scoring engine and compared with the
unswapped model.

Tasks: a reasoning primitive (multiple choice; ``acc`` and ``acc_norm``, default
``va_math_d0``) or ``lambada:FILE.jsonl`` -- a local LAMBADA-style file (``{"text": ...}``
per line; the last word is the target, accuracy = greedy prediction of all its tokens,
lm-eval's ``lambada`` ``acc``).

Null intervention: swapping every position with itself (the identity schedule installed
through the same path) must reproduce the baseline; its maximum absolute logit change on
a probe batch is reported as the noise floor.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from ..data.preprocess import iter_documents
from ..errors import UsageError
from ..eval import primitives
from ..eval.engine import LogProbEngine
from ..eval.scoring import evaluate_items
from .access import AnalysisModel
from .results import Result, draw_structure, mpl


def swapped_schedule(schedule: Sequence[int], position: int, width: int = 1, other: Optional[int] = None) -> List[int]:
    """``schedule`` with the blocks at positions ``[i, i+w)`` and ``[j, j+w)`` exchanged, where
    ``j = other`` (default ``i + w``: the adjacent block).  ``other == position`` leaves it unchanged
    (the null swap)."""
    s = list(schedule)
    i, w = int(position), int(width)
    j = i + w if other is None else int(other)
    if w < 1 or min(i, j) < 0 or max(i, j) + w > len(s):
        raise UsageError(f"swap of width {w} at positions {i} and {j} lies outside the effective depth {len(s)}")
    if i == j:
        return s
    if abs(i - j) < w:
        raise UsageError(f"swap of width {w}: blocks at {i} and {j} overlap")
    a, b = sorted((i, j))
    return s[:a] + s[b:b + w] + s[a + w:b] + s[a:a + w] + s[b + w:]


@contextmanager
def schedule_override(model, schedule: Sequence[int]):
    """Run ``model`` with another application schedule (PP=1), restoring its own afterwards."""
    model.decoder.set_global_schedule(list(schedule))
    try:
        yield
    finally:
        model.apply_schedule()


# ---------------------------------------------------------------------------------- tasks
class PrimitiveTask:
    def __init__(self, name: str, n: int, seed: int = 0, num_fewshot: int = 5, template: str = "fill_blank"):
        self.name = name
        self.items = primitives.generate_task(name, n, seed=seed, num_fewshot=num_fewshot, template=template)
        self.chance = primitives.get_task(name).chance
        self.config = {"task": name, "n": n, "seed": seed, "num_fewshot": num_fewshot, "template": template}

    def evaluate(self, engine) -> Dict[str, float]:
        res, _ = evaluate_items(engine, self.items)
        return {"acc": res.acc, "acc_norm": res.acc_norm, "acc_stderr": res.acc_stderr,
                "acc_norm_stderr": res.acc_norm_stderr}


class LambadaTask:
    """Last-word prediction from a local JSONL file (lm-eval ``lambada`` ``acc``)."""

    def __init__(self, path: str, n: int):
        self.name = f"lambada:{path}"
        self.requests = []
        for doc in iter_documents([path]):
            doc = doc.strip()
            if " " not in doc:
                continue
            ctx, word = doc.rsplit(" ", 1)
            self.requests.append((ctx, " " + word))
            if len(self.requests) >= n:
                break
        if not self.requests:
            raise UsageError(f"--swap-task lambada:{path}: no usable line (need text with at least two words)")
        self.chance = 0.0
        self.config = {"task": "lambada", "file": path, "n": len(self.requests)}

    def evaluate(self, engine) -> Dict[str, float]:
        res = engine.loglikelihood_greedy(self.requests)
        acc = float(np.mean([g for _, g in res]))
        n = len(res)
        se = float(np.std([float(g) for _, g in res], ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
        return {"acc": acc, "acc_stderr": se}


def make_task(spec: str, n: int, seed: int = 0, num_fewshot: int = 5, template: str = "fill_blank"):
    if spec.startswith("lambada:"):
        return LambadaTask(spec.split(":", 1)[1], n)
    return PrimitiveTask(spec, n, seed, num_fewshot, template)


# ---------------------------------------------------------------------------------- sweep
class SwapResult(Result):
    kind = "swap"

    def plot(self, path: str) -> str:
        plt = mpl()
        metric = self.config.get("metric", "acc")
        widths = self.config["widths"]
        fig, ax = plt.subplots(figsize=(7.5, 3.6))
        base = self.scalars["baseline"][metric]
        for w in widths:
            pos = self.arrays[f"positions_w{w}"]
            val = self.arrays[f"{metric}_w{w}"]
            ax.plot(pos + w - 0.5, val, marker="o", ms=3, label=f"swap {w}-layer blocks")
        ax.axhline(base, color="black", lw=1.2, label="unswapped")
        if self.scalars.get("chance"):
            ax.axhline(self.scalars["chance"], color="grey", ls="--", lw=0.8, label="chance")
        draw_structure(ax, self.model)
        ax.set_xlabel("effective depth (centre of the swapped pair)")
        ax.set_ylabel(f"{metric} ({self.config.get('task')})")
        ax.set_ylim(0, 1.02)
        ax.set_xlim(-0.5, self.model.get("effective_depth", 1) - 0.5)
        ax.legend(fontsize=7)
        ax.set_title(f"Layer swaps -- {self.title}\nnull swap: max |Δlogit| {self.scalars['noise_floor']:.1e}", fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


def layer_swap(am: AnalysisModel, task, widths: Sequence[int] = (1, 2), positions: Optional[Sequence[int]] = None,
               probe: Optional[torch.Tensor] = None, batch_size: int = 8, log=None,
               metric: Optional[str] = None) -> SwapResult:
    """Accuracy of ``task`` with each adjacent swap of width ``w`` (see the module docstring)."""

    if am.tokenizer is None:
        raise UsageError("layer swaps score a text task and need the model's tokenizer")
    model = am.model
    engine = LogProbEngine(model, am.tokenizer, vocab_size=am.vocab_size, batch_size=batch_size)
    K = am.depth
    base_sched = am.schedule
    baseline = task.evaluate(engine)
    if metric is None:
        metric = "acc_norm" if "acc_norm" in baseline else "acc"
    elif metric not in baseline:
        raise UsageError(f"--swap-metric {metric}: task {task.name} reports only "
                         f"{', '.join(k for k in baseline if 'stderr' not in k)}")
    if log:
        log(f"swap: unswapped {baseline}")
    # null intervention: the identity schedule through the override path
    noise = 0.0
    if probe is not None:
        ref = am.logits(probe)
        with schedule_override(model, swapped_schedule(base_sched, 0, 1, other=0)):
            noise = float((am.logits(probe) - ref).abs().max())
    arrays: Dict[str, Any] = {}
    for w in widths:
        if w < 1 or 2 * w > K:
            raise UsageError(f"--swap-widths {w}: a swap of width w needs 2w <= effective depth {K}")
        pos = list(range(0, K - 2 * w + 1)) if positions is None else [p for p in positions if p + 2 * w <= K]
        rows: Dict[str, List[float]] = {}
        for p in pos:
            with schedule_override(model, swapped_schedule(base_sched, p, w)):
                r = task.evaluate(engine)
            for k, v in r.items():
                rows.setdefault(k, []).append(v)
            if log:
                log(f"swap w={w} at {p}: " + ", ".join(f"{k} {v:.3f}" for k, v in r.items() if "stderr" not in k))
        arrays[f"positions_w{w}"] = np.asarray(pos, dtype=float)
        for k, v in rows.items():
            arrays[f"{k}_w{w}"] = np.asarray(v, dtype=float)
    if am.schedule != base_sched:
        raise RuntimeError("the model's schedule was not restored after the swaps")
    return SwapResult(
        model=am.describe(),
        config={"task": task.name, **task.config, "widths": list(widths), "metric": metric, "dtype": str(am.dtype),
                "definition": "positions [i,i+w) and [i+w,i+2w) of the schedule exchanged"},
        arrays=arrays,
        scalars={"baseline": baseline, "chance": task.chance, "noise_floor": noise},
    )
