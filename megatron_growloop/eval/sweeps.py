"""Sweeps of the paper's inference-time experiments.

* :func:`repeat_block_sweep` -- accuracy when a contiguous block of ``block_size``
  applications starting at position ``s`` runs ``R`` times in total (paper Fig. 6,
  12, 18, 19; ``R = 1`` is the unmodified model).  The schedule is changed on the
  live model (:meth:`GrowLoopGPTModel.set_repeat_blocks`); nothing is reloaded.
* :func:`icl_sweep` -- accuracy over the number of in-context examples, up to the
  largest number whose prompts fit the context length (paper Fig. 7, 16).
* :func:`loop_repeats_sweep` -- accuracy against k of a looped model, or against the
  number of applications R of one block of any model (paper Fig. 9, 17); optionally any
  lm-eval task at every k through the lm-eval adapter.

Both evaluate the same items for every configuration (the items of a task depend only
on ``(task, seed, index)``), so differences between cells are paired.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from .. import platform
from ..errors import UsageError
from ..looping.spec import RepeatBlock
from . import primitives
from .scoring import Scorer, evaluate_items

DEFAULT_SHOTS = (0, 1, 2, 3, 5, 8, 10, 15, 20, 30, 40, 50, 75, 100, 150, 200, 300, 400, 500)


def _agree_everywhere(ok: bool) -> bool:
    """True only if ``ok`` on every rank (a schedule change must succeed on all stages)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return ok

    flag = torch.tensor([1 if ok else 0], dtype=torch.int64, device=platform.device())
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _set_blocks(model, blocks: List[str]) -> Optional[str]:
    """Install repeat blocks on every rank; returns an error message (and keeps the old
    schedule everywhere) if any pipeline stage cannot run it."""
    old = list(model.config.repeat_blocks)
    err = None
    try:
        model.set_repeat_blocks(blocks)
    except UsageError as exc:
        err = str(exc)
    if not _agree_everywhere(err is None):
        if err is None:
            model.set_repeat_blocks(old)
            err = "another pipeline stage cannot run this schedule"
        return err
    return None


def repeat_block_sweep(
    model,
    scorer: Scorer,
    tasks="all",
    block_size: int = 4,
    starts: Optional[Sequence[int]] = None,
    repeats: Sequence[int] = (1, 2, 3),
    limit: int = 100,
    seed: int = 0,
    num_fewshot: int = primitives.DEFAULT_NUM_FEWSHOT,
    template=primitives.DEFAULT_TEMPLATE,
    log: Optional[Callable[[str], None]] = None,
    on_update: Optional[Callable[[Dict[str, Any]], None]] = None,
) -> Dict[str, Any]:
    """``acc[task][R index][start index]`` (and ``acc_norm``, standard errors) for blocks
    ``[s, s+block_size)`` run R times.  ``on_update(partial_result)`` is called after every
    configuration (missing cells are None), e.g. to save progress of long sweeps."""
    names = primitives.resolve_tasks(tasks)
    base = list(model.config.repeat_blocks)
    depth = model.effective_depth
    if block_size < 1 or block_size > depth:
        raise UsageError(f"--block-size {block_size} must be in 1..{depth} (the model's effective depth)")
    if starts is None:
        starts = list(range(0, depth - block_size + 1))
    starts = [int(s) for s in starts]
    for s in starts:
        if s < 0 or s + block_size > depth:
            raise UsageError(
                f"repeat block {s}:{s + block_size} lies outside the model: its effective depth is {depth} "
                f"(starts 0..{depth - block_size} are valid for --block-size {block_size})"
            )
    repeats = sorted({int(r) for r in repeats})
    if not repeats or repeats[0] < 1:
        raise UsageError(f"--repeats must be integers >= 1, got {list(repeats)}")
    items = {n: primitives.generate_task(n, limit, seed=seed, num_fewshot=num_fewshot, template=template)
             for n in names}

    def run_all(tag: str) -> Dict[str, Dict[str, Any]]:
        out = {}
        t0 = time.time()
        for n in names:
            res, _ = evaluate_items(scorer, items[n])
            out[n] = res.to_dict()
        if log:
            mean = sum(r["acc"] for r in out.values()) / len(out)
            mean_n = sum(r["acc_norm"] for r in out.values()) / len(out)
            log(f"{tag:>14s}: mean acc {mean:.3f}  acc_norm {mean_n:.3f}  ({time.time() - t0:.1f}s)")
        return out

    cells: Dict[str, Dict[str, Any]] = {}
    skipped: Dict[str, str] = {}

    def table(metric: str) -> Dict[str, List[List[Optional[float]]]]:
        t = {}
        for n in names + ["mean"]:
            rows = []
            for r in repeats:
                row = []
                for s in starts:
                    c = cells.get(f"{s}:{r}")
                    if c is None:
                        row.append(None)
                    elif n == "mean":
                        row.append(sum(v[metric] for v in c.values()) / len(c))
                    else:
                        row.append(c[n][metric])
                rows.append(row)
            t[n] = rows
        return t

    def result() -> Dict[str, Any]:
        return {
            "kind": "repeat_block",
            "tasks": names,
            "block_size": block_size,
            "starts": starts,
            "repeats": repeats,
            "acc": table("acc"),
            "acc_norm": table("acc_norm"),
            "stderr": {"acc": table("acc_stderr"), "acc_norm": table("acc_norm_stderr")},
            "chance": {n: primitives.get_task(n).chance for n in names},
            "skipped": dict(skipped),
            "config": {"limit": limit, "seed": seed, "num_fewshot": num_fewshot,
                       "template": primitives.get_template(template).name, "base_repeat_blocks": base},
        }

    try:
        baseline = run_all("baseline R=1") if 1 in repeats else None
        if baseline is not None:
            for s in starts:
                cells[f"{s}:1"] = baseline
            if on_update:
                on_update(result())
        for s in starts:
            for r in repeats:
                key = f"{s}:{r}"
                if r == 1:
                    cells[key] = baseline
                    continue
                block = str(RepeatBlock(s, s + block_size, r))
                err = _set_blocks(model, base + [block])
                if err:
                    skipped[key] = err
                    if log:
                        log(f"{block:>14s}: skipped ({err})")
                    continue
                cells[key] = run_all(block)
                if on_update:
                    on_update(result())
    finally:
        _set_blocks(model, base)

    return result()


def icl_sweep(
    scorer: Scorer,
    tasks="all",
    shots: Optional[Sequence[int]] = None,
    max_length: Optional[int] = None,
    token_length: Optional[Callable[[primitives.Item], int]] = None,
    limit: int = 100,
    seed: int = 0,
    template=primitives.DEFAULT_TEMPLATE,
    log: Optional[Callable[[str], None]] = None,
) -> Dict[str, Any]:
    """Accuracy per number of in-context examples; a shot count is evaluated only while
    every item's prompt plus its longest choice fits ``max_length`` tokens (measured by
    ``token_length(item)``); larger counts are listed under ``did_not_fit``."""
    names = primitives.resolve_tasks(tasks)
    shots = sorted({int(k) for k in (shots if shots is not None else DEFAULT_SHOTS)})
    if not shots or shots[0] < 0:
        raise UsageError(f"--shots must be integers >= 0, got {list(shots)}")
    out: Dict[str, Any] = {"kind": "icl", "tasks": names, "shots": {}, "acc": {}, "acc_norm": {},
                           "acc_stderr": {}, "acc_norm_stderr": {}, "did_not_fit": {}, "max_prompt_tokens": {}}
    for n in names:
        ks, acc, accn, se, sen, lens = [], [], [], [], [], []
        for k in shots:
            items = primitives.generate_task(n, limit, seed=seed, num_fewshot=k, template=template)
            if token_length is not None and max_length is not None:
                longest = max(token_length(it) for it in items)
                if longest > max_length:
                    out["did_not_fit"][n] = {"shots": k, "tokens": longest, "max_length": max_length}
                    break
                lens.append(longest)
            t0 = time.time()
            res, _ = evaluate_items(scorer, items)
            ks.append(k)
            acc.append(res.acc)
            accn.append(res.acc_norm)
            se.append(res.acc_stderr)
            sen.append(res.acc_norm_stderr)
            if log:
                log(f"{n:14s} {k:4d}-shot: acc {res.acc:.3f}  acc_norm {res.acc_norm:.3f}  ({time.time() - t0:.1f}s)")
        out["shots"][n], out["acc"][n], out["acc_norm"][n] = ks, acc, accn
        out["acc_stderr"][n], out["acc_norm_stderr"][n] = se, sen
        out["max_prompt_tokens"][n] = lens
    out["chance"] = {n: primitives.get_task(n).chance for n in names}
    out["config"] = {"limit": limit, "seed": seed, "template": primitives.get_template(template).name,
                     "max_length": max_length}
    return out


def repeat_block_table(result: Dict[str, Any], metric: str = "acc_norm", stderr: bool = True) -> str:
    """A markdown table of a repeat-block sweep: one row per task (+ mean), one column for the
    unmodified model (R = 1) and one per (start, R > 1); values in percent."""
    starts, repeats = result["starts"], result["repeats"]
    cols = []
    if 1 in repeats:
        cols.append(("R=1 (model)", repeats.index(1), 0))
    for j, s in enumerate(starts):
        for i, r in enumerate(repeats):
            if r != 1:
                cols.append((f"{s}:{s + result['block_size']} R={r}", i, j))
    head = "| task | " + " | ".join(c[0] for c in cols) + " |"
    sep = "| --- |" + " ---: |" * len(cols)
    lines = [head, sep]
    for name in list(result["tasks"]) + ["mean"]:
        cells = []
        for _, i, j in cols:
            v = result[metric][name][i][j]
            if v is None:
                cells.append("--")
                continue
            txt = f"{100 * v:.0f}"
            if stderr and name != "mean":
                se = result["stderr"][metric][name][i][j]
                txt += f" ± {100 * se:.0f}"
            cells.append(txt)
        label = f"**{name}**" if name == "mean" else name
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _parse_block(text: str):
    """``S:E`` -> ``(S, E)`` (the block whose applications are counted)."""
    parts = str(text).split(":")
    try:
        start, end = (int(p) for p in parts)
    except ValueError:
        raise UsageError(f"--block {text!r}: expected START:END (effective-depth positions), e.g. 8:12") from None
    if start < 0 or end <= start:
        raise UsageError(f"--block {text!r}: need 0 <= START < END")
    return start, end


def loop_repeats_sweep(
    model,
    scorer: Scorer,
    tasks="all",
    repeats: Sequence[int] = (1, 2, 3, 4),
    block: Optional[str] = None,
    limit: int = 100,
    seed: int = 0,
    num_fewshot: int = primitives.DEFAULT_NUM_FEWSHOT,
    template=primitives.DEFAULT_TEMPLATE,
    log: Optional[Callable[[str], None]] = None,
    extra: Optional[Callable[[int, str], Dict[str, Dict[str, float]]]] = None,
) -> Dict[str, Any]:
    """Accuracy at every value of the depth axis, on the live model (nothing is reloaded).

    Without ``block`` the model must be looped and the axis is its k (``set_loop_repeats``);
    with ``block="S:E"`` positions ``S..E-1`` run R times in total (``R = 1``: unchanged).
    ``extra(value, setting)`` -- e.g. lm-eval tasks through the adapter -- returns
    ``{task: {metric: value}}`` at each point, stored under ``"extra"``.  The model's own
    schedule is restored afterwards."""
    names = primitives.resolve_tasks(tasks)
    repeats = sorted({int(r) for r in repeats})
    if not repeats or repeats[0] < 1:
        raise UsageError(f"--repeats must be integers >= 1, got {list(repeats)}")
    base_blocks = list(model.config.repeat_blocks)
    loop = model.config.loop
    if block is None:
        if loop is None:
            raise UsageError("this model has no loop: give --block START:END to sweep the applications of one block")
        axis, trained = "k (loop repeats)", loop.repeats
    else:
        start, end = _parse_block(block)
        axis, trained = f"R (applications of block {start}:{end})", 1
        if end > model.effective_depth:
            raise UsageError(f"--block {block} lies outside the model: its effective depth is {model.effective_depth}")
    items = {n: primitives.generate_task(n, limit, seed=seed, num_fewshot=num_fewshot, template=template) for n in names}
    out: Dict[str, Any] = {"kind": "loop_repeats", "axis": axis, "block": block, "trained_repeats": trained,
                           "tasks": names, "repeats": [], "effective_depth": [], "settings": [], "skipped": {},
                           "acc": {n: [] for n in names + ["mean"]}, "acc_norm": {n: [] for n in names + ["mean"]},
                           "stderr": {"acc": {n: [] for n in names}, "acc_norm": {n: [] for n in names}},
                           "extra": {}}
    try:
        for r in repeats:
            if block is None:
                model.set_loop_repeats(r)
                setting = f"loop_repeats={r}"
            else:
                spec = f"{start}:{end}:{r}"
                err = _set_blocks(model, base_blocks + [spec])
                if err:
                    out["skipped"][str(r)] = err
                    if log:
                        log(f"R={r}: skipped ({err})")
                    continue
                setting = f"repeat_block={spec}"
            t0 = time.time()
            res = {n: evaluate_items(scorer, items[n])[0].to_dict() for n in names}
            out["repeats"].append(r)
            out["settings"].append(setting)
            out["effective_depth"].append(model.effective_depth)
            for metric in ("acc", "acc_norm"):
                for n in names:
                    out[metric][n].append(res[n][metric])
                    out["stderr"][metric][n].append(res[n][f"{metric}_stderr"])
                out[metric]["mean"].append(sum(res[n][metric] for n in names) / len(names))
            if extra is not None:
                for task, vals in extra(r, setting).items():
                    for metric, v in vals.items():
                        out["extra"].setdefault(task, {}).setdefault(metric, []).append(v)
            if log:
                log(f"{setting:>22s} (depth {model.effective_depth}): mean acc {out['acc']['mean'][-1]:.3f}  "
                    f"acc_norm {out['acc_norm']['mean'][-1]:.3f}  ({time.time() - t0:.1f}s)")
    finally:
        if block is None:
            model.set_loop_repeats(trained)
        else:
            _set_blocks(model, base_blocks)
    out["chance"] = {n: primitives.get_task(n).chance for n in names}
    out["config"] = {"limit": limit, "seed": seed, "num_fewshot": num_fewshot,
                     "template": primitives.get_template(template).name, "base_repeat_blocks": [str(b) for b in base_blocks]}
    return out
