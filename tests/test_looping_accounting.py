"""Accounting of looped models (the three axes of the paper's Fig. 1): unique parameters
count tied layers once; inference and training FLOPs count every layer *application*
(effective depth).  Checked against the real model: its parameter count and the FLOPs
torch's FlopCounterMode measures in its forward and backward passes."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from looping_util import VOCAB, batch, build
from megatron_growloop import accounting


def _measured_flops(model, train: bool) -> int:
    tokens, pos = batch(0, b=2, s=16)
    if train:
        model.train()
        with FlopCounterMode(display=False) as fc:
            model(tokens, pos, None, labels=torch.roll(tokens, -1, 1)).sum().backward()
    else:
        model.eval()
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            model(tokens, pos, None)
    return fc.get_total_flops()


@pytest.mark.parametrize("num_layers,loop,depth", [(12, "4-4x4-4", 24), (24, None, 24), (4, "1-2x3-1", 8)])
def test_summary_matches_the_model(dist_1rank, num_layers, loop, depth):
    """summary(config) of a looped config: unique layers/params as built, effective depth =
    applications, inference FLOPs/token = measured forward FLOPs, training = measured fwd+bwd."""
    # unfused attention: FlopCounterMode has no formula for torch's CPU flash-attention kernel
    model = build(num_layers, loop, attention_backend="unfused")
    s = accounting.summary(model.config, VOCAB, True, 16)  # depth taken from the config's schedule
    tokens = 2 * 16
    assert s["unique_layers"] == num_layers
    assert s["effective_depth"] == depth == model.effective_depth
    assert s["unique_parameters"] == sum(p.numel() for p in model.parameters())
    assert s["inference_flops_per_token"] * tokens == _measured_flops(model, train=False)
    assert s["training_flops_per_token"] * tokens == _measured_flops(model, train=True)
    assert s["training_flops_per_token"] == 3 * s["inference_flops_per_token"]


def test_loop_vs_untied_axes():
    """Loop(4-4x4-4) has the FLOPs of the 24-layer model and the parameters of a 12-layer one."""
    shape = accounting.ArchShape(hidden_size=576, num_attention_heads=9, num_query_groups=3,
                                 ffn_hidden_size=1536, kv_channels=64, vocab_size=49152)
    looped_depth, untied_depth = 4 + 4 * 4 + 4, 24
    assert shape.forward_flops_per_token(looped_depth, 2048) == shape.forward_flops_per_token(untied_depth, 2048)
    emb = 49152 * 576
    assert shape.unique_params(12) - emb == pytest.approx((shape.unique_params(24) - emb) / 2, rel=1e-4)


def test_summary_follows_k_and_repeat_blocks(dist_1rank):
    """Changing k or repeating a block changes depth and FLOPs, never the parameters."""
    model = build(4, "1-2x3-1")
    a = accounting.summary(model.config, VOCAB, True, 16)
    model.set_loop_repeats(5)
    b = accounting.summary(model.config, VOCAB, True, 16)
    model.set_repeat_blocks(["0:1:3"])
    c = accounting.summary(model.config, VOCAB, True, 16)
    assert (a["effective_depth"], b["effective_depth"], c["effective_depth"]) == (8, 12, 14)
    assert a["unique_parameters"] == b["unique_parameters"] == c["unique_parameters"]
    per_app = accounting.ArchShape.from_config(model.config, VOCAB).layer_forward_flops_per_token(16)
    assert b["inference_flops_per_token"] - a["inference_flops_per_token"] == 4 * per_app
    assert c["inference_flops_per_token"] - b["inference_flops_per_token"] == 2 * per_app
