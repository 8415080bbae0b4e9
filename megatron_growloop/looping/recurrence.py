"""Randomized recurrence: how many times the recurrent block runs in each training step.

Huginn (Geiping et al. 2025, ``seal-rg/recurrent-pretraining``, ``recpre/model_dynamic.py``
``randomized_iteration_sampler``) and retrofitted recurrence (McLeish et al. 2025,
``LoopedLMs/retrofitting-recurrence``, ``train.py`` ``num_steps_sampler``) train a looped
model with a number of recurrences k drawn afresh for every step, and back-propagate only
through the last n of them.  Both seed a fresh CPU generator from the step number so that
the draw is reproducible on resume ("easiest way to make the sampler re-runnable in
checkpointing").  Here the generator is seeded by ``(seed, iteration)`` and by nothing
rank-dependent, so every rank of a TP/PP/DP job draws the same k.

Distributions (``mean`` m, ``max_repeats`` K):

* ``fixed``: k = m.
* ``uniform``: k uniform on ``{2m - h, ..., h}`` with ``h = min(K, 2m - 1)``; its mean is m.
* ``poisson-lognormal``: ``k = min(K, 1 + Poisson(r))`` with ``r ~ LogNormal(mu, 1/2)`` and
  ``mu = log(m - 1) - 1/8``, so ``E[r] = m - 1`` and ``E[k] = m`` before the cap.  This is the
  heavy-tailed ``poisson-lognormal-filling`` sampler of retrofitting-recurrence (sigma 1/2),
  whose total ``1 + Poisson(r)`` with ``E[r] = m`` has mean m + 1; here the rate is shifted so
  that ``m`` is the mean.  Huginn's sampler draws no cap; K bounds the step time.

Curricula (retrofitting-recurrence ``train.py``: ``mean_recurrence_schedule`` and
``mean_backprop_depth_schedule``, a warm-up of the value with HF's ``warmup_stable_decay``
shapes ``linear`` and ``1-sqrt``): :class:`Ramp` raises the mean k and the backprop depth from
``start`` to their final values over ``warmup_iters`` iterations (there: fractions of training).

:func:`repeats_pmf` is the exact law of the draw (the planner's expected FLOPs and step time,
``megatron_growloop.plan``): uniform and fixed in closed form, poisson-lognormal by
Gauss-Hermite quadrature over the log-normal rate.

Pure functions and frozen records; torch only for its seeded generator.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from ..errors import UsageError

DISTRIBUTIONS = ("fixed", "poisson-lognormal", "uniform")
NEEDS_MEAN = ("poisson-lognormal", "uniform")
WARMUP_STYLES = ("linear", "1-sqrt")
LOGNORMAL_SIGMA = 0.5
DEFAULT_MAX_FACTOR = 4
"""``poisson-lognormal`` without ``--loop-repeats-max`` caps k at 4 x the mean."""


def warmup_factor(progress: float, style: str) -> float:
    """HF ``_get_wsd_scheduler_lambda``'s warm-up factor for ``progress`` in [0, 1]."""
    progress = min(max(progress, 0.0), 1.0)
    if style == "linear":
        return progress
    if style == "1-sqrt":
        return 1.0 - math.sqrt(1.0 - progress)
    raise UsageError(f"unknown warm-up style {style!r}; choose one of: {', '.join(WARMUP_STYLES)}")


@dataclass(frozen=True)
class Ramp:
    """An integer that rises from ``start`` to ``final`` over ``warmup_iters`` iterations."""

    final: int
    start: int = 1
    warmup_iters: int = 0
    style: str = "linear"

    def at(self, iteration: int) -> int:
        if self.warmup_iters <= 0 or iteration >= self.warmup_iters:
            return self.final
        f = warmup_factor(iteration / self.warmup_iters, self.style)
        return min(self.final, math.ceil(self.start + (self.final - self.start) * f))


def step_seed(seed: int, iteration: int) -> int:
    """The generator seed of one step: a function of the run's seed and the iteration only.

    torch's CPU generator (mt19937) keeps only the low 32 bits of a seed, so (seed, iteration)
    is mixed into 32 bits with SplitMix64's finaliser rather than concatenated."""
    z = ((int(seed) & 0xFFFFFFFF) << 32 | (int(iteration) & 0xFFFFFFFF)) + 0x9E3779B97F4A7C15
    z &= 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & 0xFFFFFFFF


def sample_repeats(dist: str, mean: int, max_repeats: int, generator: torch.Generator) -> int:
    """One draw of k from ``dist`` with mean ``mean``, capped at ``max_repeats``."""
    if dist == "fixed":
        return int(mean)
    if dist == "uniform":
        hi = min(int(max_repeats), 2 * int(mean) - 1)
        lo = 2 * int(mean) - hi
        return int(torch.randint(lo, hi + 1, (1,), generator=generator).item())
    if dist == "poisson-lognormal":
        if mean <= 1:
            return 1
        mu = math.log(mean - 1) - LOGNORMAL_SIGMA ** 2 / 2
        rate = torch.zeros(1, dtype=torch.float64).log_normal_(mean=mu, std=LOGNORMAL_SIGMA, generator=generator)
        k = 1 + int(torch.poisson(rate, generator=generator).item())
        return min(k, int(max_repeats))
    raise UsageError(f"unknown --loop-repeats-dist {dist!r}; choose one of: {', '.join(DISTRIBUTIONS)}")


QUADRATURE_NODES = 96


def repeats_pmf(dist: str, mean: int, max_repeats: int) -> Dict[int, float]:
    """``{k: P(k)}`` of :func:`sample_repeats` (probabilities sum to 1).

    poisson-lognormal: ``P(k = j + 1) = E_r[Poisson(j; r)]`` for ``j + 1 < K`` and the rest of the
    mass at the cap K, the expectation over ``r ~ LogNormal(mu, 1/2)`` by probabilists'
    Gauss-Hermite quadrature in ``log r`` (smooth integrand: 96 nodes are exact to ~1e-12)."""
    m, K = int(mean), int(max_repeats)
    if dist == "fixed":
        return {m: 1.0}
    if dist == "uniform":
        hi = min(K, 2 * m - 1)
        lo = 2 * m - hi
        return {k: 1.0 / (hi - lo + 1) for k in range(lo, hi + 1)}
    if dist == "poisson-lognormal":
        if m <= 1 or K <= 1:
            return {1: 1.0}
        z, w = np.polynomial.hermite_e.hermegauss(QUADRATURE_NODES)
        w = w / math.sqrt(2 * math.pi)
        log_r = math.log(m - 1) - LOGNORMAL_SIGMA ** 2 / 2 + LOGNORMAL_SIGMA * z
        pmf: Dict[int, float] = {}
        for j in range(K - 1):  # k = j + 1 < K
            pmf[j + 1] = float(np.sum(w * np.exp(j * log_r - np.exp(log_r) - math.lgamma(j + 1))))
        pmf[K] = max(0.0, 1.0 - sum(pmf.values()))
        return pmf
    raise UsageError(f"unknown --loop-repeats-dist {dist!r}; choose one of: {', '.join(DISTRIBUTIONS)}")


@dataclass(frozen=True)
class RecurrenceSettings:
    """What a training step runs: k from ``dist`` (None: k is not sampled) and the backprop
    depth n (None: full backprop)."""

    dist: Optional[str]
    mean: Ramp
    max_repeats: int
    backprop_depth: Optional[Ramp]
    seed: int

    @property
    def nominal_repeats(self) -> int:
        """The k a checkpoint records and validation runs at: the final mean."""
        return self.mean.final

    def repeats_at(self, iteration: int) -> int:
        """k of the step after ``iteration`` completed iterations (the same on every rank)."""
        if self.dist is None:
            raise ValueError("k is not sampled without a distribution")
        g = torch.Generator(device="cpu")
        g.manual_seed(step_seed(self.seed, iteration))
        return sample_repeats(self.dist, self.mean.at(iteration), self.max_repeats, g)

    def backprop_depth_at(self, iteration: int) -> Optional[int]:
        return None if self.backprop_depth is None else self.backprop_depth.at(iteration)

    @property
    def final_backprop_depth(self) -> Optional[int]:
        return None if self.backprop_depth is None else self.backprop_depth.final

    @property
    def largest_repeats(self) -> int:
        """The largest k a step can run (the cap; the loop's k without a distribution)."""
        return self.max_repeats if self.dist is not None else self.mean.final

    def pmf(self, mean: Optional[int] = None) -> Dict[int, float]:
        """The law of k at mean ``mean`` (default: the final mean); a point mass without a distribution."""
        m = self.mean.final if mean is None else int(mean)
        if self.dist is None:
            return {m: 1.0}
        return repeats_pmf(self.dist, m, self.max_repeats)

    def phases(self, train_iters: int) -> List[Tuple[int, int, Optional[int]]]:
        """``(iterations, mean k, backprop depth)`` of the run's first ``train_iters`` steps, consecutive
        steps with the same values merged (the curricula change them only during their warm-ups)."""
        out: List[Tuple[int, int, Optional[int]]] = []
        ramp = max(self.mean.warmup_iters, self.backprop_depth.warmup_iters if self.backprop_depth else 0)
        for it in range(min(int(train_iters), ramp)):
            key = (self.mean.at(it), self.backprop_depth_at(it))
            if out and out[-1][1:] == key:
                out[-1] = (out[-1][0] + 1, *key)
            else:
                out.append((1, *key))
        rest = int(train_iters) - min(int(train_iters), ramp)
        if rest:
            key = (self.mean.final, self.final_backprop_depth)
            if out and out[-1][1:] == key:
                out[-1] = (out[-1][0] + rest, *key)
            else:
                out.append((rest, *key))
        return out

    def to_meta(self) -> Dict[str, Any]:
        """The ``growloop.json`` record of the distribution."""
        return {
            "dist": self.dist,
            "mean": asdict(self.mean),
            "max": self.max_repeats,
            "backprop_depth": asdict(self.backprop_depth) if self.backprop_depth else None,
            "seed": self.seed,
        }

    def describe(self) -> str:
        parts = []
        if self.dist is not None:
            m = self.mean
            ramp = (f" (mean warm-up {m.start} -> {m.final} over {m.warmup_iters} iterations, {m.style})"
                    if m.warmup_iters else "")
            parts.append(f"loop repeats k ~ {self.dist}(mean {m.final}, max {self.max_repeats}){ramp}, "
                         f"drawn per step from (seed {self.seed}, iteration)")
        if self.backprop_depth is not None:
            n = self.backprop_depth
            ramp = (f" (warm-up {n.start} -> {n.final} over {n.warmup_iters} iterations, {n.style})"
                    if n.warmup_iters else "")
            parts.append(f"gradients through the last {n.final} applications of the recurrent block{ramp}")
        return "; ".join(parts)


def settings_from_flags(
    dist: Optional[str],
    mean: Optional[int],
    max_repeats: Optional[int],
    backprop_depth: Optional[int],
    loop_repeats: int,
    seed: int,
    mean_start: int = 1,
    mean_warmup_iters: int = 0,
    backprop_depth_start: int = 1,
    backprop_depth_warmup_iters: int = 0,
    warmup_style: str = "linear",
) -> Optional[RecurrenceSettings]:
    """Validate the randomized-recurrence flags (one-line :class:`UsageError` each) and build
    the settings; None when none is given.  ``loop_repeats``: the loop's k (the mean of
    ``fixed`` when ``mean`` is not given)."""
    if dist is None:
        for flag, value in (("--loop-repeats-mean", mean), ("--loop-repeats-max", max_repeats),
                            ("--loop-repeats-mean-warmup-iters", mean_warmup_iters or None)):
            if value is not None:
                raise UsageError(f"{flag} needs --loop-repeats-dist {{{','.join(DISTRIBUTIONS)}}}")
        if backprop_depth is None:
            if backprop_depth_warmup_iters:
                raise UsageError("--loop-backprop-depth-warmup-iters needs --loop-backprop-depth N")
            return None
    elif dist not in DISTRIBUTIONS:
        raise UsageError(f"unknown --loop-repeats-dist {dist!r}; choose one of: {', '.join(DISTRIBUTIONS)}")
    if warmup_style not in WARMUP_STYLES:
        raise UsageError(f"unknown --loop-curriculum-style {warmup_style!r}; choose one of: {', '.join(WARMUP_STYLES)}")
    if dist in NEEDS_MEAN and mean is None:
        raise UsageError(f"--loop-repeats-dist {dist} needs --loop-repeats-mean M (the mean number of recurrences)")
    m = int(loop_repeats if mean is None else mean)
    if m < 1:
        raise UsageError(f"--loop-repeats-mean must be >= 1, got {m}")
    if max_repeats is None:
        k_max = {"uniform": 2 * m - 1, "poisson-lognormal": DEFAULT_MAX_FACTOR * m}.get(dist, m)
    else:
        k_max = int(max_repeats)
        if k_max < 1:
            raise UsageError(f"--loop-repeats-max must be >= 1, got {k_max}")
    if m > k_max:
        raise UsageError(f"--loop-repeats-mean {m} exceeds --loop-repeats-max {k_max}")
    if mean_warmup_iters < 0 or backprop_depth_warmup_iters < 0:
        raise UsageError("warm-up iterations must be >= 0")
    if mean_warmup_iters and not 1 <= mean_start <= m:
        raise UsageError(f"--loop-repeats-mean-start {mean_start} must be in 1..--loop-repeats-mean ({m})")
    depth = None
    if backprop_depth is not None:
        if backprop_depth < 1:
            raise UsageError(f"--loop-backprop-depth must be >= 1, got {backprop_depth}")
        if backprop_depth_warmup_iters and not 1 <= backprop_depth_start <= backprop_depth:
            raise UsageError(f"--loop-backprop-depth-start {backprop_depth_start} must be in "
                             f"1..--loop-backprop-depth ({backprop_depth})")
        depth = Ramp(int(backprop_depth), int(backprop_depth_start), int(backprop_depth_warmup_iters), warmup_style)
    return RecurrenceSettings(
        dist=dist,
        mean=Ramp(m, int(mean_start), int(mean_warmup_iters), warmup_style),
        max_repeats=k_max,
        backprop_depth=depth,
        seed=int(seed),
    )


def parse_repeats_list(text: str, flag: str = "--eval-loop-repeats") -> tuple:
    """``1,2,4,8`` -> ``(1, 2, 4, 8)`` (positive, distinct, in the given order)."""
    raw = str(text)
    try:
        values = tuple(int(p) for p in raw.replace(" ", "").split(",") if p)
    except ValueError:
        raise UsageError(f"invalid {flag} {raw!r}: expected comma-separated integers, e.g. 1,2,4,8") from None
    if not values or any(v < 1 for v in values) or len(set(values)) != len(values):
        raise UsageError(f"invalid {flag} {raw!r}: need distinct integers >= 1, e.g. 1,2,4,8")
    return values
