"""The maths of the analyses (pure functions on tensors / arrays).

Conventions follow Csordás et al. (``RobertCsordas/llm_effective_depth``):

* a layer's *contribution* is ``c_l = out_l - in_l``;
* an intervention acts on a *window* of positions ``[skip_front, t)`` (``future``
  mode: effects are measured at positions ``>= t``, i.e. how much later tokens use
  the layer's work on earlier tokens) or on ``[skip_front, len)`` (``current`` mode:
  measured everywhere); position 0 (attention sink / BOS) is never touched;
* split points ``t`` are drawn from ``8, 16, ...`` up to ``len - 4``.
"""

from __future__ import annotations

import random
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

MODES = ("future", "current")
EPS = 1e-6


# ---------------------------------------------------------------------------- positions
def split_points(length: int, n: int, seed: int, stride: int = 8, margin_end: int = 4) -> List[int]:
    """Up to ``n`` split positions ``t`` for a prompt of ``length`` tokens (Csordás: candidates
    ``stride, 2*stride, ... < length - margin_end``, shuffled, first ``n``).  Short prompts
    fall back to ``t = length // 2``."""
    cands = list(range(stride, length - margin_end, stride))
    if not cands:
        return [max(1, length // 2)] if length >= 3 else []
    rng = random.Random(seed)
    rng.shuffle(cands)
    return sorted(cands[:n])


def window_masks(lengths: Sequence[int], splits: Sequence[Optional[int]], seq_len: int, mode: str,
                 skip_front: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(intervene, measure)`` bool masks ``[rows, seq_len]``; row ``r`` has prompt length
    ``lengths[r]`` and split ``splits[r]`` (ignored in ``current`` mode)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    rows = len(lengths)
    pos = torch.arange(seq_len).unsqueeze(0).expand(rows, seq_len)
    L = torch.as_tensor(list(lengths)).unsqueeze(1)
    valid = pos < L
    front = pos >= skip_front
    if mode == "current":
        return front & valid, valid.clone()
    T = torch.as_tensor([int(t) for t in splits]).unsqueeze(1)
    return front & (pos < T) & valid, (pos >= T) & valid


def sbh_mask(mask_bs: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A ``[b, s]`` mask as ``[s, b, 1]`` on ``like``'s device."""
    return mask_bs.transpose(0, 1).unsqueeze(-1).to(like.device)


# ---------------------------------------------------------------------------- effects
def masked_max(values_bs: torch.Tensor, mask_bs: torch.Tensor) -> torch.Tensor:
    """Per-row max of ``values`` over the masked positions (0 where a row has none)."""
    v = values_bs.masked_fill(~mask_bs, float("-inf")).amax(dim=1)
    return torch.where(torch.isfinite(v), v, torch.zeros_like(v))


def relative_change(new_sbh: torch.Tensor, ref_sbh: torch.Tensor, measure_bs: torch.Tensor) -> torch.Tensor:
    """``max_p ||new(p) - ref(p)|| / max(||ref(p)||, 1e-6)`` per row (norms over hidden)."""
    d = (new_sbh.float() - ref_sbh.float()).norm(dim=-1)
    r = ref_sbh.float().norm(dim=-1).clamp(min=EPS)
    return masked_max((d / r).transpose(0, 1), measure_bs.to(d.device))


def prob_change(new_logits_bsv: torch.Tensor, ref_probs_bsv: torch.Tensor, measure_bs: torch.Tensor) -> torch.Tensor:
    """``max_p ||softmax(new(p)) - ref(p)||_2`` per row (the depth score's output effect)."""
    d = (torch.softmax(new_logits_bsv.float(), dim=-1) - ref_probs_bsv).norm(dim=-1)
    return masked_max(d, measure_bs.to(d.device))


# ---------------------------------------------------------------------------- depth score
def depth_score(effects: Sequence[float]) -> float:
    """Expected layer index (0-based) under the distribution ``m / sum(m)`` (Csordás App. E)."""
    m = np.asarray(effects, dtype=np.float64)
    if m.ndim != 1 or m.size == 0:
        raise ValueError("depth_score needs a non-empty 1-D effect vector")
    if np.any(m < 0):
        raise ValueError("depth_score needs non-negative effects")
    total = m.sum()
    if total <= 0:
        return float("nan")
    return float((np.arange(m.size) * (m / total)).sum())  # normalise first: a one-hot gives exactly k


def layer_effect_vector(matrix: np.ndarray) -> np.ndarray:
    """Csordás' *layer effect* of skipping ``s``: mean of ``E[s, l]`` over the later layers ``l > s``."""
    E = np.asarray(matrix, dtype=np.float64)
    K = E.shape[0]
    out = np.zeros(K)
    for s in range(K):
        later = E[s, s + 1:]
        out[s] = later.sum() / max(K - 1 - s, 1)
    return out


# ---------------------------------------------------------------------------- lens metrics
def kl_div(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """``KL(p || q)`` over the last dimension (log-probabilities in)."""
    return (logp.exp() * (logp - logq)).sum(dim=-1)


def topk_overlap(logits_a: torch.Tensor, logits_b: torch.Tensor, k: int = 5) -> torch.Tensor:
    """``|topk(a) ∩ topk(b)| / k`` per position."""
    ta = logits_a.topk(k, dim=-1).indices
    tb = logits_b.topk(k, dim=-1).indices
    hits = (ta.unsqueeze(-1) == tb.unsqueeze(-2)).any(dim=-1).sum(dim=-1)
    return hits.float() / k
