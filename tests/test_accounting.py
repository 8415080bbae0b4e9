"""FLOPs accounting matches what the model actually computes (FlopCounterMode) within 2%."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from megatron_growloop import accounting
from megatron_growloop.model.arch import Arch
from megatron_growloop.model.gpt import build_model
from megatron_growloop.model.implementation import Implementation
from megatron_growloop.model.parallel import ParallelLayout


def _model(num_layers: int, loop, vocab: int):
    # Unfused attention: FlopCounterMode counts its explicit score/context matmuls, while it has no
    # formula for torch's CPU flash-attention kernel (it counts SDPA on CPU as 0 FLOPs).
    return build_model(Arch(num_layers=num_layers, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                            ffn_hidden_size=176, kv_channels=16, seq_length=32, max_position_embeddings=64,
                            padded_vocab_size=vocab, loop=loop), ParallelLayout(),
                       Implementation(attention_backend="unfused"))


@pytest.mark.parametrize("loop,layers", [(None, 3), ("1-1x3-1", 3)])
def test_forward_and_training_flops_match_flop_counter(dist_1rank, loop, layers):
    vocab, seq, batch = 512, 32, 2
    model = _model(layers, loop, vocab)
    tokens = torch.randint(0, vocab, (batch, seq))
    pos = torch.arange(seq).expand(batch, seq)
    shape = accounting.ArchShape.from_config(model.config, vocab, tied=True)
    depth = model.effective_depth
    with FlopCounterMode(display=False) as fwd:
        model(tokens, pos, None)
    predicted = shape.forward_flops_per_token(depth, seq) * batch * seq
    assert abs(fwd.get_total_flops() - predicted) / predicted < 0.02

    with FlopCounterMode(display=False) as train:
        model(tokens, pos, None, labels=tokens).sum().backward()
    predicted_train = shape.training_flops_per_token(depth, seq) * batch * seq
    # Every matmul has two backward matmuls (input and weight grads): 3x forward.
    assert abs(train.get_total_flops() - predicted_train) / predicted_train < 0.02


def test_unique_params_match_model(dist_1rank):
    vocab = 512
    for loop, n in [(None, 3), ("1-1x4-1", 3)]:
        model = _model(n, loop, vocab)
        shape = accounting.ArchShape.from_config(model.config, vocab, tied=True)
        assert shape.unique_params(model.config.num_layers) == sum(p.numel() for p in model.parameters())


def test_looped_depth_scales_inference_not_params():
    shape = accounting.ArchShape(576, 9, 3, 1536, 64, 49152)
    assert shape.forward_flops_per_token(24, 2048) > shape.forward_flops_per_token(12, 2048)
    assert shape.unique_params(12) < shape.unique_params(24)
    # training = 3 x forward for any depth
    assert shape.training_flops_per_token(24, 2048) == 3 * shape.forward_flops_per_token(24, 2048)


def test_smollm_135m_parameter_count():
    """The SmolLM-135M preset has the parameter count of the HF LlamaForCausalLM (tied)."""
    from megatron_growloop.model.presets import get_preset

    p = get_preset("smollm-135m")
    shape = accounting.ArchShape(p.hidden_size, p.num_attention_heads, p.num_query_groups, p.ffn_hidden_size,
                                 p.kv_channels, p.vocab_size)
    assert shape.unique_params(p.num_layers) == 134_515_008
