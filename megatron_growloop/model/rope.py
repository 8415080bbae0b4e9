"""Llama-3 RoPE frequency scaling with all four of its parameters.

megatron-core 0.16.1's ``RotaryEmbedding.__init__``
(``megatron/core/models/common/embeddings/rotary_pos_embedding.py``) scales the inverse
frequencies with ``self._apply_scaling(inv_freq, factor=rope_scaling_factor)`` and so
always uses ``low_freq_factor=1``, ``high_freq_factor=4`` and
``original_max_position_embeddings=8192``, although ``_apply_scaling`` itself (adapted from
transformers' ``_compute_llama3_parameters``) takes all four.  The public Llama-3.x
checkpoints use exactly those three values, but a ``config.json`` may say otherwise.

:func:`apply_llama3_rope_scaling` is called by the model builder on a model built *without*
megatron's scaling: it rescales the unscaled inverse frequencies with megatron's own
``_apply_scaling`` and every factor of the architecture record.  ``inv_freq`` is a plain
attribute (not a buffer), so checkpoints are unaffected; it must run before the first
forward pass (``RotaryEmbedding.forward`` is ``lru_cache``-d).
"""

from __future__ import annotations


def apply_llama3_rope_scaling(
    model,
    factor: float,
    low_freq_factor: float,
    high_freq_factor: float,
    original_max_position_embeddings: int,
) -> None:
    """Scale ``model.rotary_pos_emb.inv_freq`` (megatron-core ``GPTModel``) Llama-3 style."""
    rope = getattr(model, "rotary_pos_emb", None)
    if rope is None:
        return
    rope.inv_freq = rope._apply_scaling(  # megatron-core private hook (tests/test_megatron_private_hooks.py)
        rope.inv_freq,
        factor=float(factor),
        low_freq_factor=float(low_freq_factor),
        high_freq_factor=float(high_freq_factor),
        original_max_position_embeddings=int(original_max_position_embeddings),
    )
