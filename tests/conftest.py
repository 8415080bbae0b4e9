"""Shared test helpers.

* In-process tests use one 1-rank process group (``dist_1rank`` fixture).
* Multi-process tests launch ``torchrun`` (marked ``slow``; CI still runs them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*not installed.*")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: multi-process (torchrun) test; runs in CI too")


def _env():
    env = dict(os.environ)
    # An in-process group (dist_1rank) sets these; a child must not reuse its rendezvous port.
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(name, None)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONWARNINGS"] = "ignore"
    return env


def run_module(module: str, args, nproc: int = 1, timeout: int = 600, check: bool = True, cwd=None):
    """Run ``python -m module`` (nproc == 1) or ``torchrun --nproc_per_node nproc -m module``."""
    if nproc == 1:
        cmd = [sys.executable, "-m", module, *map(str, args)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(_free_port()), "-m", module, *map(str, args)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout, cwd=cwd or ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"command failed ({proc.returncode}): {' '.join(cmd)}\n--- stdout\n{proc.stdout[-4000:]}\n"
            f"--- stderr\n{proc.stderr[-6000:]}"
        )
    return proc


def pretrain(args, nproc: int = 1, timeout: int = 600, check: bool = True):
    return run_module("megatron_growloop.pretrain", args, nproc, timeout, check)


def read_metrics(path) -> list:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def dist_1rank():
    """A one-process gloo group with megatron-core parallel state (TP=PP=1)."""
    from megatron_growloop.training.initialize import init_distributed

    init_distributed(1, 1)
    yield
