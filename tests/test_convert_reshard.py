"""``convert reshard``: a training checkpoint (model + Adam state + scheduler + counters) of a
looped model re-saved by a TP=2 job is the same checkpoint, and training resumes from it exactly
as from the original."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import pretrain, read_metrics, run_module

COMMON = ["--tokenizer-type", "ByteTokenizer", "--model-preset", "tiny", "--loop", "1-2x2-1",
          "--seq-length", "32", "--micro-batch-size", "2", "--log-interval", "1", "--lr", "1e-3",
          "--lr-decay-style", "constant"]


@pytest.mark.slow
def test_reshard_keeps_every_tensor_and_resumes_identically(tmp_path, dist_1rank):
    """After 3 steps at TP=1, `reshard` to TP=2: every model and optimizer tensor, the scheduler
    state and the counters are unchanged and the metadata records TP=2; 2 further steps at TP=2
    give identical losses whether they resume from the original or the resharded checkpoint."""
    from megatron.core import dist_checkpointing

    from megatron_growloop.training.checkpointing import resolve_load_dir

    a, b = tmp_path / "a", tmp_path / "b"
    pretrain(COMMON + ["--train-iters", "3", "--save", a])
    run_module("megatron_growloop.convert", ["reshard", "--load", a, "--out", b,
                                             "--target-tensor-parallel-size", "2"], nproc=2)
    da, db = (str(resolve_load_dir(str(p))[0]) for p in (a, b))
    ta, tb = dist_checkpointing.load_plain_tensors(da), dist_checkpointing.load_plain_tensors(db)
    ta = {k: v for k, v in ta.items() if isinstance(v, torch.Tensor)}
    tb = {k: v for k, v in tb.items() if isinstance(v, torch.Tensor)}
    assert set(ta) == set(tb) and any(k.startswith("optimizer.state.exp_avg_sq.") for k in ta)
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    ca, cb = dist_checkpointing.load_common_state_dict(da), dist_checkpointing.load_common_state_dict(db)
    assert ca["opt_param_scheduler"] == cb["opt_param_scheduler"] and ca["growloop"] == cb["growloop"]
    ma, mb = (json.loads((Path(d) / "growloop.json").read_text()) for d in (da, db))
    assert mb["parallel"]["tp"] == 2 and mb["iteration"] == 3 and mb["has_optimizer"]
    assert mb["arch"] == ma["arch"] and mb["arch"]["loop"] == "1-2x2-1"

    losses = {}
    for name, src in (("orig", a), ("resharded", b)):
        metrics = tmp_path / f"{name}.jsonl"
        pretrain(COMMON + ["--train-iters", "5", "--load", src, "--tensor-model-parallel-size", "2",
                           "--metrics-file", metrics], nproc=2)
        losses[name] = [(r["iteration"], r["loss"]) for r in read_metrics(metrics)]
    assert [i for i, _ in losses["orig"]] == [4, 5]
    assert losses["orig"] == losses["resharded"]


def test_reshard_refuses_impossible_layouts(tmp_path, dist_1rank):
    """A target TP that does not divide the heads, a PP larger than the layers, or a world size
    that does not fit the target is a one-line error before anything is built or written."""
    from megatron_growloop.convert.reshard import reshard
    from megatron_growloop.errors import UsageError
    from megatron_growloop.model.arch import Arch
    from megatron_growloop.model.gpt import build_inference_model
    from megatron_growloop.training.checkpointing import save_checkpoint

    arch = Arch(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
                kv_channels=16, seq_length=32, max_position_embeddings=64, rotary_base=10000.0,
                norm_epsilon=1e-5, padded_vocab_size=384)
    save_checkpoint(str(tmp_path / "ck"), 0, [build_inference_model(arch)], metadata={"arch": arch.to_meta()})
    with pytest.raises(UsageError, match="attention heads"):
        reshard(str(tmp_path / "ck"), str(tmp_path / "out"), 3, 1)
    with pytest.raises(UsageError, match="PP 3 exceeds"):
        reshard(str(tmp_path / "ck"), str(tmp_path / "out"), 1, 3)
    with pytest.raises(UsageError, match="world size"):
        reshard(str(tmp_path / "ck"), str(tmp_path / "out"), 2, 1)
    assert not (tmp_path / "out").exists()
