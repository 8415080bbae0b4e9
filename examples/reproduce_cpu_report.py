"""The claim-by-claim verdicts of the CPU reproduction (docs/reproduction.md) from its result files.

Reads what ``examples/reproduce_cpu.sh`` wrote under ``--runs`` (evaluation JSON, sweeps,
analyses, checkpoint accounting) and writes ``claims.json``, ``claims.md`` (the table),
``models.md`` (one row per model) and two overlay figures (in-context examples, block
repetition) into ``--out``.  Nothing is re-measured here.

Verdict rule (fixed before the results were seen), for a difference ``d`` in the paper's
direction with standard error ``se``:

* **reproduced**: ``d > 2 se``;
* **not reproduced**: ``d < -2 se`` (the opposite), or ``|d| <= 2 se`` with three seeds of
  each model (no effect at the precision three seeds give);
* **inconclusive**: ``|d| <= 2 se`` with fewer seeds, or the models are at chance on what
  is measured (nothing to compare).

Standard errors: over training seeds when a model has several (std / sqrt(n)), else the
item-level standard error of the evaluation; a difference of two models adds them in
quadrature.  Claim 2 asks whether grown models *reach* the baseline, so there the null is
"not worse": reproduced when training FLOPs are lower and neither accuracy nor NLL is worse
by more than 2 se.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

LABELS = {
    "base12": "Baseline (12)", "base6": "Baseline (6, iso-param)", "base2": "Baseline (2, iso-param)",
    "lidas": "LIDAS B=2", "midas": "MIDAS B=2", "loop2x6": "Loop(2x6)", "loop2-2x4-2": "Loop(2-2x4-2)",
    "lidas_retro": "LIDAS + retrofit 4:6:2", "base12_retro": "Baseline + retrofit 4:6:2",
}
GROWN = ("lidas", "midas")
LOOPED = ("loop2x6", "loop2-2x4-2")


def _json(path: Path) -> Optional[Dict[str, Any]]:
    return json.loads(path.read_text()) if path.is_file() else None


def _seeds(runs: Path, name: str) -> List[int]:
    return sorted(int(p.name.rsplit("_s", 1)[1]) for p in (runs / "eval").glob(f"{name}_s*")
                  if (p / "primitives.json").is_file())


def _mean_se(values: Sequence[float], item_se: Sequence[float]) -> Tuple[float, float, str]:
    n = len(values)
    m = float(np.mean(values))
    if n > 1:
        return m, float(np.std(values, ddof=1) / math.sqrt(n)), f"{n} seeds"
    return m, float(item_se[0]), "items"


def group(res: Dict[str, Any], tasks: Sequence[str], key: str = "acc_norm") -> Tuple[float, float]:
    vals = [res["results"][t][key] for t in tasks]
    ses = [res["results"][t][f"{key}_stderr"] for t in tasks]
    return float(np.mean(vals)), math.sqrt(sum(s * s for s in ses)) / len(ses)


def _meta(runs: Path, name: str, seed: int) -> Dict[str, Any]:
    d = runs / "models" / f"{name}_s{seed}"
    it = int((d / "latest_checkpointed_iteration.txt").read_text())
    return json.loads((d / f"iter_{it:07d}" / "growloop.json").read_text())


def model_record(runs: Path, name: str, tasks: Sequence[str]) -> Optional[Dict[str, Any]]:
    seeds = _seeds(runs, name)
    if not seeds:
        return None
    accs, aces, nlls, nses, per_task = [], [], [], [], []
    for s in seeds:
        res = _json(runs / "eval" / f"{name}_s{s}" / "primitives.json")
        a, ase = group(res, tasks)
        accs.append(a)
        aces.append(ase)
        per_task.append({t: res["results"][t]["acc_norm"] for t in tasks})
        nll = _json(runs / "eval" / f"{name}_s{s}" / "nll.json")
        if nll:
            nlls.append(nll["nll"])
            nses.append(nll.get("nll_stderr", float("nan")))
    meta = _meta(runs, name, seeds[0])
    acc, acc_se, basis = _mean_se(accs, aces)
    rec = {"name": name, "label": LABELS.get(name, name), "seeds": seeds, "acc": acc, "acc_se": acc_se,
           "se_over": basis, "acc_per_seed": accs,
           "per_task": {t: float(np.mean([p[t] for p in per_task])) for t in tasks},
           "chance": float(np.mean([res["results"][t]["chance"] for t in tasks])),
           "unique_parameters": meta["accounting"]["unique_parameters"],
           "inference_flops_per_token": meta["accounting"]["inference_flops_per_token"],
           "effective_depth": meta["accounting"]["effective_depth"],
           "training_flops": meta["training_flops"], "tokens": meta.get("tokens")}
    if nlls:
        rec["nll"], rec["nll_se"], _ = _mean_se(nlls, nses)
    return rec


def verdict(d: float, se: float, n_seeds: int, at_chance: bool = False) -> Tuple[str, str]:
    if at_chance:
        return "inconclusive", "the models are at chance on this measure"
    if d > 2 * se:
        return "reproduced", f"difference {d:+.3f} > 2 se ({2 * se:.3f})"
    if d < -2 * se:
        return "not reproduced", f"opposite: difference {d:+.3f} < -2 se ({-2 * se:.3f})"
    if n_seeds >= 3:
        return "not reproduced", f"no difference beyond 2 se ({d:+.3f} ± {se:.3f}) with {n_seeds} seeds"
    return "inconclusive", f"difference {d:+.3f} within 2 se ({2 * se:.3f}) of {n_seeds} seed(s)"


def _diff(a: Dict[str, Any], b: Dict[str, Any], key: str = "acc") -> Tuple[float, float, int]:
    se_key = f"{key}_se"
    return a[key] - b[key], math.sqrt(a[se_key] ** 2 + b[se_key] ** 2), min(len(a["seeds"]), len(b["seeds"]))


def _above_chance(*recs) -> bool:
    return any(r["acc"] - r["chance"] > 2 * r["acc_se"] for r in recs)


# ------------------------------------------------------------------------------ claims
def claim1(m: Dict[str, Dict[str, Any]]) -> List[Dict[str, Any]]:
    rows = []
    for loop, base in (("loop2-2x4-2", "base6"), ("loop2x6", "base2")):
        if loop in m and base in m:
            d, se, n = _diff(m[loop], m[base])
            v, why = verdict(d, se, n, not _above_chance(m[loop], m[base]))
            rows.append({"claim": 1, "comparison": f"{LABELS[loop]} vs {LABELS[base]}", "value": d, "se": se,
                         "verdict": v, "why": why,
                         "numbers": f"{m[loop]['acc']:.3f} ± {m[loop]['acc_se']:.3f} vs {m[base]['acc']:.3f} ± "
                                    f"{m[base]['acc_se']:.3f} (same unique layers)"})
    return rows


def claim2(m: Dict[str, Dict[str, Any]]) -> List[Dict[str, Any]]:
    rows = []
    base = m.get("base12")
    for g in GROWN:
        if g not in m or base is None:
            continue
        ratio = m[g]["training_flops"] / base["training_flops"]
        da, sea, n = _diff(m[g], base)
        dn, sen, _ = _diff(m[g], base, "nll") if "nll" in m[g] and "nll" in base else (float("nan"),) * 3
        worse_acc = da < -2 * sea
        worse_nll = dn > 2 * sen
        if ratio >= 1:
            v, why = "not reproduced", f"training FLOPs not lower ({ratio:.3f}x)"
        elif worse_acc or worse_nll:
            v, why = "not reproduced", ("accuracy" if worse_acc else "NLL") + " worse than the baseline by > 2 se"
        else:
            v, why = "reproduced", f"{ratio:.3f}x the training FLOPs; accuracy and NLL not worse beyond 2 se"
        rows.append({"claim": 2, "comparison": f"{LABELS[g]} vs {LABELS['base12']}", "value": ratio, "se": None,
                     "verdict": v, "why": why,
                     "numbers": f"FLOPs {ratio:.3f}x; acc {da:+.3f} ± {sea:.3f}; NLL {dn:+.4f} ± {sen:.4f}"})
    return rows


def repeat_gain(sweep: Dict[str, Any], middle: Sequence[int], r: int = 2) -> Tuple[float, float, float]:
    """(mean gain over middle starts at R=r, its se (per-cell, conservative), best gain over middle starts and R>1)."""
    starts, repeats = sweep["starts"], sweep["repeats"]
    acc, se = sweep["acc_norm"]["mean"], sweep["stderr"]["acc_norm"]
    tasks = sweep["tasks"]
    base = acc[repeats.index(1)][0]
    base_se = math.sqrt(sum(se[t][repeats.index(1)][0] ** 2 for t in tasks)) / len(tasks)
    cols = [starts.index(s) for s in middle if s in starts]
    row = acc[repeats.index(r)]
    gains = [row[j] - base for j in cols if row[j] is not None]
    cell_se = [math.sqrt(sum(se[t][repeats.index(r)][j] ** 2 for t in tasks)) / len(tasks) for j in cols]
    best = max(acc[i][j] - base for i, rr in enumerate(repeats) if rr > 1 for j in cols if acc[i][j] is not None)
    return float(np.mean(gains)), math.sqrt(float(np.mean(cell_se)) ** 2 + base_se ** 2), best


def claim3(runs: Path, m: Dict[str, Dict[str, Any]], middle: Sequence[int]) -> List[Dict[str, Any]]:
    sw = {n: _json(runs / "eval" / f"{n}_s1" / "repeat.json") for n in ("base12",) + GROWN}
    if not sw["base12"]:
        return []
    gb, seb, bestb = repeat_gain(sw["base12"], middle)
    rows = []
    for g in GROWN:
        if not sw.get(g):
            continue
        gg, seg, bestg = repeat_gain(sw[g], middle)
        d, se = gg - gb, math.sqrt(seg ** 2 + seb ** 2)
        v, why = verdict(d, se, 1, not _above_chance(m[g], m["base12"]))
        rows.append({"claim": 3, "comparison": f"{LABELS[g]} vs {LABELS['base12']}: gain from one extra pass of a "
                     f"middle 2-layer block (starts {','.join(map(str, middle))})", "value": d, "se": se,
                     "verdict": v, "why": why,
                     "numbers": f"mean gain R=2 {gg:+.3f} vs {gb:+.3f}; best gain (R=2,3) {bestg:+.3f} vs {bestb:+.3f}"})
    return rows


def _analysis(runs: Path, name: str, kind: str) -> Optional[Dict[str, Any]]:
    return _json(runs / "analysis" / f"{name}_s1" / f"{kind}.json")


def depth_score_se(runs: Path, name: str) -> Tuple[float, float]:
    """Normalised depth score and its bootstrap se over prompts (from the per-prompt output effects)."""
    ds = _analysis(runs, name, "depth_score")
    npz = runs / "analysis" / f"{name}_s1" / "depth_score.npz"
    score = ds["scalars"]["depth_score_normalized"] if "scalars" in ds else ds["depth_score_normalized"]
    arrays = np.load(npz) if npz.is_file() else {}
    per = None
    for key in ("output_effect_per_prompt", "output_per_prompt", "output_effect_prompts"):
        if key in arrays:
            per = np.asarray(arrays[key], dtype=float)
    if per is None or per.ndim != 2:
        return float(score), float("nan")
    k = per.shape[1]
    rng = np.random.default_rng(0)
    boots = []
    for _ in range(1000):
        o = per[rng.integers(0, per.shape[0], per.shape[0])].mean(0)
        boots.append(float((np.arange(k) * o).sum() / o.sum() / max(k - 1, 1)))
    return float(score), float(np.std(boots))


def claim4(runs: Path) -> List[Dict[str, Any]]:
    if not _analysis(runs, "base12", "depth_score"):
        return []
    b, bse = depth_score_se(runs, "base12")
    rows = []
    for n in GROWN + LOOPED:
        if not _analysis(runs, n, "depth_score"):
            continue
        s, sse = depth_score_se(runs, n)
        d, se = s - b, math.sqrt(sse ** 2 + bse ** 2)
        v, why = verdict(d, se, 1) if not math.isnan(se) else ("inconclusive", "no error bar")
        rows.append({"claim": 4, "comparison": f"{LABELS[n]} vs {LABELS['base12']}: normalised depth score",
                     "value": d, "se": se, "verdict": v, "why": why, "numbers": f"{s:.3f} vs {b:.3f}"})
    return rows


def periodicity(x: Sequence[float], period: int, n_perm: int = 2000) -> Tuple[float, float]:
    """Lag-``period`` autocorrelation of the linearly detrended log series, and the sd of the same
    statistic under random permutations of the positions (the null of no periodic structure)."""
    y = np.log(np.asarray(x, dtype=float))
    t = np.arange(len(y))
    y = y - np.polyval(np.polyfit(t, y, 1), t)

    def ac(v):
        v = v - v.mean()
        return float((v[period:] * v[:-period]).sum() / (v * v).sum())

    rng = np.random.default_rng(0)
    null = [ac(y[rng.permutation(len(y))]) for _ in range(n_perm)]
    return ac(y), float(np.std(null))


def _norm_series(runs: Path, name: str, key: str) -> Optional[np.ndarray]:
    npz = runs / "analysis" / f"{name}_s1" / "norms.npz"
    if not npz.is_file():
        return None
    arrays = np.load(npz)
    for k in (f"{key}_mean", key):
        if k in arrays:
            return np.asarray(arrays[k], dtype=float)
    return None


def claim5(runs: Path, period: int) -> List[Dict[str, Any]]:
    rows = []
    base = _norm_series(runs, "base12", "attn_rel")
    if base is None:
        return rows
    b_ac, b_null = periodicity(base, period)
    for n in GROWN + LOOPED:
        s = _norm_series(runs, n, "attn_rel")
        if s is None:
            continue
        ac, null = periodicity(s, period)
        d, se = ac - b_ac, math.sqrt(null ** 2 + b_null ** 2)
        v, why = verdict(d, se, 1)
        rows.append({"claim": 5, "comparison": f"{LABELS[n]} vs {LABELS['base12']}: lag-{period} autocorrelation "
                     "of the attention contribution ||a||/||h|| over depth", "value": d, "se": se,
                     "verdict": v, "why": why,
                     "numbers": f"{ac:+.2f} (null sd {null:.2f}) vs {b_ac:+.2f} (null sd {b_null:.2f})"})
    return rows


def icl_gain(icl: Dict[str, Any], lo: int, hi: int) -> Tuple[float, float]:
    gains, ses = [], []
    for t in icl["tasks"]:
        shots = icl["shots"][t]
        if lo not in shots or hi not in shots:
            continue
        i, j = shots.index(lo), shots.index(hi)
        gains.append(icl["acc_norm"][t][j] - icl["acc_norm"][t][i])
        ses.append(math.hypot(icl["acc_norm_stderr"][t][j], icl["acc_norm_stderr"][t][i]))
    return float(np.mean(gains)), math.sqrt(sum(s * s for s in ses)) / len(ses)


def claim6(runs: Path, m: Dict[str, Dict[str, Any]], lo: int, hi: int) -> List[Dict[str, Any]]:
    base = _json(runs / "eval" / "base12_s1" / "icl.json")
    if not base:
        return []
    gb, seb = icl_gain(base, lo, hi)
    rows = []
    for n in GROWN + LOOPED:
        icl = _json(runs / "eval" / f"{n}_s1" / "icl.json")
        if not icl:
            continue
        g, se = icl_gain(icl, lo, hi)
        d, sed = g - gb, math.hypot(se, seb)
        v, why = verdict(d, sed, 1, not _above_chance(m[n], m["base12"]))
        rows.append({"claim": 6, "comparison": f"{LABELS[n]} vs {LABELS['base12']}: gain from {lo} to {hi} "
                     "in-context examples", "value": d, "se": sed, "verdict": v, "why": why,
                     "numbers": f"{g:+.3f} ± {se:.3f} vs {gb:+.3f} ± {seb:.3f}"})
    return rows


# ------------------------------------------------------------------------------ figures
def plot_icl(runs: Path, names: Sequence[str], out: Path) -> Optional[str]:
    fig, ax = plt.subplots(figsize=(5.5, 4), layout="constrained")
    any_ = False
    for n in names:
        icl = _json(runs / "eval" / f"{n}_s1" / "icl.json")
        if not icl:
            continue
        common = sorted(set.intersection(*(set(icl["shots"][t]) for t in icl["tasks"])))
        ys = [np.mean([icl["acc_norm"][t][icl["shots"][t].index(k)] for t in icl["tasks"]]) for k in common]
        ax.plot(common, ys, "o-", label=LABELS.get(n, n))
        any_ = True
    if not any_:
        plt.close(fig)
        return None
    ax.set_xlabel("in-context examples")
    ax.set_ylabel("acc_norm (mean over tasks)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    path = out / "icl_overlay.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def plot_repeat(runs: Path, names: Sequence[str], out: Path) -> Optional[str]:
    fig, ax = plt.subplots(figsize=(5.5, 4), layout="constrained")
    any_ = False
    for n in names:
        sw = _json(runs / "eval" / f"{n}_s1" / "repeat.json")
        if not sw:
            continue
        acc = sw["acc_norm"]["mean"]
        base = acc[sw["repeats"].index(1)][0]
        for i, r in enumerate(sw["repeats"]):
            if r == 1:
                continue
            ax.plot(sw["starts"], [a - base for a in acc[i]], "o-" if r == 2 else "s--",
                    label=f"{LABELS.get(n, n)} R={r}")
        any_ = True
    if not any_:
        plt.close(fig)
        return None
    ax.axhline(0, color="grey", lw=1)
    ax.set_xlabel("start of the repeated 2-layer block")
    ax.set_ylabel("acc_norm gain over the model (mean over tasks)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    path = out / "repeat_gain.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def _fmt(v: Optional[float], p: int = 3) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{p}f}"


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--tasks", default="copy,va_basic")
    p.add_argument("--models", default=" ".join(LABELS))
    p.add_argument("--middle-starts", default="2,4,6,8")
    p.add_argument("--block-size", type=int, default=2)
    p.add_argument("--icl-shots", default="1,5", help="LO,HI: the in-context gain measured")
    p.add_argument("--sft", default=None, help="claim 7 result JSON, if supervised fine-tuning was run")
    args = p.parse_args(argv)
    from megatron_growloop.eval.primitives import resolve_tasks

    runs, out = Path(args.runs), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tasks = resolve_tasks(args.tasks)
    models = {}
    for n in args.models.split():
        rec = model_record(runs, n, tasks)
        if rec:
            models[n] = rec
    lo, hi = (int(x) for x in args.icl_shots.split(","))
    middle = [int(x) for x in args.middle_starts.split(",")]
    rows = (claim1(models) + claim2(models) + claim3(runs, models, middle) + claim4(runs)
            + claim5(runs, args.block_size) + claim6(runs, models, lo, hi))
    if not args.sft:
        rows.append({"claim": 7, "comparison": "adaptability under supervised fine-tuning (Fig. 8)", "value": None,
                     "se": None, "verdict": "not run", "why": "supervised fine-tuning (issue 15) had not landed",
                     "numbers": ""})
    report = {"tasks": tasks, "models": models, "claims": rows}
    (out / "claims.json").write_text(json.dumps(report, indent=2))
    lines = ["| claim | comparison | numbers | verdict |", "| --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['claim']} | {r['comparison']} | {r['numbers']} | **{r['verdict']}** ({r['why']}) |")
    (out / "claims.md").write_text("\n".join(lines) + "\n")
    mlines = ["| model | seeds | unique params | eff. depth | inference MFLOP/token | training PFLOP | "
              "acc_norm (mean) | " + " | ".join(tasks) + " | held-out NLL |",
              "| --- " * (8 + len(tasks)) + "|"]
    for r in models.values():
        mlines.append(
            f"| {r['label']} | {','.join(map(str, r['seeds']))} | {r['unique_parameters'] / 1e6:.2f} M | "
            f"{r['effective_depth']} | {r['inference_flops_per_token'] / 1e6:.2f} | {r['training_flops'] / 1e15:.3f} | "
            f"{100 * r['acc']:.1f} ± {100 * r['acc_se']:.1f} | "
            + " | ".join(f"{100 * r['per_task'][t]:.1f}" for t in tasks)
            + f" | {_fmt(r.get('nll'))} ± {_fmt(r.get('nll_se'))} |")
    (out / "models.md").write_text("\n".join(mlines) + "\n")
    plot_icl(runs, ("base12",) + GROWN + LOOPED, out)
    plot_repeat(runs, ("base12",) + GROWN, out)
    for n in ("base12",) + GROWN:
        src = runs / "eval" / f"{n}_s1" / "repeat.png"
        if src.is_file():
            shutil.copy(src, out / f"repeat_{n}.png")
    for r in rows:
        print(f"claim {r['claim']}: {r['comparison']}: {r['numbers']} -> {r['verdict']} ({r['why']})")
    return report


if __name__ == "__main__":
    main()
