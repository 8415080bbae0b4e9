"""Fault injection (issue 14): kill -9 at random points of a short run -- at chosen renames and
rmtrees of its saves, at random times, and during the re-save of an existing iteration -- resume
each time with ``--load X --save X``; every loss ever logged equals the uninterrupted run's.

Each seed draws its own sequence of faults; a run that is killed before its first save simply
starts again from scratch (Megatron-LM's auto-resume idiom), a stale lock is taken over.
"""

from __future__ import annotations

import random

import pytest

from conftest import read_metrics
from reliability_util import TINY, run

pytestmark = pytest.mark.slow

PRE = "megatron_growloop.pretrain"
# The LR schedule must not depend on --train-iters (runs of 8 and 10 iterations are compared).
ARGS = TINY + ["--save-interval", "2", "--lr-decay-iters", "12"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    m = tmp_path_factory.mktemp("ref") / "m.jsonl"
    proc = run(PRE, ARGS + ["--train-iters", "10", "--metrics-file", m])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {r["iteration"]: r["loss"] for r in read_metrics(m)}


def _fault(rng: random.Random, save) -> dict:
    kind = rng.choice(["rename", "rmtree", "time"])
    env = {"FAULT_PATH": str(save)}
    if kind == "rename":
        env["FAULT_KILL_AT_RENAME"] = str(rng.randint(1, 14))
    elif kind == "rmtree":
        env["FAULT_KILL_AT_RMTREE"] = str(rng.randint(1, 3))
    else:
        env["FAULT_KILL_AFTER_S"] = f"{rng.uniform(3.0, 9.0):.2f}"
    return env


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kill_minus_9_anywhere_then_resume_gives_the_uninterrupted_losses(reference, tmp_path, seed):
    rng = random.Random(seed)
    save, metrics = tmp_path / "ck", tmp_path / "m.jsonl"
    faults = []

    def attempt(iters, env):
        proc = run(PRE, ARGS + ["--train-iters", str(iters), "--load", save, "--save", save,
                                "--metrics-file", metrics], env_extra=env)
        faults.append((env, proc.returncode))
        assert proc.returncode in (0, -9), (env, proc.stderr[-3000:])
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
        return proc.returncode

    # two random faults during training to 8 iterations, then run until it completes
    for _ in range(2):
        attempt(8, _fault(rng, save))
    while attempt(8, {}) != 0:
        pass
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "8"
    # re-launch the finished job (it re-saves iteration 8) and kill it inside that re-save
    assert attempt(8, {"FAULT_PATH": str(save), "FAULT_KILL_AT_RENAME": str(rng.randint(1, 5))}) == -9, faults
    # ... and continue to 10
    assert attempt(10, {}) == 0, faults
    assert sum(rc == -9 for _, rc in faults) >= 2, faults  # the faults did strike
    logged = [(r["iteration"], r["loss"]) for r in read_metrics(metrics)]
    assert {it for it, _ in logged} == set(range(1, 11)), (logged, faults)
    bad = [(it, loss, reference[it]) for it, loss in logged if loss != reference[it]]
    assert not bad, (bad, faults)
    names = sorted(p.name for p in save.iterdir() if p.name.startswith("iter_"))
    assert names[-1] == "iter_0000010" and not any(n.endswith((".tmp", ".old")) for n in names), names
