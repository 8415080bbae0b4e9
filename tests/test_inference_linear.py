"""The local spec's linear layers (model/linear.py) compute, without gradients at TP=1, exactly
what megatron-core's ColumnParallelLinear/RowParallelLinear compute (bitwise: same F.linear
product, bias added after), without megatron's autograd Functions; with gradients on they are
megatron's forward unchanged.  TP=2 with these layers: tests/test_fastpath_parallel.py."""

from __future__ import annotations

import pytest
import torch
from megatron.core.tensor_parallel import layers as mlayers

from looping_util import build


def _config():
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, use_cpu_initialization=True)


def _modules(bias: bool, skip_bias_add: bool):
    from megatron_growloop.model.linear import ColumnParallelLinear, RowParallelLinear

    cfg = _config()
    init = torch.nn.init.normal_
    col = ColumnParallelLinear(32, 48, config=cfg, init_method=init, bias=bias, gather_output=False,
                               skip_bias_add=skip_bias_add)
    row = RowParallelLinear(48, 32, config=cfg, init_method=init, bias=bias, input_is_parallel=True,
                            skip_bias_add=skip_bias_add)
    if bias:
        with torch.no_grad():
            col.bias.normal_()
            row.bias.normal_()
    return col, row


@pytest.mark.parametrize("bias,skip_bias_add", [(False, False), (True, False), (True, True)])
def test_no_grad_fast_path_equals_megatrons_forward_bitwise(dist_1rank, monkeypatch, bias, skip_bias_add):
    torch.manual_seed(0)
    col, row = _modules(bias, skip_bias_add)
    assert col.inference_fast_path and row.inference_fast_path
    x, y = torch.randn(5, 2, 32), torch.randn(5, 2, 48)
    ref_col, ref_row = col(x), row(y)  # gradients on: megatron's forward

    def refuse(*args, **kwargs):
        raise AssertionError("the inference fast path went through megatron's autograd Function")

    monkeypatch.setattr(mlayers, "linear_with_grad_accumulation_and_async_allreduce", refuse)
    monkeypatch.setattr(mlayers, "linear_with_frozen_weight", refuse)
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            out_col, out_row = col(x), row(y)
        for (o, ob), (r, rb) in ((out_col, ref_col), (out_row, ref_row)):
            assert torch.equal(o, r)
            assert (ob is None) == (rb is None) and (ob is None or ob is rb)


def test_grad_enabled_runs_megatrons_forward(dist_1rank):
    col, row = _modules(True, False)
    hidden, _ = col(torch.randn(3, 1, 32))
    out, _ = row(hidden)
    names, todo = set(), [out.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is not None:
            names.add(fn.name())
            todo += [f for f, _ in fn.next_functions]
    # megatron's Functions recorded the graph
    assert any("LinearWithGradAccumulation" in n for n in names), names
    assert any("ReduceFromModelParallelRegion" in n for n in names), names
    out.sum().backward()
    assert col.weight.grad is not None and row.weight.grad is not None


def test_local_spec_builds_these_layers(dist_1rank):
    from megatron_growloop.model.linear import ColumnParallelLinear, RowParallelLinear

    layer = build(2).decoder.layers[0]
    assert type(layer.self_attention.linear_qkv) is ColumnParallelLinear
    assert type(layer.self_attention.linear_proj) is RowParallelLinear
    assert type(layer.mlp.linear_fc1) is ColumnParallelLinear
    assert type(layer.mlp.linear_fc2) is RowParallelLinear
