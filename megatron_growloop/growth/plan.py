"""PROP-alpha stage budgets (Saunshi et al. 2024; paper App. A) and the growth plan.

With ``k`` stages and ``T`` growth-phase iterations, stage ``i`` (1-based) trains for
``T_i = i^alpha / sum_j j^alpha * T`` iterations, rounded by the largest-remainder
method so that the integers still sum to ``T``.  Growth step ``i`` happens at the
end of stage ``i`` (``i = 1..k-1``); stage ``k`` is the first at full depth, and
training continues at full depth after ``T`` (e.g. the WSD cooldown).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List

from ..errors import UsageError
from .operators import growth_maps


def prop_budgets(num_stages: int, total_iters: int, alpha: float = 1.0) -> List[int]:
    if num_stages < 1:
        raise UsageError(f"number of growth stages must be >= 1, got {num_stages}")
    weights = [(i + 1) ** alpha for i in range(num_stages)]
    total_w = sum(weights)
    exact = [w / total_w * total_iters for w in weights]
    floors = [int(x) for x in exact]
    rest = total_iters - sum(floors)
    # largest remainders first; ties go to later (deeper) stages
    order = sorted(range(num_stages), key=lambda i: (exact[i] - floors[i], i), reverse=True)
    for i in order[:rest]:
        floors[i] += 1
    if min(floors) < 1:
        raise UsageError(
            f"--grow-iters {total_iters} is too small for {num_stages} growth stages with "
            f"PROP-{alpha:g}: stage budgets would be {floors} (every stage needs >= 1 iteration)"
        )
    return floors


@dataclass(frozen=True)
class GrowthPlan:
    """When and how a run grows: the method, the depths, the PROP-alpha stage budgets and the
    source map of every growth step."""

    method: str
    block_size: int
    start_depth: int
    final_depth: int
    grow_iters: int
    alpha: float = 1.0
    budgets: List[int] = field(default_factory=list)
    growth_iterations: List[int] = field(default_factory=list)
    maps: List[List[int]] = field(default_factory=list)

    @classmethod
    def build(cls, method: str, block_size: int, start_depth: int, final_depth: int,
              grow_iters: int, alpha: float = 1.0) -> "GrowthPlan":
        maps = growth_maps(method, start_depth, final_depth, block_size)
        budgets = prop_budgets(len(maps) + 1, grow_iters, alpha)
        its, acc = [], 0
        for b in budgets[:-1]:
            acc += b
            its.append(acc)
        return cls(method, block_size, start_depth, final_depth, grow_iters, alpha, budgets, its, maps)

    # The fields the checkpoint's ``growloop.json["growth"]`` record holds.
    RECORDED = ("method", "block_size", "start_depth", "final_depth", "grow_iters", "alpha", "budgets",
                "growth_iterations")

    def to_meta(self) -> Dict[str, Any]:
        """The ``growloop.json["growth"]`` record (the maps follow from it)."""
        return {name: getattr(self, name) for name in self.RECORDED}

    @classmethod
    def from_meta(cls, record: Dict[str, Any]) -> "GrowthPlan":
        return cls.build(record["method"], record["block_size"], record["start_depth"], record["final_depth"],
                         record["grow_iters"], record.get("alpha", 1.0))

    @property
    def num_stages(self) -> int:
        return len(self.budgets)

    def depth_at(self, iteration: int) -> int:
        """Depth used for the training step that starts at ``iteration`` (0-based count of steps done)."""
        grown = sum(1 for it in self.growth_iterations if it <= iteration)
        return self.start_depth + grown * self.block_size

    def steps_due(self, iteration: int, current_depth: int) -> List[int]:
        """Indices (0-based) of growth steps that must run before the step at ``iteration``."""
        done = (current_depth - self.start_depth) // self.block_size
        target = sum(1 for it in self.growth_iterations if it <= iteration)
        return list(range(done, target))

    @property
    def stage_depths(self) -> List[int]:
        return [self.start_depth + i * self.block_size for i in range(self.num_stages)]

    def depth_ratio(self) -> float:
        """Layer applications of the growth phase relative to training it at the final depth."""
        return sum(b * d for b, d in zip(self.budgets, self.stage_depths)) / (self.grow_iters * self.final_depth)

    def describe(self) -> str:
        stages = ", ".join(f"{d} layers x {b} it" for d, b in zip(self.stage_depths, self.budgets))
        return (f"growth {self.method} B={self.block_size} PROP-{self.alpha:g} over {self.grow_iters} "
                f"iterations: {stages}; grows after iterations {self.growth_iterations}; "
                f"depth-proportional training compute of the growth phase: {self.depth_ratio():.4f} x "
                f"a {self.final_depth}-layer model")
