"""The fine-tuning loss, through the trainer's own ``forward_step`` and megatron-core's loss mask:
it sees answer targets only, gradients come only from answer positions, and packing several
examples into one sequence (block-diagonal attention) computes what each example computes alone."""

from __future__ import annotations

import random

import pytest
import torch

from looping_util import build
from megatron_growloop.data.packing import PackedSFTDataset
from megatron_growloop.data.sft import SFTExample, tokenize_examples
from megatron_growloop.data.tokenizer import ByteTokenizer
from megatron_growloop.training.trainer import forward_step

SEQ = 64
VOCAB = 384  # ByteTokenizer's 257 ids padded to a multiple of 128


def _examples(n=12, seed=0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        w = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(3, 12)))
        out.append(SFTExample(f"{w} ->", " " + w[::-1][: rng.randint(1, 4)], f"ex{i}"))
    return tokenize_examples(out, ByteTokenizer(), SEQ)


def _model(loop=None, num_layers=3):
    # a wide initialisation makes attention far from uniform, so leaking across examples shows
    return build(num_layers, loop, seed=1, padded_vocab_size=VOCAB, seq_length=SEQ, max_position_embeddings=128,
                 init_method_std=0.2)


def _loss(model, batch):
    """``(summed loss, number of loss tokens)`` of one micro-batch, as the trainer computes it."""
    output, loss_fn = forward_step(iter([batch]), model)
    total, count, _ = loss_fn(output)
    return total, int(count)


def _batch(ds, rows):
    from megatron_growloop.data.datasets import collate

    return collate([ds.sequence(r) for r in rows])


@pytest.fixture(scope="module")
def packed():
    return PackedSFTDataset(_examples(), SEQ, "pack", seed=0)


def test_prompt_targets_do_not_change_the_loss_answer_targets_do(dist_1rank, packed):
    model = _model()
    batch = _batch(packed, range(packed.num_sequences))
    base, n = _loss(model, batch)
    mask = batch["loss_mask"]
    assert n == int(mask.sum()) > 0
    prompt_pos = (mask == 0).nonzero()[:5]
    answer_pos = (mask == 1).nonzero()[:5]
    for b, t in prompt_pos.tolist():
        changed = {k: v.clone() for k, v in batch.items()}
        changed["labels"][b, t] = (changed["labels"][b, t] + 7) % 257
        assert _loss(model, changed)[0].item() == base.item()
    for b, t in answer_pos.tolist():
        changed = {k: v.clone() for k, v in batch.items()}
        changed["labels"][b, t] = (changed["labels"][b, t] + 7) % 257
        assert abs(_loss(model, changed)[0].item() - base.item()) > 1e-4


@pytest.mark.parametrize("loop", [None, "1-1x2-1"])
def test_gradients_come_only_from_answer_positions(dist_1rank, packed, loop):
    """The gradient reaching the logits is zero at every position without an answer target
    and non-zero at every position with one (also through a looped block)."""
    model = _model(loop)
    batch = _batch(packed, range(2))
    grads = []

    def keep(module, inputs, output):
        output[0].register_hook(grads.append)

    handle = model.output_layer.register_forward_hook(keep)
    try:
        total, _ = _loss(model, batch)
        total.backward()
    finally:
        handle.remove()
    g = grads[0].transpose(0, 1).abs().sum(-1)  # [s, b, V] -> [b, s]
    mask = batch["loss_mask"].bool()
    assert torch.all(g[~mask] == 0)
    assert torch.all(g[mask] > 0)
    emb = model.embedding.word_embeddings.weight.grad
    assert emb is not None and emb.abs().sum() > 0


@pytest.mark.parametrize("loop", [None, "1-1x2-1"])
def test_packed_equals_unpacked(dist_1rank, loop):
    """The loss of packed sequences (several examples each, block-diagonal causal mask) equals
    the loss of the same examples padded one per sequence, summed and per example."""
    model = _model(loop)
    model.eval()
    exs = _examples(16, seed=3)
    packed = PackedSFTDataset(exs, SEQ, "pack")
    padded = PackedSFTDataset(exs, SEQ, "pad")
    assert packed.num_sequences < padded.num_sequences == 16
    with torch.no_grad():
        lp, np_ = _loss(model, _batch(packed, range(packed.num_sequences)))
        lu, nu = _loss(model, _batch(padded, range(16)))
    assert np_ == nu
    assert lp.item() == pytest.approx(lu.item(), rel=2e-6)

    # Per example: the packed row's per-token losses at that example's positions.
    with torch.no_grad():
        b = _batch(packed, range(packed.num_sequences))
        out, _ = forward_step(iter([b]), model)
        b1 = _batch(padded, range(16))
        out1, _ = forward_step(iter([b1]), model)
    for r, row in enumerate(packed.rows):
        at = 0
        for i in row:
            m = exs[i].length
            mine = (out[r, at:at + m] * b["loss_mask"][r, at:at + m]).sum()
            alone = (out1[i, :m] * b1["loss_mask"][i, :m]).sum()
            assert mine.item() == pytest.approx(alone.item(), rel=1e-5, abs=1e-5)
            at += m

    # Without the mask the packed examples see each other and the loss changes.
    leaky = {k: v for k, v in _batch(packed, range(packed.num_sequences)).items() if k != "segment_ids"}
    with torch.no_grad():
        ll, _ = _loss(model, leaky)
    assert abs(ll.item() - lu.item()) > 1e-3 * abs(lu.item())
    assert abs(ll.item() - lu.item()) > 1000 * abs(lp.item() - lu.item())
