"""``examples/reproduce_cpu.sh`` argument flow, stage selection and resume, as a dry run.

Invariants: ``DRY_RUN=1`` runs nothing and prints every heavy command with its log; the
design knobs (``ITERS``, width, corpus weights, evaluation seed) reach the commands that
use them, with the WSD cooldown, the growth budget and the retrofit branch point derived
from ``ITERS``; ``STEPS`` selects stages; a model whose final checkpoint exists is not
retrained and a result file that exists is not recomputed; a retrofit branches from its
parent's checkpoint at the cooldown start; bad ``STEPS``/``MODELS`` stop before anything runs.
No model is trained here (the script's real runs are in docs/reproduction.md).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "reproduce_cpu.sh"


def _dry(tmp_path: Path, **env) -> subprocess.CompletedProcess:
    full = dict(os.environ, RUNS=str(tmp_path / "runs"), OUT=str(tmp_path / "out"), DRY_RUN="1", **env)
    return subprocess.run(["bash", str(SCRIPT)], env=full, capture_output=True, text=True, timeout=60)


def _commands(out: str, module: str):
    return [line for line in out.splitlines() if line.startswith("run: ") and module in line]


def _flag(cmd: str, name: str) -> str:
    parts = cmd.split()
    return parts[parts.index(name) + 1]


def _finish(runs: Path, name: str, iters: int, seed: int = 1) -> Path:
    d = runs / "models" / f"{name}_s{seed}"
    d.mkdir(parents=True)
    (d / "latest_checkpointed_iteration.txt").write_text(str(iters))
    return d


def test_design_knobs_reach_the_training_commands(tmp_path):
    p = _dry(tmp_path, STEPS="corpus train", MODELS="base12 lidas loop2x6 lidas_retro", ITERS="200",
             HIDDEN="96", KV_GROUPS="1", WEIGHTS="copy_random=1,va=1", EVAL_SEED="7")
    assert p.returncode == 0, p.stderr
    (corpus,) = _commands(p.stdout, "megatron_growloop.eval corpus")
    assert _flag(corpus, "--weights") == "copy_random=1,va=1"
    assert _flag(corpus, "--heldout-seeds") == "7,2,3" and _flag(corpus, "--heldout-tasks") == "copy,va_basic"
    train = {_flag(c, "--save").rsplit("/", 1)[1]: c for c in _commands(p.stdout, "megatron_growloop.pretrain")}
    assert list(train) == ["base12_s1", "lidas_s1", "loop2x6_s1", "lidas_retro_s1"]
    for cmd in train.values():
        assert _flag(cmd, "--train-iters") == "200" and _flag(cmd, "--hidden-size") == "96"
        assert _flag(cmd, "--num-query-groups") == "1"  # not bash's $GROUPS
        assert _flag(cmd, "--lr-wsd-decay-iters") == "30"  # the last 15 %
        assert Path(_flag(cmd, "--tokenizer-model")).is_absolute()
    assert _flag(train["base12_s1"], "--num-layers") == "12"
    assert _flag(train["lidas_s1"], "--grow-iters") == "170" and _flag(train["lidas_s1"], "--num-layers") == "2"
    assert _flag(train["loop2x6_s1"], "--loop") == "2x6"
    # the retrofit branches from its parent at the cooldown start and loops a middle block
    assert _flag(train["lidas_retro_s1"], "--load").endswith("models/lidas_s1/iter_0000170")
    assert _flag(train["lidas_retro_s1"], "--retrofit-loop") == "4:6:2"
    assert not (tmp_path / "runs" / "corpus").exists() and not list((tmp_path / "runs" / "logs").iterdir())


def test_finished_models_and_results_are_kept(tmp_path):
    runs = tmp_path / "runs"
    _finish(runs, "base12", 600)
    _finish(runs, "lidas", 300)  # interrupted: resumes from its own checkpoint
    (runs / "eval" / "base12_s1").mkdir(parents=True)
    (runs / "eval" / "base12_s1" / "primitives.json").write_text("{}")
    p = _dry(tmp_path, STEPS="train eval", MODELS="base12 lidas")
    assert p.returncode == 0, p.stderr
    train = _commands(p.stdout, "megatron_growloop.pretrain")
    assert len(train) == 1 and _flag(train[0], "--load") == str(runs / "models" / "lidas_s1")
    assert f"trained: {runs / 'models' / 'base12_s1'}" in p.stdout
    evals = _commands(p.stdout, "megatron_growloop.eval ")
    # base12: primitives.json exists -> only the held-out NLL runs; lidas is not finished -> not evaluated
    assert [c.split()[4] for c in evals] == ["nll"] and "base12_s1" in evals[0]
    assert "not trained" in p.stderr and "lidas_s1" in p.stderr


def test_steps_select_stages(tmp_path):
    runs = tmp_path / "runs"
    _finish(runs, "base12", 600)
    p = _dry(tmp_path, STEPS="eval", MODELS="base12", EVAL_ITEMS="40", SHOTS="3", EVAL_SEED="5")
    assert p.returncode == 0, p.stderr
    assert _commands(p.stdout, "pretrain") == [] and _commands(p.stdout, "eval corpus") == []
    (prim,) = _commands(p.stdout, "eval primitives")
    assert (_flag(prim, "--limit"), _flag(prim, "--num-fewshot"), _flag(prim, "--seed")) == ("40", "3", "5")
    assert _flag(prim, "--template") == "continuation"
    p = _dry(tmp_path, STEPS="sweeps analyse", MODELS="base12")
    assert p.returncode == 0, p.stderr
    assert len(_commands(p.stdout, "sweep repeat-block")) == 1 and len(_commands(p.stdout, "sweep icl")) == 1
    assert len(_commands(p.stdout, "megatron_growloop.analysis all")) == 1
    assert _commands(p.stdout, "eval primitives") == []


def test_bad_steps_or_models_stop_before_anything_runs(tmp_path):
    for env, message in (({"STEPS": "train evaluate"}, "unknown stage 'evaluate'"),
                         ({"MODELS": "base12 base99"}, "unknown model base99")):
        p = _dry(tmp_path, **env)
        assert p.returncode == 2 and message in p.stderr, p.stderr
        assert "run: " not in p.stdout and not (tmp_path / "runs").exists()
