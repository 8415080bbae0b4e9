"""SDPA attention under tensor parallelism (heads split), sequence parallelism (the local spec's
norms support it through model/fusions.RMSNorm), a looped block, selective and full
recomputation: training losses and gradient norms equal one process running megatron-core's
unfused attention, starting from a checkpoint that the unfused backend saved (state dicts do
not depend on the backend).  Tolerance: relative 2e-5 on losses, 1e-4 on gradient norms."""

from __future__ import annotations

import pytest

from conftest import pretrain, read_metrics

pytestmark = pytest.mark.slow

COMMON = ["--tokenizer-type", "ByteTokenizer", "--seq-length", "64", "--micro-batch-size", "2",
          "--global-batch-size", "4", "--log-interval", "1", "--lr", "1e-3", "--loop", "1-2x2-1"]


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    d = tmp_path_factory.mktemp("fastpath")
    pretrain(COMMON + ["--train-iters", "1", "--attention-backend", "unfused", "--save", d / "ck"])
    ref = d / "ref.jsonl"
    pretrain(COMMON + ["--train-iters", "3", "--attention-backend", "unfused", "--load", d / "ck", "--finetune",
                       "--metrics-file", ref])
    return d, read_metrics(ref)


@pytest.mark.parametrize("flags", [
    ["--sequence-parallel"],
    ["--sequence-parallel", "--recompute-granularity", "selective"],
    ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"],
], ids=["sp", "sp-selective", "full-recompute"])
def test_sdpa_tp2_matches_unfused_one_process(start, tmp_path, flags):
    d, ref = start
    m = tmp_path / "m.jsonl"
    pretrain(COMMON + flags + ["--train-iters", "3", "--tensor-model-parallel-size", "2", "--attention-backend",
                               "sdpa", "--load", d / "ck", "--finetune", "--metrics-file", m], nproc=2)
    got = read_metrics(m)
    assert len(got) == len(ref) == 3
    for a, b in zip(got, ref):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-5), (got, ref)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4), (got, ref)
    assert ref[-1]["loss"] < ref[0]["loss"]  # it trains
