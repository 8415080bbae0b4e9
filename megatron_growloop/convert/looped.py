"""Looped models in Hugging Face form (pure).

HF has no looped Llama, so a looped model exports as its *unrolled* Llama: HF layer
``p`` is a copy of unique layer ``schedule[p]``.  The loop is recorded in
``config.json`` under ``"megatron_growloop"``::

    {"format_version": 1, "loop": "1-2x3-1", "num_unique_layers": 4,
     "schedule": [0, 1, 2, 1, 2, 1, 2, 3]}

Re-import restores the tied (looped) model only when the schedule is the loop's and
every repeated copy is bitwise identical to the first (an unrolled model that was
fine-tuned in HF no longer is a loop; it can be imported as an ordinary model).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

from ..errors import UsageError
from ..looping.spec import LoopSpec, build_schedule

FORMAT_VERSION = 1


def loop_entry(loop: Optional[str], num_unique_layers: int, schedule: Sequence[int]) -> Optional[Dict[str, Any]]:
    """The config.json record for an export with ``schedule``; None for an ordinary model."""
    schedule = [int(i) for i in schedule]
    if schedule == list(range(num_unique_layers)):
        return None
    return {
        "format_version": FORMAT_VERSION,
        "loop": loop,
        "num_unique_layers": int(num_unique_layers),
        "schedule": schedule,
    }


def restore_plan(entry: Dict[str, Any], num_hidden_layers: int) -> Dict[str, Any]:
    """Validate a config.json loop record; return ``{"loop", "num_unique_layers", "schedule",
    "first_position"}`` where ``first_position[u]`` is the HF layer holding unique layer u."""
    if not isinstance(entry, dict) or entry.get("format_version") != FORMAT_VERSION:
        raise UsageError(
            f"config.json: unknown 'megatron_growloop' record (format_version {entry.get('format_version') if isinstance(entry, dict) else '?'}); "
            "pass --ignore-loop to import the layers as an ordinary model"
        )
    loop, n = entry.get("loop"), entry.get("num_unique_layers")
    schedule = entry.get("schedule")
    if not isinstance(n, int) or not isinstance(schedule, list) or len(schedule) != num_hidden_layers:
        raise UsageError(
            f"config.json: the 'megatron_growloop' schedule does not match num_hidden_layers {num_hidden_layers}; "
            "pass --ignore-loop to import the layers as an ordinary model"
        )
    if not loop:
        raise UsageError(
            "config.json: the export repeats blocks without a loop (an inference-time --repeat-block); it cannot be "
            "restored as a looped model; pass --ignore-loop to import the unrolled layers as an ordinary model"
        )
    spec = LoopSpec.parse(loop)
    if build_schedule(n, spec) != [int(i) for i in schedule]:
        raise UsageError(
            f"config.json: the recorded schedule is not that of loop {loop}; pass --ignore-loop to import the "
            "unrolled layers as an ordinary model"
        )
    first: List[int] = []
    for u in range(n):
        first.append(schedule.index(u))
    return {"loop": str(spec), "num_unique_layers": n, "schedule": [int(i) for i in schedule], "first_position": first}


def repeated_positions(schedule: Sequence[int]) -> Dict[int, List[int]]:
    """Unique layer -> every HF position holding a copy of it."""
    out: Dict[int, List[int]] = {}
    for p, u in enumerate(schedule):
        out.setdefault(int(u), []).append(p)
    return out
