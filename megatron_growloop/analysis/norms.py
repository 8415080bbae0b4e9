"""Residual-stream norms and sublayer contributions (paper Fig. 3 and 14; Csordás ``analyze_norms``).

Per application ``k`` with input residual ``h``, attention output ``a`` and MLP output
``m`` (sublayer outputs before they are added to the residual; ``h + a + m`` is the
application's output), over all real tokens of all prompts (mean and max):

* ``resid``: ``||h||``; ``attn``: ``||a||``; ``mlp``: ``||m||``; ``out``: ``||h + a + m||``;
* ``attn_rel``: ``||a|| / ||h||`` (the paper's attention-sublayer contribution, Fig. 3);
* ``mlp_rel``: ``||m|| / ||h + a||`` (relative to the residual the MLP reads, as Csordás);
  ``mlp_rel_in``: ``||m|| / ||h||``;
* ``layer_rel``: ``||a + m|| / ||h||`` (Fig. 14, "relative layer contribution");
* ``out_over_in``: ``||h + a + m|| / ||h||``;
* cosines ``cos(a, h)``, ``cos(m, h + a)``, ``cos(a + m, h)``.

Denominators are clamped at 1e-6; norms are taken in float32.
"""

from __future__ import annotations

from typing import Dict

import numpy as np
import torch

from .access import AnalysisModel, seq_mask
from .prompts import PromptSet
from .results import Result, draw_structure, mpl

EPS = 1e-6
QUANTITIES = ("resid", "attn", "mlp", "out", "attn_rel", "mlp_rel", "mlp_rel_in", "layer_rel", "out_over_in",
              "cos_attn_resid", "cos_mlp_mid", "cos_layer_resid")


class NormsResult(Result):
    kind = "norms"

    def plot(self, path: str) -> str:
        plt = mpl()
        A = self.arrays
        K = len(A["resid_mean"])
        x = np.arange(K)
        panels = [("resid", "residual norm ||h||"), ("attn_rel", "attention ||a|| / ||h||"),
                  ("mlp_rel", "MLP ||m|| / ||h+a||"), ("layer_rel", "layer ||a+m|| / ||h||")]
        fig, axes = plt.subplots(1, 4, figsize=(15, 3.3))
        for ax, (q, title) in zip(axes, panels):
            ax.plot(x, A[f"{q}_mean"], marker="o", ms=3, label="mean")
            ax.plot(x, A[f"{q}_max"], color="tab:blue", alpha=0.35, lw=1, label="max")
            ax.set_yscale("log")  # ratios span orders of magnitude (massive activations, the first layer)
            draw_structure(ax, self.model)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("application (effective depth)", fontsize=8)
            ax.set_xlim(-0.5, K - 0.5)
        axes[0].legend(fontsize=7)
        fig.suptitle(f"Residual stream and sublayer contributions -- {self.title}", fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp(min=EPS)


@torch.no_grad()
def residual_norms(am: AnalysisModel, prompts: PromptSet, batch_size: int = 4, exclude_first: bool = False,
                   log=None) -> NormsResult:
    """Per-application norms and relative sublayer contributions (see the module docstring)."""
    K = am.depth
    sums: Dict[str, torch.Tensor] = {q: torch.zeros(K, dtype=torch.float64) for q in QUANTITIES}
    maxs: Dict[str, torch.Tensor] = {q: torch.full((K,), float("-inf"), dtype=torch.float64) for q in QUANTITIES}
    count = 0
    final_sum, final_max = 0.0, float("-inf")
    for tokens, lengths, _ in prompts.batches(batch_size):
        tr = am.trace(tokens, sublayers=True, logits=False)
        mask = seq_mask(lengths, tokens.shape[1]).transpose(0, 1).to(tr.outputs[0].device)  # [s, b]
        if exclude_first:
            mask[0] = False
        n = int(mask.sum())
        count += n
        for k in range(K):
            h, a, m = tr.inputs[k].float(), tr.attn[k].float(), tr.mlp[k].float()
            o = tr.outputs[k].float()
            hn = h.norm(dim=-1)
            vals = {
                "resid": hn, "attn": a.norm(dim=-1), "mlp": m.norm(dim=-1), "out": o.norm(dim=-1),
                "attn_rel": a.norm(dim=-1) / hn.clamp(min=EPS),
                "mlp_rel": m.norm(dim=-1) / (h + a).norm(dim=-1).clamp(min=EPS),
                "mlp_rel_in": m.norm(dim=-1) / hn.clamp(min=EPS),
                "layer_rel": (a + m).norm(dim=-1) / hn.clamp(min=EPS),
                "out_over_in": o.norm(dim=-1) / hn.clamp(min=EPS),
                "cos_attn_resid": _cos(a, h), "cos_mlp_mid": _cos(m, h + a), "cos_layer_resid": _cos(a + m, h),
            }
            for q, v in vals.items():
                sel = v[mask]
                sums[q][k] += float(sel.double().sum())
                maxs[q][k] = max(float(maxs[q][k]), float(sel.max()) if sel.numel() else float("-inf"))
        fin = tr.outputs[-1].float().norm(dim=-1)[mask]
        final_sum += float(fin.double().sum())
        final_max = max(final_max, float(fin.max()))
        if log:
            log(f"norms: batch of {len(lengths)} prompts done")
    arrays = {}
    for q in QUANTITIES:
        arrays[f"{q}_mean"] = (sums[q] / max(count, 1)).numpy()
        arrays[f"{q}_max"] = maxs[q].numpy()
    return NormsResult(
        model=am.describe(),
        config={"prompts": prompts.describe(), "exclude_first": exclude_first, "dtype": str(am.dtype),
                "tokens": count},
        arrays=arrays,
        scalars={"final_resid_mean": final_sum / max(count, 1), "final_resid_max": final_max,
                 "resid_growth": float(arrays["out_mean"][-1] / max(arrays["resid_mean"][0], EPS))},
    )
