"""benchmarks/gpu_check.sh is ready for a GPU session: its syntax, argument flow and every item's
command lines are checked here on CPU (--dry-run parses them with the real argument parser), and
one item's measuring code runs end to end at toy size (--smoke)."""

from __future__ import annotations

import json
import subprocess

import pytest

from conftest import ROOT, _env

pytestmark = pytest.mark.slow  # five Python processes
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
ITEMS = ["mfu", "loop", "growth", "generate", "sync", "cudagraph", "resume", "fusions", "plan"]


def _run(*args, timeout=300):
    env = _env()
    env.pop("OUT", None)
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


def test_dry_run_plans_every_item_with_valid_command_lines(tmp_path):
    proc = _run("--dry-run", "--out", tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["mode"] == "dry-run" and list(result["items"]) == ITEMS
    for name, item in result["items"].items():
        assert item["status"] == "dry-run", (name, item)
    assert "--bf16" in result["items"]["mfu"]["rows"][1]["argv"]
    assert result["items"]["loop"]["argv_looped"][-2:] == ["--loop", "4-4x4-4"]
    assert result["items"]["cudagraph"]["argv_graphs"][-4:] == ["--cuda-graph-impl", "local", "--cuda-graph-warmup-steps", "2"]
    assert "--use-distributed-optimizer" in result["items"]["resume"]["argv_straight"]
    assert result["items"]["fusions"]["argv_unfused"][-2:] == ["--no-bias-swiglu-fusion", "--no-bias-dropout-fusion"]
    # the planner planned exactly the mfu item's runs
    assert [r["preset"] for r in result["items"]["plan"]["rows"]] == ["smollm-360m", "smollm-1.7b"]
    assert all(r["predicted_peak_bytes"] > 0 for r in result["items"]["plan"]["rows"])
    log = (tmp_path / "gpu_check.log").read_text()
    assert "pip install -q --no-index --no-deps" in log and ".whl/*.whl" in log
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_check.json", "gpu_check.log"]


def test_bad_arguments_are_one_line_errors(tmp_path):
    for args, what in ((["--frobnicate"], "unknown argument --frobnicate"),
                       (["--items", "mfu nope", "--out", tmp_path], "unknown item nope")):
        proc = _run(*args)
        assert proc.returncode == 2 and what in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_smoke_runs_the_items_end_to_end(tmp_path):
    """At toy size on CPU: generation, and the (f) checks -- CUDA graphs refused in one line here,
    the start-up line, exact resume from a dp_reshardable checkpoint, fusions equal unfused, and
    the planner reading the mfu item's measured peak."""
    proc = _run("--smoke", "--items", "generate mfu cudagraph resume fusions plan", "--out", tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    items = json.loads((tmp_path / "gpu_check.json").read_text())["items"]
    for name, item in items.items():
        assert item["status"] == "ok", (name, item)
    assert items["generate"]["same_tokens"] is True and items["generate"]["effective_depth"] == 24
    graphs = items["cudagraph"]
    assert "--cuda-graph-impl local needs a GPU" in graphs["refused"] and graphs["pass"] is True
    assert "impl local, attention sdpa, bf16" in graphs["startup"]["line"] and graphs["startup"]["pass"]
    resume = items["resume"]
    assert resume["pass"] is True and resume["optimizer_format"] == "dp_reshardable"
    assert len(resume["resumed_losses"]) == 2 and resume["resumed_losses"] == resume["straight_losses"][2:]
    assert items["fusions"]["pass"] is True and items["fusions"]["max_rel_diff"] <= 1e-2
    (row,) = items["plan"]["rows"]
    assert row["preset"] == "tiny" and row["predicted_peak_bytes"] > 0 and row["measured_peak_bytes"] > 0
