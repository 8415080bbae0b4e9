"""Overlay several models' analysis results (the paper shows Baseline, LIDAS, Loop(4x6) and
Loop(4-4x4-4) side by side).

Input: result directories written by ``python -m megatron_growloop.analysis all`` (or by
single analyses); each may hold ``depth_score.json``, ``lens.json``, ``norms.json``,
``local_effects.json`` and ``swap.json``.  Output: one PNG per analysis kind present in
at least one directory, plus ``compare.json`` with the headline numbers.  The x axis is
effective depth, or the fraction of it (``normalize_depth=True``) when the models have
different depths.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..errors import UsageError
from .results import Result, draw_structure, load_result, mpl

KINDS = ("depth_score", "lens", "norms", "local_effects", "swap")


def load_dirs(dirs: Sequence[str], labels: Optional[Sequence[str]] = None) -> List[Dict[str, Result]]:
    out = []
    for i, d in enumerate(dirs):
        p = Path(d)
        if not p.is_dir():
            raise UsageError(f"compare: {d!r} is not a directory of analysis results")
        res = {k: load_result(p / f"{k}.json") for k in KINDS if (p / f"{k}.json").exists()}
        if not res:
            raise UsageError(f"compare: {d!r} holds no analysis results ({', '.join(k + '.json' for k in KINDS)})")
        if labels:
            for r in res.values():
                r.model["label"] = labels[i]
        out.append(res)
    return out


def _savefig(plt, fig, out: Path, kind: str) -> str:
    path = str(out / f"compare_{kind}.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _x(r: Result, n: int, normalize: bool) -> np.ndarray:
    x = np.arange(n, dtype=float)
    return x / max(n - 1, 1) if normalize else x


def _label(r: Result) -> str:
    return str(r.model.get("label", "?"))


def compare(dirs: Sequence[str], out_dir: str, labels: Optional[Sequence[str]] = None,
            normalize_depth: bool = False) -> Dict[str, str]:
    """Write the comparison figures; returns ``{kind: png path}``."""
    if labels and len(labels) != len(dirs):
        raise UsageError(f"compare: {len(labels)} labels for {len(dirs)} directories")
    models = load_dirs(dirs, labels)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plt = mpl()
    paths: Dict[str, str] = {}
    summary: Dict[str, Dict] = {}
    xl = "fraction of effective depth" if normalize_depth else "effective depth"

    # ---- depth score (Fig. 2A) + output-effect distributions
    ds = [m["depth_score"] for m in models if "depth_score" in m]
    if ds:
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
        names = [_label(r) for r in ds]
        vals = [r.scalars["depth_score_normalized"] for r in ds]
        axes[0].bar(range(len(ds)), vals, color=[f"C{i}" for i in range(len(ds))])
        axes[0].set_xticks(range(len(ds)))
        axes[0].set_xticklabels(names, rotation=15, fontsize=8)
        axes[0].set_ylabel("depth score / (K-1)")
        for i, r in enumerate(ds):
            axes[0].text(i, vals[i], f"{r.scalars['depth_score']:.2f}", ha="center", va="bottom", fontsize=8)
        for i, r in enumerate(ds):
            O = np.asarray(r.arrays["output_effect"], dtype=float)
            axes[1].plot(_x(r, len(O), normalize_depth), O / max(O.sum(), 1e-12), marker="o", ms=3,
                         color=f"C{i}", label=_label(r))
        axes[1].set_xlabel(f"skipped application ({xl})")
        axes[1].set_ylabel("output effect (normalised)")
        axes[1].legend(fontsize=7)
        fig.suptitle(f"Depth score ({ds[0].config.get('mode')} mode)", fontsize=9)
        fig.tight_layout()
        paths["depth_score"] = _savefig(plt, fig, out, "depth_score")
        for r in ds:
            summary.setdefault(_label(r), {})["depth_score"] = r.scalars["depth_score"]
            summary[_label(r)]["depth_score_normalized"] = r.scalars["depth_score_normalized"]

    # ---- lens (Fig. 2B, 2C)
    ls = [m["lens"] for m in models if "lens" in m]
    if ls:
        has_acc = all("tuned_acc_norm" in r.arrays for r in ls)
        same_task = len({r.config.get("task") for r in ls}) == 1
        fig, axes = plt.subplots(1, 3 if has_acc else 2, figsize=(14 if has_acc else 9.5, 3.5))
        for i, r in enumerate(ls):
            K = len(r.arrays["tuned_kl"])
            x = _x(r, K, normalize_depth)
            axes[0].plot(x, np.maximum(r.arrays["tuned_kl"], 1e-6), marker="o", ms=3, color=f"C{i}", label=_label(r))
            axes[1].plot(x, r.arrays["tuned_top5"], marker="o", ms=3, color=f"C{i}", label=_label(r))
            if has_acc:
                task = r.config.get("task")
                axes[2].plot(x, r.arrays["tuned_acc_norm"], marker="o", ms=3, color=f"C{i}",
                             label=_label(r) if same_task else f"{_label(r)}: {task}")
                ch = r.scalars.get("task_chance")
                if ch:
                    axes[2].axhline(ch, color=f"C{i}" if not same_task else "grey", ls="--", lw=0.8)
            summary.setdefault(_label(r), {})["mean_tuned_kl"] = r.scalars.get("mean_tuned_kl")
        axes[0].set_yscale("log")
        axes[0].set_ylabel("tuned lens KL(final || lens)")
        axes[1].set_ylabel("tuned lens top-5 overlap")
        axes[1].set_ylim(0, 1.02)
        if has_acc:
            axes[2].set_ylabel(f"early-exit acc_norm ({ls[0].config.get('task') if same_task else 'task per model'})")
            axes[2].set_ylim(0, 1.02)
            if not same_task:
                axes[2].legend(fontsize=6)
        for ax in axes:
            ax.set_xlabel(f"lens after application ({xl})", fontsize=8)
        axes[0].legend(fontsize=7)
        fig.suptitle("Early exit with the tuned lens", fontsize=9)
        fig.tight_layout()
        paths["lens"] = _savefig(plt, fig, out, "lens")

    # ---- norms (Fig. 3, 14)
    ns = [m["norms"] for m in models if "norms" in m]
    if ns:
        fig, axes = plt.subplots(1, 4, figsize=(18, 3.5))
        for i, r in enumerate(ns):
            K = len(r.arrays["resid_mean"])
            x = _x(r, K, normalize_depth)
            for ax, q in zip(axes, ("resid_mean", "attn_rel_mean", "mlp_rel_mean", "layer_rel_mean")):
                ax.plot(x, r.arrays[q], marker="o", ms=3, color=f"C{i}", label=_label(r))
            summary.setdefault(_label(r), {})["resid_growth"] = r.scalars.get("resid_growth")
        axes[0].set_ylabel("mean residual norm ||h||")
        axes[1].set_ylabel("mean attention ||a|| / ||h||")
        axes[2].set_ylabel("mean MLP ||m|| / ||h+a||")
        axes[3].set_ylabel("mean layer ||a+m|| / ||h||")
        for ax in axes:
            ax.set_yscale("log")  # the first layer's ratios are orders of magnitude above the rest
            ax.set_xlabel(f"application ({xl})", fontsize=8)
        axes[0].legend(fontsize=7)
        fig.suptitle("Residual stream and sublayer contributions", fontsize=9)
        fig.tight_layout()
        paths["norms"] = _savefig(plt, fig, out, "norms")

    # ---- local effects (Fig. 4, 13)
    le = [m["local_effects"] for m in models if "local_effects" in m]
    if le:
        fig, axes = plt.subplots(1, len(le), figsize=(3.6 * len(le) + 1, 3.6), squeeze=False)
        for ax, r in zip(axes[0], le):
            M = np.asarray(r.arrays["effect_max"], dtype=float)
            shown = np.where(np.triu(np.ones_like(M, dtype=bool), 1), M, np.nan)
            im = ax.imshow(shown, vmin=0, vmax=1, cmap="viridis", interpolation="nearest")
            draw_structure(ax, r.model, "x")
            draw_structure(ax, r.model, "y")
            ax.set_title(_label(r), fontsize=8)
            ax.set_xlabel("effect @ l", fontsize=8)
            ax.set_ylabel("removed s", fontsize=8)
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.85, label="relative change (max)")
        fig.suptitle("Future local effects", fontsize=9)
        paths["local_effects"] = _savefig(plt, fig, out, "local_effects")

    # ---- swaps (Fig. 5, 11)
    sw = [m["swap"] for m in models if "swap" in m]
    if sw:
        widths = sorted({w for r in sw for w in r.config["widths"]})
        same_task = len({r.config.get("task") for r in sw}) == 1
        fig, axes = plt.subplots(1, len(widths), figsize=(6.5 * len(widths), 3.5), squeeze=False)
        for j, w in enumerate(widths):
            ax = axes[0][j]
            for i, r in enumerate(sw):
                if f"positions_w{w}" not in r.arrays:
                    continue
                metric = r.config.get("metric", "acc")
                K = r.model.get("effective_depth", 1)
                pos = np.asarray(r.arrays[f"positions_w{w}"], dtype=float) + w - 0.5
                x = pos / max(K - 1, 1) if normalize_depth else pos
                label = _label(r) if same_task else f"{_label(r)}: {r.config.get('task')}"
                ax.plot(x, r.arrays[f"{metric}_w{w}"], marker="o", ms=3, color=f"C{i}", label=label)
                ax.axhline(r.scalars["baseline"][metric], color=f"C{i}", ls=":", lw=1)
            task = sw[0].config.get("task") if same_task else "task per model"
            ax.set_title(f"swapping {w}-layer blocks ({task}, {sw[0].config.get('metric')}; "
                         "dotted: unswapped)", fontsize=8)
            ax.set_xlabel(f"centre of the swapped pair ({xl})", fontsize=8)
            ax.set_ylim(0, 1.02)
            ax.legend(fontsize=7)
        fig.tight_layout()
        paths["swap"] = _savefig(plt, fig, out, "swap")
    (out / "compare.json").write_text(json.dumps({"dirs": list(dirs), "summary": summary, "figures": paths},
                                                 indent=1, default=str) + "\n")
    return paths
