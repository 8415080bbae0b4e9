"""The GPU path, checked on the CPU wherever its behaviour can be seen here (docs/gpu.md).

Each test fails on the code before its fix; what only a GPU can confirm is listed in
docs/gpu.md and exercised by benchmarks/gpu_check.sh.
"""

from __future__ import annotations

import pytest

from megatron_growloop.errors import UsageError

BASE = ["--tokenizer-type", "ByteTokenizer", "--train-iters", "2"]


def test_local_attention_backend_is_refused_with_transformer_engine():
    """megatron/training/arguments.py refuses --attention-backend local with the TE spec."""
    from megatron_growloop.training.arguments import parse_args

    with pytest.raises(UsageError, match="--attention-backend local is only supported with --transformer-impl local"):
        parse_args(BASE + ["--transformer-impl", "transformer_engine", "--attention-backend", "local"], world_size=1)


def test_local_models_leave_the_process_wide_te_attention_variables_alone(dist_1rank, monkeypatch):
    """megatron-core sets NVTE_{FLASH,FUSED,UNFUSED}_ATTN process-wide and asserts on a conflict.
    A local-spec model must neither assert on values a TE model set nor change them, so local and
    TE models can be built in one process (conversion, then training)."""
    from looping_util import build

    for name in ("NVTE_FLASH_ATTN", "NVTE_FUSED_ATTN", "NVTE_UNFUSED_ATTN"):
        monkeypatch.setenv(name, "1")  # what a TE model with --attention-backend auto leaves behind
    build(2)
    import os

    assert [os.environ[n] for n in ("NVTE_FLASH_ATTN", "NVTE_FUSED_ATTN", "NVTE_UNFUSED_ATTN")] == ["1", "1", "1"]


def test_fallbacks_and_fp32_on_a_gpu_are_said():
    """A run that fell back from TE, or runs fp32 on a GPU, says so; on the CPU fp32 is normal."""
    from megatron_growloop.model.implementation import Implementation

    fp32 = Implementation()
    assert fp32.warnings(cuda=False) == []
    assert any("fp32 on a GPU" in w for w in fp32.warnings(cuda=True))
    assert Implementation(dtype="bf16").warnings(cuda=True) == []
    assert Implementation(dtype="bf16").warnings(cuda=True, fallback="TE missing") == ["TE missing"]
    assert fp32.describe() == "impl local, attention local, fp32"
