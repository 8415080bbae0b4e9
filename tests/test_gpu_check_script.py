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
ITEMS = ["mfu", "loop", "growth", "generate", "sync"]


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
    log = (tmp_path / "gpu_check.log").read_text()
    assert "pip install -q --no-index --no-deps" in log and ".whl/*.whl" in log
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_check.json", "gpu_check.log"]


def test_bad_arguments_are_one_line_errors(tmp_path):
    for args, what in ((["--frobnicate"], "unknown argument --frobnicate"),
                       (["--items", "mfu nope", "--out", tmp_path], "unknown item nope")):
        proc = _run(*args)
        assert proc.returncode == 2 and what in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_smoke_runs_an_item_end_to_end(tmp_path):
    proc = _run("--smoke", "--items", "generate", "--out", tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    item = json.loads((tmp_path / "gpu_check.json").read_text())["items"]["generate"]
    assert item["status"] == "ok", item
    assert item["same_tokens"] is True and item["effective_depth"] == 24
