"""The layout planner: exact parameters, memory per rank (weights, gradients, optimizer states,
activations of plain, looped and growing models), growth-step peaks, FLOPs and step time of a
run -- by counting, before a GPU is booked.  ``python -m megatron_growloop.plan --help``."""

from .inputs import Cluster, RunSetup
from .planner import Plan, plan_run

__all__ = ["Cluster", "RunSetup", "Plan", "plan_run"]
