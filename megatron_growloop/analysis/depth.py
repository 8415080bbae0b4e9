"""Depth score (Csordás et al. 2025; paper §4.1, Fig. 2A, App. E).

For every application ``s`` of the effective-depth axis, skip it (its output := its
input) on the intervention window and propagate the change through the rest of the
model.  Measure

* the **output effect** ``O[s] = max_p ||softmax(z'(p)) - softmax(z(p))||_2`` over the
  measured positions (max over the split points ``t`` of a prompt), averaged over
  prompts; the **depth score** is the expected layer index of ``O / sum(O)``;
* the **layer effect** ``E[s, l] = max_p ||c'_l(p) - c_l(p)|| / ||c_l(p)||`` -- how much
  skipping ``s`` changes the update of every application ``l`` (Csordás' "future
  effects" heatmap).

Efficiency: applications before ``s`` are unaffected, so every intervened pass resumes
from the clean input of ``s`` (the clean forward's recorded layer arguments) and the
split points of a prompt run as one batch.  The *null intervention* (no skip, every
application re-run from the embedding) gives the noise floor reported with the numbers.
"""

from __future__ import annotations

from typing import Dict, List

import numpy as np
import torch

from ..errors import UsageError
from . import measures
from .access import AnalysisModel
from .prompts import PromptSet
from .results import Result, draw_structure, mpl


class DepthScoreResult(Result):
    kind = "depth_score"

    @property
    def depth_score(self) -> float:
        return float(self.scalars["depth_score"])

    def plot(self, path: str) -> str:
        plt = mpl()
        O = np.asarray(self.arrays["output_effect"], dtype=float)
        E = np.asarray(self.arrays["layer_effect_max"], dtype=float)
        K = O.size
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), gridspec_kw={"width_ratios": [1, 1.15]})
        ax = axes[0]
        dist = O / O.sum() if O.sum() > 0 else O
        ax.bar(np.arange(K), dist, color="tab:blue")
        ds = self.scalars.get("depth_score")
        if ds is not None:
            ax.axvline(ds, color="tab:orange", lw=2, label=f"depth score {ds:.2f} ({ds / max(K - 1, 1):.2f} of depth)")
            ax.legend(fontsize=8, loc="upper left")
        draw_structure(ax, self.model)
        ax.set_xlabel("skipped application (effective depth)")
        ax.set_ylabel("output effect (normalised)")
        ax.set_xlim(-0.7, K - 0.3)
        ax = axes[1]
        im = ax.imshow(E, vmin=0, vmax=1, cmap="viridis", interpolation="nearest", aspect="auto")
        draw_structure(ax, self.model, "x")
        draw_structure(ax, self.model, "y")
        ax.set_xlabel("effect @ application")
        ax.set_ylabel("application skipped")
        fig.colorbar(im, ax=ax, label="relative change (max)")
        nf = self.scalars.get("noise_floor", {})
        fig.suptitle(f"Depth score, {self.config.get('mode')} mode -- {self.title}\n"
                     f"null-intervention noise floor: output {nf.get('output', 0):.1e}, layer {nf.get('layer', 0):.1e}",
                     fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


def _rows(lengths: List[int], indices: List[int], mode: str, num_splits: int, seed: int):
    """Expanded rows (source row, split point) of a batch."""
    src, splits = [], []
    for r, (L, idx) in enumerate(zip(lengths, indices)):
        ts = measures.split_points(L, num_splits, seed + idx) if mode == "future" else [None]
        for t in ts:
            src.append(r)
            splits.append(t)
    return src, splits


def _per_prompt_max(values: torch.Tensor, src: List[int], nrows: int) -> torch.Tensor:
    out = torch.zeros(nrows, *values.shape[1:], dtype=torch.float64)
    for i, r in enumerate(src):
        out[r] = torch.maximum(out[r], values[i].double().cpu())
    return out


@torch.no_grad()
def depth_score(am: AnalysisModel, prompts: PromptSet, mode: str = "future", num_splits: int = 4,
                seed: int = 123, batch_size: int = 2, skip_front: int = 1, log=None) -> DepthScoreResult:
    """Skip every application in turn; output effect, layer effects and the depth score."""
    if mode not in measures.MODES:

        raise UsageError(f"--mode {mode!r}: choose future or current")
    K = am.depth
    O_rows: List[torch.Tensor] = []  # per prompt [K]
    E_rows: List[torch.Tensor] = []  # per prompt [K, K]
    null_out, null_layer = 0.0, 0.0
    pad = 0
    for tokens, lengths, indices in prompts.batches(batch_size, pad):
        S = tokens.shape[1]
        tr = am.trace(tokens, keep_kwargs=True)
        src, splits = _rows(lengths, indices, mode, num_splits, seed)
        if not src:
            continue
        sel = torch.as_tensor(src, device=tr.outputs[0].device)
        intervene, measure = measures.window_masks([lengths[r] for r in src], splits, S, mode, skip_front)
        # only positions some row measures need logits (future mode: p >= min t)
        p0 = int(measure.any(dim=0).nonzero().min()) if bool(measure.any()) else 0
        measure_out = measure[:, p0:]
        ref_probs = torch.softmax(tr.logits[:, p0:], dim=-1)[sel]
        contrib = [tr.contribution(k)[:, sel] for k in range(K)]

        def ex(x):
            return x[:, sel]

        # null intervention: every application re-run, nothing changed
        nl = torch.zeros(len(src))

        def on_null(k, inp, out):
            nonlocal nl
            nl = torch.maximum(nl, measures.relative_change(out - inp, contrib[k], measure).cpu())

        final = am.resume(tr, 0, ex(tr.inputs[0]), on_null)
        null_out = max(null_out, float(measures.prob_change(am.decode(final[p0:]), ref_probs, measure_out).max()))
        null_layer = max(null_layer, float(nl.max()))

        O = torch.zeros(len(src), K)
        E = torch.zeros(len(src), K, K)
        for s in range(K):
            m = measures.sbh_mask(intervene, tr.inputs[s])
            h_in = ex(tr.inputs[s])
            h_out = torch.where(m, h_in, ex(tr.outputs[s]))
            E[:, s, s] = measures.relative_change(h_out - h_in, contrib[s], measure).cpu()

            def on_out(k, inp, out, s=s):
                E[:, s, k] = measures.relative_change(out - inp, contrib[k], measure).cpu()

            final = am.resume(tr, s + 1, h_out, on_out)
            O[:, s] = measures.prob_change(am.decode(final[p0:]), ref_probs, measure_out).cpu()
        O_rows.append(_per_prompt_max(O, src, len(lengths)))
        E_rows.append(_per_prompt_max(E, src, len(lengths)))
        if log:
            log(f"depth-score: {sum(len(x) for x in O_rows)}/{len(prompts)} prompts")
    O_all = torch.cat(O_rows).numpy()
    E_all = torch.cat(E_rows).numpy()
    O_mean = O_all.mean(axis=0)
    E_mean = E_all.mean(axis=0)
    ds = measures.depth_score(O_mean)
    ds_layer = measures.depth_score(measures.layer_effect_vector(E_mean))
    scalars: Dict = {
        "depth_score": ds,
        "depth_score_normalized": ds / max(K - 1, 1),
        "depth_score_max_over_prompts": measures.depth_score(O_all.max(axis=0)),
        "depth_score_layer_effect": ds_layer,
        "noise_floor": {"output": null_out, "layer": null_layer},
        "num_prompts": int(O_all.shape[0]),
    }
    return DepthScoreResult(
        model=am.describe(),
        config={"mode": mode, "num_splits": num_splits, "seed": seed, "skip_front": skip_front,
                "prompts": prompts.describe(), "dtype": str(am.dtype),
                "definition": "O[s] = max over measured positions (and split points) of the L2 change of the "
                              "softmaxed output when application s is skipped; mean over prompts; depth score = "
                              "sum_s s*O[s]/sum_s O[s] (0-based)"},
        arrays={"output_effect": O_mean, "output_effect_max": O_all.max(axis=0), "output_effect_per_prompt": O_all,
                "layer_effect_mean": E_mean, "layer_effect_max": E_all.max(axis=0)},
        scalars=scalars,
    )
