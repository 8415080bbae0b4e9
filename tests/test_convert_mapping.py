"""Unit tests of the pure HF <-> megatron-core mapping (``megatron_growloop.convert.mapping``)
and of the HF config translation (``convert.hf_config``).  Fast: no model weights are loaded."""

from __future__ import annotations

import pytest
import torch

from megatron_growloop.convert import mapping as mp
from megatron_growloop.convert.hf_config import (
    arch_from_hf_config,
    hf_config_from_arch,
    rope_settings,
)
from megatron_growloop.errors import UsageError
from megatron_growloop.model.arch import Arch, pad_vocab_size


def _shape(nh=4, ng=2, hd=3, h=8, ffn=10, layers=2, vocab=50):
    return mp.LlamaShape(num_layers=layers, hidden_size=h, num_attention_heads=nh, num_query_groups=ng,
                         head_dim=hd, ffn_hidden_size=ffn, vocab_size=vocab)


def _random_hf(shape: mp.LlamaShape, tied: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) for k, s in shape.hf_shapes(tied).items()}


def test_qkv_rows_are_interleaved_per_query_group():
    """linear_qkv rows must be [q heads of group g; k_g; v_g] for g = 0..ng-1 (megatron's
    SelfAttention splits each group's slice this way); a plain [q; k; v] cat would be wrong."""
    s = _shape(nh=4, ng=2, hd=3, h=1)
    q = torch.arange(12.0).reshape(12, 1)          # heads 0..3, rows 0..11
    k = 100 + torch.arange(6.0).reshape(6, 1)      # groups 0..1
    v = 200 + torch.arange(6.0).reshape(6, 1)
    fused = mp.qkv_to_mcore(q, k, v, s).flatten().tolist()
    expected = (list(range(0, 6)) + [100, 101, 102] + [200, 201, 202]
                + list(range(6, 12)) + [103, 104, 105] + [203, 204, 205])
    assert fused == expected


@pytest.mark.parametrize("nh,ng", [(4, 4), (4, 2), (6, 1), (9, 3)])
def test_qkv_round_trip_bitwise(nh, ng):
    """qkv_from_mcore inverts qkv_to_mcore exactly for MHA, GQA and MQA."""
    s = _shape(nh=nh, ng=ng, hd=5, h=7)
    q, k, v = torch.randn(nh * 5, 7), torch.randn(ng * 5, 7), torch.randn(ng * 5, 7)
    q2, k2, v2 = mp.qkv_from_mcore(mp.qkv_to_mcore(q, k, v, s), s)
    assert torch.equal(q, q2) and torch.equal(k, k2) and torch.equal(v, v2)


def test_fc1_is_gate_then_up():
    """linear_fc1 = cat([gate, up]) (megatron applies silu to the first half)."""
    gate, up = torch.randn(10, 8), torch.randn(10, 8)
    fc1 = mp.fc1_to_mcore(gate, up)
    assert torch.equal(fc1[:10], gate) and torch.equal(fc1[10:], up)
    g2, u2 = mp.fc1_from_mcore(fc1)
    assert torch.equal(g2, gate) and torch.equal(u2, up)


def test_vocab_padding_keeps_tp_divisibility_and_is_removed():
    """Padding goes to a multiple of divisible_by * TP (so every TP rank gets equal rows), with
    zero rows that are dropped again on export."""
    assert pad_vocab_size(49152, 128, 1) == 49152
    assert pad_vocab_size(128256, 128, 4) == 128512
    assert pad_vocab_size(300, 128, 3) == 384
    for tp in (1, 2, 3, 4, 8):
        assert pad_vocab_size(50257, 128, tp) % tp == 0
    w = torch.randn(300, 4)
    p = mp.pad_vocab(w, 384)
    assert p.shape == (384, 4) and torch.equal(p[:300], w) and not p[300:].any()
    assert torch.equal(mp.unpad_vocab(p, 300), w)
    with pytest.raises(UsageError):
        mp.pad_vocab(w, 200)


@pytest.mark.parametrize("naming", ["local", "te", "dist"])
@pytest.mark.parametrize("tied", [True, False])
def test_state_dict_round_trip_bitwise(naming, tied):
    """HF -> megatron (any naming) -> HF reproduces every tensor bitwise and no more."""
    s = _shape()
    hf = _random_hf(s, tied)
    mc = mp.hf_to_mcore_state_dict(hf, s, padded_vocab=64, tied=tied, naming=naming)
    assert mc[mp.MC_EMBED].shape[0] == 64
    back = mp.mcore_to_hf_state_dict(mc, s, tied=tied, naming=naming)
    assert set(back) == set(hf)
    for k in hf:
        assert torch.equal(back[k], hf[k]), k


def test_te_and_local_norm_names():
    """Only the norms differ between the local and TE specs."""
    s = _shape(layers=1)
    hf = _random_hf(s, tied=True)
    layer = {k: hf["model.layers.0." + k] for k in mp.HF_LAYER_KEYS}
    local = mp.hf_layer_to_mcore(layer, s, "local")
    te = mp.hf_layer_to_mcore(layer, s, "te")
    assert torch.equal(local["input_layernorm.weight"], te["self_attention.linear_qkv.layer_norm_weight"])
    assert torch.equal(local["pre_mlp_layernorm.weight"], te["mlp.linear_fc1.layer_norm_weight"])
    assert set(local) - set(te) == {"input_layernorm.weight", "pre_mlp_layernorm.weight"}


def test_unrolling_a_schedule_copies_layers():
    """A looped model unrolls to one HF layer per application; copies are independent tensors."""
    s = _shape(layers=3)
    hf = _random_hf(s, tied=True)
    mc = mp.hf_to_mcore_state_dict(hf, s, padded_vocab=64, tied=True, naming="dist")
    out = mp.mcore_to_hf_state_dict(mc, s, tied=True, naming="dist", schedule=[0, 1, 1, 1, 2])
    assert torch.equal(out["model.layers.3.self_attn.q_proj.weight"], hf["model.layers.1.self_attn.q_proj.weight"])
    assert torch.equal(out["model.layers.4.mlp.down_proj.weight"], hf["model.layers.2.mlp.down_proj.weight"])
    a, b = out["model.layers.1.mlp.up_proj.weight"], out["model.layers.2.mlp.up_proj.weight"]
    assert a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()


def test_names_match_megatron_model(dist_1rank):
    """The local naming is exactly the local-spec GPTModel's state_dict (besides _extra_state);
    the dist naming is exactly the keys of its sharded_state_dict (the distributed-checkpoint keys);
    the TE naming is what megatron's own local->TE key map produces."""
    from megatron_growloop.convert.megatron_io import build_single_rank_model

    s = _shape(nh=4, ng=2, hd=16, h=64, ffn=96, layers=2, vocab=256)
    arch = Arch(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
                kv_channels=16, seq_length=32, max_position_embeddings=64, rotary_base=10000.0,
                norm_epsilon=1e-5, padded_vocab_size=256, untie_embeddings_and_output_weights=True)
    model = build_single_rank_model(arch)
    hf = _random_hf(s, tied=False)
    local = mp.hf_to_mcore_state_dict(hf, s, 256, tied=False, naming="local")
    model_keys = {k for k in model.state_dict() if not k.endswith("_extra_state")}
    assert set(local) == model_keys
    for k, t in model.state_dict().items():
        if k in local:
            assert tuple(local[k].shape) == tuple(t.shape), k
    dist = mp.hf_to_mcore_state_dict(hf, s, 256, tied=False, naming="dist")
    sharded = model.sharded_state_dict()
    ckpt_keys = {v.key for k, v in sharded.items() if not k.endswith("_extra_state")}
    assert set(dist) == ckpt_keys
    keys_map = model.decoder.layers[0].submodules_config.sharded_state_dict_keys_map
    te = mp.hf_layer_to_mcore({k: hf["model.layers.0." + k] for k in mp.HF_LAYER_KEYS}, s, "te")
    mapped = set()
    for name in mp.mcore_layer_keys("local"):
        for src, dst in keys_map.items():
            if name.startswith(src):
                name = dst + name[len(src):]
        mapped.add(name)
    assert mapped == set(te)


# ------------------------------------------------------------------------------ config
def _llama_cfg(**kw):
    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=64, intermediate_size=96,
               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
               max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False)
    cfg.update(kw)
    return cfg


def test_arch_from_config_fields():
    """Every megatron field comes from the HF config; head_dim defaults to hidden/heads, vocab is padded."""
    arch, shape = arch_from_hf_config(_llama_cfg(), tp=2)
    assert arch.kv_channels == 16 and shape.head_dim == 16
    assert arch.num_query_groups == 2 and arch.rotary_base == 500000.0
    assert arch.untie_embeddings_and_output_weights is True and arch.padded_vocab_size == 512
    arch, _ = arch_from_hf_config(_llama_cfg(head_dim=24, tie_word_embeddings=True))
    assert arch.kv_channels == 24 and arch.untie_embeddings_and_output_weights is False


@pytest.mark.parametrize("style", ["legacy", "v5"])
def test_llama3_rope_scaling_both_config_styles(style):
    """Llama-3 RoPE scaling maps to megatron's rope_scaling + factor from either config style."""
    params = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192}
    cfg = _llama_cfg(rope_scaling=params) if style == "legacy" else _llama_cfg(
        rope_parameters=dict(params, rope_theta=500000.0))
    assert rope_settings(cfg) == dict(rotary_base=500000.0, rope_scaling=True, rope_scaling_factor=32.0,
                                      rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                                      rope_original_max_position_embeddings=8192)
    plain = rope_settings(_llama_cfg())
    assert (plain["rotary_base"], plain["rope_scaling"]) == (500000.0, False)


def test_llama3_rope_factors_other_than_megatrons_are_kept():
    """Non-default llama3 factors (megatron-core hard-codes 1/4/8192) are read, not refused, and
    survive the arch -> config.json -> arch round trip."""
    params = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0,
              "original_max_position_embeddings": 64}
    arch, shape = arch_from_hf_config(_llama_cfg(rope_scaling=params))
    assert (arch.rope_scaling_factor, arch.rope_low_freq_factor, arch.rope_high_freq_factor,
            arch.rope_original_max_position_embeddings) == (4.0, 2.0, 8.0, 64)
    cfg = hf_config_from_arch(arch, shape.vocab_size, shape.num_layers, "float32")
    assert cfg["rope_scaling"] == params
    assert arch_from_hf_config(cfg)[0] == arch


@pytest.mark.parametrize(
    "change,needle",
    [
        (dict(model_type="mistral", architectures=["MistralForCausalLM"]), "unsupported architecture"),
        (dict(model_type="gpt2", architectures=["GPT2LMHeadModel"]), "unsupported architecture"),
        (dict(attention_bias=True), "attention_bias"),
        (dict(mlp_bias=True), "mlp_bias"),
        (dict(hidden_act="gelu"), "hidden_act"),
        (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "yarn"),
        (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "linear"),
        (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0}),
         "low_freq_factor < high_freq_factor"),
        (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 0}),
         "original_max_position_embeddings"),
        (dict(rope_scaling={"rope_type": "llama3", "factor": -2.0}), "factor"),
        (dict(rope_scaling={"rope_type": "llama3"}), "without a 'factor'"),
        (dict(num_key_value_heads=3), "not divisible"),
        (dict(hidden_size=None), "hidden_size"),
    ],
)
def test_unsupported_configs_are_refused_in_one_line(change, needle):
    """Configs megatron-core cannot represent exactly raise a one-line UsageError naming the problem."""
    with pytest.raises(UsageError) as exc:
        arch_from_hf_config(_llama_cfg(**change))
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def test_parallel_layout_checks():
    """A target TP must divide heads, ffn and padded vocabulary; PP must not exceed the layers."""
    arch, _ = arch_from_hf_config(_llama_cfg(num_attention_heads=4, num_key_value_heads=2))
    arch.check_parallel(2, 2, what="target")
    with pytest.raises(UsageError, match="attention heads"):
        arch.check_parallel(3, 1, what="target")
    with pytest.raises(UsageError, match="PP 3"):
        arch.check_parallel(1, 3, what="target")


def test_config_round_trip():
    """hf_config_from_arch(arch_from_hf_config(cfg)) describes the same model (incl. RoPE scaling)."""
    cfg = _llama_cfg(head_dim=24, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    arch, shape = arch_from_hf_config(cfg)
    again, shape2 = arch_from_hf_config(hf_config_from_arch(arch, shape.vocab_size, shape.num_layers, "float32"))
    assert again == arch and shape2 == shape
