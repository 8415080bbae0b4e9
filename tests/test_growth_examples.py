"""The growth example scripts pass valid flags and grow when the docs say they do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SHIM = """#!/usr/bin/env bash
# records the launcher's arguments instead of training
printf '%s\\n' "$@" > "$SHIM_OUT"
"""


def _launch_args(script: str, tmp_path, env_extra=None):
    shim = tmp_path / "bin"
    shim.mkdir()
    for name in ("torchrun", "python"):
        (shim / name).write_text(SHIM)
        (shim / name).chmod(0o755)
    out = tmp_path / "args.txt"
    env = {**os.environ, "PATH": f"{shim}:{os.environ['PATH']}", "SHIM_OUT": str(out),
           "SAVE": str(tmp_path / "save"), **(env_extra or {})}
    subprocess.run(["bash", str(ROOT / "examples" / script)], env=env, check=True, timeout=60)
    argv = out.read_text().splitlines()
    return argv[argv.index("megatron_growloop.pretrain") + 1:]


@pytest.mark.parametrize("script,world,final,k,growth_its", [
    ("grow_lidas_360m.sh", 8, 32, 8, [4722, 14166, 28333, 47222, 70833, 99166, 132222]),
    ("grow_lidas_1.7b.sh", 8, 24, 6, [8095, 24286, 48572, 80953, 121429]),
    ("grow_cpu_tiny.sh", 1, 12, 3, [40, 120]),
])
def test_example_flags(tmp_path, script, world, final, k, growth_its):
    """Invariant: each example's flags parse; it grows with LIDAS B=4 from 4 layers to the paper's
    depth in k stages at the iterations its header states, all before the WSD cooldown starts
    (cooldown data from that iteration on), and the LR warmup ends before the first growth."""
    from megatron_growloop.growth.cli import plan_from_args
    from megatron_growloop.pretrain import parse_pretrain_args

    env = {"DATA": "/data/corpus_text_document", "MATH": "/data/math_text_document"}
    argv = _launch_args(script, tmp_path, env)
    args = parse_pretrain_args(argv, world_size=world).args
    plan = plan_from_args(args)
    assert (plan.method, plan.block_size, plan.start_depth, plan.final_depth) == ("lidas", 4, 4, final)
    assert plan.num_stages == k and plan.growth_iterations == growth_its
    assert ", ".join(map(str, growth_its)) in (ROOT / "examples" / script).read_text().replace(" and ", ", ")
    cooldown_start = args.lr_decay_iters - args.lr_wsd_decay_iters
    assert args.lr_decay_style == "WSD" and cooldown_start == plan.grow_iters
    assert args.lr_warmup_iters < growth_its[0]
    if script != "grow_cpu_tiny.sh":
        assert args.train_iters == 200_000 and plan.grow_iters == 170_000
        assert args.cooldown_data_path and args.cooldown_start_iter == 170_000
