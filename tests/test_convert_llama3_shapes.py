"""Conversion of the Llama-3 presets' features on a random tiny model: llama3 RoPE scaling with
factors megatron-core does not hard-code (original context 64, low/high frequency factors 2/8),
untied embeddings and the 128256-token Llama-3 vocabulary.  Logits equal transformers'."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megatron_growloop.convert import hf_to_mcore, mcore_to_hf
from megatron_growloop.convert.fixtures import write_random_llama
from megatron_growloop.convert.verify import compare_logits

VOCAB = 128256  # Llama 3's
ROPE = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0,
        "original_max_position_embeddings": 64}
TOL = 1e-4


@pytest.fixture(scope="module")
def llama3_shapes(tmp_path_factory, dist_1rank):
    root = tmp_path_factory.mktemp("llama3_shapes")
    # theta 10000 and head_dim 16 put wavelengths 6.3, 19.9, 62.8, ... on both sides of the
    # short original context: high frequencies unchanged, one smoothed, the rest divided by 4.
    hf = write_random_llama(root / "hf", seed=5, vocab_size=VOCAB, hidden_size=64, head_dim=16,
                            num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                            num_hidden_layers=2, rope_theta=10000.0, rope_scaling=dict(ROPE),  # transformers adds keys to it
                            max_position_embeddings=1024, tie_word_embeddings=False)
    ckpt = hf_to_mcore(str(hf), str(root / "ckpt"))
    return root, hf, ckpt


def _hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def test_llama3_features_convert_and_logits_equal_transformers(llama3_shapes):
    """The converted model uses transformers' scaled inverse frequencies (not megatron-core's
    1/4/8192 ones), keeps the untied 128k-row head, and its logits on 300 tokens (past the
    64-token original context) match transformers within 1e-4 relative."""
    from megatron_growloop.model.generate import logits
    from megatron_growloop.training.inference import load_model

    root, hf_dir, ckpt = llama3_shapes
    model, meta, _ = load_model(ckpt)
    arch = meta["arch"]
    assert arch["padded_vocab_size"] == VOCAB and arch["untie_embeddings_and_output_weights"] is True
    assert (arch["rope_scaling"], arch["rope_scaling_factor"], arch["rope_low_freq_factor"],
            arch["rope_high_freq_factor"], arch["rope_original_max_position_embeddings"]) == (True, 4.0, 2.0, 8.0, 64)
    hf = _hf(hf_dir)
    ours_freq = model.rotary_pos_emb.inv_freq
    assert torch.allclose(ours_freq, hf.model.rotary_emb.inv_freq.to(ours_freq), rtol=1e-6, atol=0)
    unscaled = 1.0 / (10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    megatron_default = model.rotary_pos_emb._apply_scaling(unscaled, factor=4.0)  # 1/4/8192
    assert not torch.allclose(ours_freq, megatron_default)
    assert model.output_layer.weight.shape == (VOCAB, 64)
    tokens = torch.randint(0, VOCAB, (2, 300), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(tokens).logits
    err = compare_logits(logits(model, tokens), ref)
    assert err["max_rel_error"] <= TOL, err


def test_llama3_features_export_round_trip(llama3_shapes):
    """Export writes the same llama3 RoPE block and an untied 128256-row head; every tensor is
    bitwise the imported one."""
    from safetensors.torch import load_file

    root, hf_dir, ckpt = llama3_shapes
    out = Path(mcore_to_hf(ckpt, str(root / "back")))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_scaling"] == ROPE and cfg["vocab_size"] == VOCAB and cfg["tie_word_embeddings"] is False
    a, b = load_file(str(Path(hf_dir) / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
