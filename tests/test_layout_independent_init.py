"""Layout-independent initialization (issue 14): the initial weights are a function of (seed,
parameter name, global layer) only, so TP2xPP2 from scratch starts bitwise equal to one process
and trains step by step like it."""

from __future__ import annotations

import pytest
import torch

from conftest import pretrain, read_metrics

from megatron_growloop.model.arch import Arch
from megatron_growloop.model.gpt import build_model
from megatron_growloop.model.layout_init import derive_seed, initialize_layout_independent

ARCH = Arch(num_layers=3, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
            kv_channels=16, seq_length=32, max_position_embeddings=64, padded_vocab_size=256,
            untie_embeddings_and_output_weights=True)


def test_draws_follow_megatrons_init_rules(dist_1rank):
    """Per parameter, the same distribution megatron-core draws (init_method std, the scaled
    output-projection std, ones for norms) -- only the stream differs."""
    torch.manual_seed(0)
    ref = build_model(ARCH, to_device=False)
    ours = build_model(ARCH, to_device=False)
    n = initialize_layout_independent(ours, seed=5)
    assert n == sum(p.numel() for p in ours.parameters())
    for (name, a), (_, b) in zip(ref.named_parameters(), ours.named_parameters()):
        if a.dim() == 1:
            assert torch.equal(a, b), name  # norms: ones
        else:
            assert b.std().item() == pytest.approx(a.std().item(), rel=0.1), name
            assert not torch.equal(a, b)


def test_same_seed_same_weights_other_seed_other_weights(dist_1rank):
    a, b, c = (build_model(ARCH, to_device=False) for _ in range(3))
    for m, s in ((a, 1), (b, 1), (c, 2)):
        initialize_layout_independent(m, s)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.embedding.word_embeddings.weight, c.embedding.word_embeddings.weight)
    assert derive_seed(1, "decoder.layers.mlp.linear_fc2.weight", (0,)) != \
        derive_seed(1, "decoder.layers.mlp.linear_fc2.weight", (1,))


# Megatron pads the vocabulary to a multiple of --make-vocab-size-divisible-by x TP: 257 byte tokens
# pad to 512 at TP 1 and 2 alike with 256 (with different padding the embedding and the softmax
# differ in size, and so does training).
COMMON = ["--tokenizer-type", "ByteTokenizer", "--make-vocab-size-divisible-by", "256", "--global-batch-size", "8",
          "--micro-batch-size", "2", "--log-interval", "1", "--seed", "11", "--seq-length", "64"]


def _model_tensors(path):
    from megatron.core import dist_checkpointing

    from megatron_growloop.training.checkpointing import resolve_load_dir

    t = dist_checkpointing.load_plain_tensors(str(resolve_load_dir(str(path))[0]))
    return {k: v for k, v in t.items() if isinstance(v, torch.Tensor)
            and k.startswith(("embedding.", "decoder.", "output_layer."))}


@pytest.mark.slow
def test_tp2_pp2_from_scratch_equals_one_process(tmp_path, dist_1rank):
    """Initial weights (saved after one step at --lr 0) are bitwise equal at TP2xPP2 and in one
    process; 4 training steps from scratch give the one-process losses (2e-5: fp32 sums in other
    orders).  Control: megatron-core's own initialization differs between the layouts."""
    par = ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]
    starts = {}
    for name, extra, nproc in (("one", [], 1), ("tp2pp2", par, 4)):
        pretrain(COMMON + extra + ["--train-iters", "1", "--lr", "0", "--save", tmp_path / f"s_{name}"], nproc=nproc)
        starts[name] = _model_tensors(tmp_path / f"s_{name}")
    assert set(starts["one"]) == set(starts["tp2pp2"]) and starts["one"]
    for k, v in starts["one"].items():
        assert torch.equal(v, starts["tp2pp2"][k]), k

    losses = {}
    for name, extra, nproc in (("one", [], 1), ("tp2pp2", par, 4)):
        m = tmp_path / f"m_{name}.jsonl"
        pretrain(COMMON + extra + ["--train-iters", "4", "--lr", "3e-3", "--metrics-file", m], nproc=nproc)
        losses[name] = [r["loss"] for r in read_metrics(m)]
    assert len(losses["one"]) == 4
    assert losses["tp2pp2"] == pytest.approx(losses["one"], rel=2e-5)
    assert losses["one"][-1] < losses["one"][0]

    pretrain(COMMON + ["--tensor-model-parallel-size", "2", "--train-iters", "1", "--lr", "0",
                       "--no-layout-independent-init", "--save", tmp_path / "s_megatron"], nproc=2)
    other = _model_tensors(tmp_path / "s_megatron")
    assert not all(torch.equal(v, other[k]) for k, v in starts["one"].items())
