"""PNG plots of the sweeps (matplotlib, Agg backend), with the model's block structure marked."""

from __future__ import annotations

import math
from typing import Any, Dict, Sequence

import matplotlib
import matplotlib.pyplot as plt
import numpy as np

from .loader import model_label


def _mpl():
    matplotlib.use("Agg", force=True)

    return plt


def _structure_lines(ax, model: Dict[str, Any], axis: str = "x", offset: float = -0.5) -> None:
    """Mark loop / repeat-block boundaries (solid) and growth-lineage boundaries (dashed)."""
    draw = ax.axvline if axis == "x" else ax.axhline
    for b in model.get("boundaries") or []:
        draw(b + offset, color="black", lw=1.2, ls="-", alpha=0.8)
    for b in model.get("grown_boundaries") or []:
        draw(b + offset, color="tab:red", lw=1.0, ls="--", alpha=0.8)


def _cell_edges(centres):
    """Edges of cells centred on sorted ``centres`` (half-way between neighbours)."""

    c = np.asarray(centres, dtype=float)
    if len(c) == 1:
        return np.array([c[0] - 0.5, c[0] + 0.5])
    mid = (c[1:] + c[:-1]) / 2
    return np.concatenate([[c[0] - (mid[0] - c[0])], mid, [c[-1] + (c[-1] - mid[-1])]])


def plot_repeat_block(result: Dict[str, Any], path: str, metric: str = "acc_norm") -> str:
    """One heatmap per task (+ the task mean): block start (x) x total applications R (y).

    Vertical lines: solid at loop / repeat-block boundaries of the evaluated model,
    dashed red where growth-lineage changes, dotted grey every ``block_size`` positions.
    """
    plt = _mpl()

    names = list(result["tasks"]) + ["mean"]
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    starts, repeats = result["starts"], result["repeats"]
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols + 1.0, 2.6 * rows + 0.9), squeeze=False,
                             layout="constrained")
    model = result.get("model", {})
    for ax, name in zip(axes.flat, names):
        data = np.array([[np.nan if v is None else v for v in row] for row in result[metric][name]], dtype=float)
        # cells centred on their start positions (starts need not be contiguous: 9, 13, 17)
        im = ax.pcolormesh(_cell_edges(starts), np.arange(len(repeats) + 1) - 0.5, data,
                           vmin=0.0, vmax=1.0, cmap="viridis")
        if len(starts) <= 12:
            ax.set_xticks(starts)
        ax.set_yticks(range(len(repeats)))
        ax.set_yticklabels([str(r) for r in repeats])
        ax.set_title(name + ("" if name == "mean" else f" (chance {result['chance'][name]:.0%})"), fontsize=9)
        ax.set_xlabel("block start (effective depth)", fontsize=8)
        ax.set_ylabel("R (applications)", fontsize=8)
        bs = result["block_size"]
        for b in range(0, (starts[-1] if starts else 0) + 1, bs):
            ax.axvline(b - 0.5, color="grey", lw=0.6, ls=":")
        _structure_lines(ax, model)
        edges = _cell_edges(starts)
        ax.set_xlim(edges[0], edges[-1])  # the guide lines must not widen the axis
        if data.size <= 120:
            for (i, j), v in np.ndenumerate(data):
                if not np.isnan(v):
                    ax.text(starts[j], i, f"{100 * v:.0f}", ha="center", va="center", fontsize=6,
                            color="white" if v < 0.6 else "black")
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label=metric)
    fig.suptitle(f"Repeating a {result['block_size']}-layer block ({metric}) -- {model_label(model) if model else ''}",
                 fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_icl(result: Dict[str, Any], path: str, metric: str = "acc_norm") -> str:
    """Accuracy vs number of in-context examples, one line per task, chance dashed."""
    plt = _mpl()
    model = result.get("model", {})
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in result["tasks"]:
        ks = result["shots"].get(name) or []
        if not ks:
            continue
        ax.plot(ks, [100 * v for v in result[metric][name]], marker="o", ms=3, label=name)
    chances = sorted(set(result.get("chance", {}).values()))
    for c in chances:
        ax.axhline(100 * c, color="grey", ls="--", lw=0.8)
    all_ks = sorted({k for n in result["tasks"] for k in (result["shots"].get(n) or [])})
    if all_ks and all_ks[-1] > 20:
        ax.set_xscale("symlog", linthresh=1)
    if all_ks:
        ax.set_xticks(all_ks)
        ax.set_xticklabels([str(k) for k in all_ks], fontsize=7)
    ax.set_xlabel("in-context examples")
    ax.set_ylabel(f"{metric} (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(f"In-context examples -- {model_label(model) if model else ''}", fontsize=9)
    if model.get("effective_depth"):
        sched = model.get("schedule") or []
        ax.text(0.01, 0.01, "schedule: " + " ".join(map(str, sched))[:120] +
                (f"  | block boundaries {model['boundaries']}" if model.get("boundaries") else ""),
                transform=ax.transAxes, fontsize=6, color="dimgrey")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _x_axis(ax, xs, label: str) -> None:
    """Ticks at the measured values; a symmetric-log axis when they span more than 8x (N = 64 ... 512)."""
    xs = sorted(set(xs))
    positive = [x for x in xs if x > 0]
    if positive and positive[-1] > 8 * positive[0]:
        ax.set_xscale("symlog", linthresh=positive[0])
    ax.set_xticks(xs)
    ax.set_xticklabels([str(x) for x in xs], fontsize=7)
    ax.set_xlabel(label)


def plot_sft(result: Dict[str, Any], path: str, metric: str = "acc_norm") -> str:
    """Fig. 8: held-out accuracy against the number of fine-tuning examples, one panel per task
    (+ the task mean), one line per model with mean ± std over seeds shaded, chance dashed."""
    plt = _mpl()
    names = list(result["tasks"]) + (["mean"] if len(result["tasks"]) > 1 else [])
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.6), squeeze=False, layout="constrained")
    for ax, name in zip(axes[0], names):
        xs_all = []
        for model in result["models"]:
            s = result["summary"][model["label"]][name][metric]
            if not s["n"]:
                continue
            xs, mean, std = np.array(s["n"]), 100 * np.array(s["mean"]), 100 * np.array(s["std"])
            label = model["label"] + (f" (repeat {model['retrofit_loop']})" if model.get("retrofit_loop") else "")
            line, = ax.plot(xs, mean, marker="o", ms=3, label=label)
            ax.fill_between(xs, mean - std, mean + std, color=line.get_color(), alpha=0.2, lw=0)
            xs_all.extend(s["n"])
        chance = (np.mean(list(result["chance"].values())) if name == "mean" else result["chance"][name])
        ax.axhline(100 * chance, color="grey", ls="--", lw=0.9, label="chance")
        if xs_all:
            _x_axis(ax, xs_all, "fine-tuning examples N")
        ax.set_ylim(0, 100)
        ax.set_ylabel(f"held-out {metric} (%)")
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=7)
    cfg = result.get("config", {})
    fig.suptitle(f"Supervised fine-tuning (mean ± std over seeds {cfg.get('seeds')}; {cfg.get('limit')} held-out "
                 f"items per task, {cfg.get('num_fewshot')}-shot)", fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_loop_repeats(result: Dict[str, Any], path: str, metric: str = "acc_norm",
                      others: Sequence[Dict[str, Any]] = ()) -> str:
    """Fig. 9 / 17: accuracy against k (looped model) or R (a repeated block), one panel per
    task (+ mean); ``others`` (earlier results of other models) are drawn in the same panels."""
    plt = _mpl()
    runs = [result] + list(others)
    names = list(result["tasks"]) + (["mean"] if len(result["tasks"]) > 1 else [])
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.8 * cols, 3.0 * rows + 0.6), squeeze=False, layout="constrained")
    for ax, name in zip(axes.flat, names):
        xs_all = []
        for run in runs:
            ys = run[metric].get(name)
            if ys is None:
                continue
            xs = run["repeats"]
            pts = [(x, 100 * y) for x, y in zip(xs, ys) if y is not None]
            if not pts:
                continue
            label = run.get("label") or (model_label(run["model"]) if run.get("model") else "model")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=label)
            if run.get("trained_repeats") is not None:
                ax.axvline(run["trained_repeats"], color="grey", lw=0.6, ls=":")
            xs_all.extend(xs)
        chance = (np.mean(list(result["chance"].values())) if name == "mean" else result["chance"].get(name))
        if chance is not None:
            ax.axhline(100 * chance, color="grey", ls="--", lw=0.9)
        if xs_all:
            ax.set_xticks(sorted(set(xs_all)))
        ax.set_xlabel(result["axis"])
        ax.set_ylabel(f"{metric} (%)")
        ax.set_ylim(0, 100)
        ax.set_title(name + ("" if name == "mean" or chance is None else f" (chance {chance:.0%})"), fontsize=9)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(f"Accuracy against {result['axis']} (dotted: the value trained with)", fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_tradeoff(report: Dict[str, Any], path: str) -> str:
    """Fig. 1: accuracy against unique parameters, inference FLOPs/token and training FLOPs.

    One point per model (error bar: its standard error), the Pareto front of each panel as a
    step line through the non-dominated points (ringed), chance dashed; log-scaled costs."""
    plt = _mpl()

    axes_spec = list(report["axes"].items())
    models = report["models"]
    fig, axes = plt.subplots(1, len(axes_spec), figsize=(5.0 * len(axes_spec), 4.2), squeeze=False,
                             layout="constrained")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color = {m["name"]: colors[i % len(colors)] for i, m in enumerate(models)}
    for ax, (key, label) in zip(axes[0], axes_spec):
        for m in models:
            ax.errorbar(m[key], m["accuracy"], yerr=m["stderr"], fmt="o", color=color[m["name"]],
                        capsize=3, label=m["name"])
        front = [next(m for m in models if m["name"] == n) for n in report["pareto"][key]]
        if front:
            xs = [m[key] for m in front]
            ys = [m["accuracy"] for m in front]
            ax.step(xs, ys, where="post", color="black", lw=1.0, ls="--", alpha=0.7)
            ax.scatter(xs, ys, s=160, facecolors="none", edgecolors="black", lw=1.0, zorder=3)
        ax.axhline(report["chance"], color="grey", lw=1.0, ls=":", label="chance")
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"{report['score']} (mean over {report['metric']})")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize=8)
    fig.suptitle(f"Trade-offs ({len(report['tasks'])} tasks; dashed: Pareto front, ringed: on it)")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
