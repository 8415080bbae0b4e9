"""Shared helpers of the reliability tests (issue 14): a small trained checkpoint, damage to
its files, and the one-line-error assertion."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, _env

# A small, fast pretraining run (ByteTokenizer: no tokenizer files needed).
TINY = ["--tokenizer-type", "ByteTokenizer", "--model-preset", "tiny", "--seq-length", "32",
        "--micro-batch-size", "2", "--global-batch-size", "4", "--log-interval", "1", "--seed", "7",
        "--lr-warmup-iters", "1", "--lr-decay-style", "cosine"]
FAULT = str(ROOT / "tests" / "fault_inject.py")


def run(module: str, args, env_extra=None, timeout: int = 300, cwd=None):
    """``python tests/fault_inject.py module args`` (the fault injector is inert without FAULT_* env)."""
    env = _env()
    env.update(env_extra or {})
    return subprocess.run([sys.executable, FAULT, module, *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=cwd or ROOT)


def assert_one_line_error(proc, prog: str, *needles, code: int = 2):
    out = proc.stdout + proc.stderr
    assert proc.returncode == code, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    err = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert len(err) == 1, proc.stderr
    assert err[0].startswith(f"{prog}: error:"), err
    assert "Traceback" not in out
    for n in needles:
        assert n in err[0], (n, err[0])
    return err[0]


def copy_ckpt(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def truncate(path: Path, size: int = 1000) -> None:
    os.truncate(path, size)


def overwrite(path: Path, offset: int = 4096, n: int = 4096, byte: int = 0x5A) -> None:
    """Overwrite ``n`` bytes in place (the file keeps its size)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(bytes([byte]) * n)


def largest_shard(ckpt_dir: Path) -> Path:
    return max(ckpt_dir.glob("*.distcp"), key=lambda p: p.stat().st_size)
