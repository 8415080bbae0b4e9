"""Every private megatron-core attribute the package relies on, named in one place, so that a
megatron-core upgrade that moves or changes one fails here, loudly, instead of somewhere deep."""

from __future__ import annotations

import inspect


def test_rotary_embedding_apply_scaling_takes_all_llama3_factors():
    """model/rope.py rescales RoPE frequencies with ``RotaryEmbedding._apply_scaling`` and passes
    all four Llama-3 parameters (megatron-core's ``__init__`` passes only the factor)."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    params = inspect.signature(RotaryEmbedding._apply_scaling).parameters
    for name in ("freqs", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
        assert name in params, name
