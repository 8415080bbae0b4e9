"""Shared fixtures of the evaluation tests: tiny checkpoints pretrained once per session."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import pretrain

_CACHE = {}


@pytest.fixture(scope="session")
def tiny_ckpts():
    """A plain 4-layer and a Loop(1-2x2-1) model (ByteTokenizer, 2048 positions), 4 steps each."""
    if "ckpts" not in _CACHE:
        root = Path(tempfile.mkdtemp(prefix="growloop_eval_"))
        common = ["--tokenizer-type", "ByteTokenizer", "--train-iters", "4", "--log-interval", "4",
                  "--max-position-embeddings", "2048", "--micro-batch-size", "2"]
        pretrain(common + ["--save", root / "plain"])
        pretrain(common + ["--loop", "1-2x2-1", "--save", root / "loop"])
        _CACHE["ckpts"] = SimpleNamespace(plain=str(root / "plain"), loop=str(root / "loop"), root=root)
    yield _CACHE["ckpts"]
    shutil.rmtree(_CACHE["ckpts"].root, ignore_errors=True)  # session end (all users are done)
