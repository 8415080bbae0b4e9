"""Future local effects (paper §4.1, Fig. 4 and 13, App. E; Csordás ``analyze_future_local_effects``).

For a source application ``s`` and a later application ``l > s``: remove ``s``'s
contribution ``c_s = out_s - in_s`` from the residual fed into ``l`` (on the
intervention window), with every other input of ``l`` clean and nothing propagated,
and measure the relative change of ``l``'s own update at the measured positions:

``M[s, l] = max_p ||c'_l(p) - c_l(p)|| / max(||c_l(p)||, 1e-6)``,

max over the split points of a prompt, then max over prompts (the paper's heatmap;
the mean over prompts is stored too).  ``M`` is strictly upper-triangular by
construction (``l <= s`` is never intervened).  In ``future`` mode (default) the
window is ``[1, t)`` and the measured positions ``>= t``, so the effect reaches ``l``
only through attention to earlier tokens.

Each ``(s, l)`` pair re-runs only application ``l`` (megatron-core's layer forward with
the clean pass's recorded arguments), all sources of one target in one batch.  The
null intervention (``l`` re-run on its clean input) gives the noise floor.
"""

from __future__ import annotations

from typing import List

import numpy as np
import torch

from ..errors import UsageError
from . import measures
from .access import AnalysisModel
from .depth import _per_prompt_max, _rows
from .prompts import PromptSet
from .results import Result, draw_structure, mpl


class LocalEffectsResult(Result):
    kind = "local_effects"

    def plot(self, path: str) -> str:
        plt = mpl()
        M = np.asarray(self.arrays["effect_max"], dtype=float)
        K = M.shape[0]
        fig, ax = plt.subplots(figsize=(5.2 + 0.08 * K, 4.2 + 0.06 * K))
        shown = np.where(np.triu(np.ones_like(M, dtype=bool), 1), M, np.nan)
        im = ax.imshow(shown, vmin=0, vmax=1, cmap="viridis", interpolation="nearest")
        draw_structure(ax, self.model, "x")
        draw_structure(ax, self.model, "y")
        ax.set_xlabel("effect @ application l (effective depth)")
        ax.set_ylabel("removed contribution of application s")
        fig.colorbar(im, ax=ax, label="relative change of l's update (max; clipped at 1)", shrink=0.85)
        nf = self.scalars.get("noise_floor", 0.0)
        ax.set_title(f"Future local effects ({self.config.get('mode')} mode) -- {self.title}\n"
                     f"null-intervention noise floor {nf:.1e}", fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


@torch.no_grad()
def local_effects(am: AnalysisModel, prompts: PromptSet, mode: str = "future", num_splits: int = 4, seed: int = 123,
                  batch_size: int = 2, skip_front: int = 1, max_rows: int = 64, log=None) -> LocalEffectsResult:
    """The source x target matrix of local (non-propagated) effects."""
    if mode not in measures.MODES:

        raise UsageError(f"--mode {mode!r}: choose future or current")
    K = am.depth
    per_prompt: List[torch.Tensor] = []
    noise = 0.0
    for tokens, lengths, indices in prompts.batches(batch_size):
        S = tokens.shape[1]
        tr = am.trace(tokens, keep_kwargs=True, logits=False)
        src, splits = _rows(lengths, indices, mode, num_splits, seed)
        if not src:
            continue
        R = len(src)
        sel = torch.as_tensor(src, device=tr.outputs[0].device)
        intervene, measure = measures.window_masks([lengths[r] for r in src], splits, S, mode, skip_front)
        contrib = [tr.contribution(k)[:, sel] for k in range(K)]
        M = torch.zeros(R, K, K)
        chunk = max(1, max_rows // R)
        for l in range(1, K):
            h_l = tr.inputs[l][:, sel]
            m = measures.sbh_mask(intervene, h_l)
            null = am.run_layer(l, tr.kwargs[l], h_l)
            noise = max(noise, float(measures.relative_change(null - h_l, contrib[l], measure).max()))
            for c0 in range(0, l, chunk):
                sources = list(range(c0, min(l, c0 + chunk)))
                h = torch.cat([h_l - m * contrib[s] for s in sources], dim=1)
                out = am.run_layer(l, tr.kwargs[l], h)
                upd = out - h
                for j, s in enumerate(sources):
                    M[:, s, l] = measures.relative_change(upd[:, j * R:(j + 1) * R], contrib[l], measure).cpu()
        per_prompt.append(_per_prompt_max(M, src, len(lengths)))
        if log:
            log(f"local-effects: {sum(len(x) for x in per_prompt)}/{len(prompts)} prompts")
    allp = torch.cat(per_prompt).numpy()
    effect_max = allp.max(axis=0)
    return LocalEffectsResult(
        model=am.describe(),
        config={"mode": mode, "num_splits": num_splits, "seed": seed, "skip_front": skip_front,
                "prompts": prompts.describe(), "dtype": str(am.dtype),
                "definition": "M[s,l] = max over measured positions of ||c'_l - c_l|| / ||c_l|| when c_s is removed "
                              "from l's input only (no propagation); max over split points and prompts"},
        arrays={"effect_max": effect_max, "effect_mean": allp.mean(axis=0)},
        scalars={"noise_floor": noise, "num_prompts": int(allp.shape[0]),
                 "column_mean": [float(x) for x in _column_means(effect_max)]},
    )


def _column_means(M: np.ndarray) -> np.ndarray:
    """Mean effect on target ``l`` over its sources ``s < l`` (how "aggregating" ``l`` is)."""
    K = M.shape[0]
    return np.array([M[:l, l].mean() if l > 0 else 0.0 for l in range(K)])
