"""Model presets: the exact Hugging Face SmolLM and Llama-3 configurations plus CPU-sized ones.

SmolLM (v1) is the architecture family of the paper (§3.2); the SmolLM2 presets
differ only in RoPE theta and context length.  The Llama-3.x presets carry the
public ``config.json`` figures of ``meta-llama/Llama-3.2-1B``, ``-3.2-3B``,
``-3.1-8B`` and ``-3.1-70B`` (128256-token vocabulary, RoPE theta 500000 with
llama3 frequency scaling: factor 32 for 3.2, 8 for 3.1, low/high frequency
factors 1/4, original context 8192); their ``seq_length`` is the 8192-token
pretraining context.  Every field can be overridden with the Megatron-LM flag of
the same name (``--num-layers`` etc.).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Dict

from ..errors import UsageError


@dataclass(frozen=True)
class ModelPreset:
    """Architecture of a Llama-family decoder (RMSNorm, SwiGLU, RoPE, GQA, no biases)."""

    name: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    ffn_hidden_size: int
    seq_length: int
    max_position_embeddings: int
    rotary_base: float = 10000.0
    norm_epsilon: float = 1e-5
    vocab_size: int = 49152
    tie_embeddings: bool = True
    init_method_std: float = 0.02
    hf_model_id: str = ""
    rope_scaling: bool = False
    rope_scaling_factor: float = 8.0

    @property
    def kv_channels(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def to_dict(self) -> dict:
        return asdict(self)

    def replace(self, **kw) -> "ModelPreset":
        return replace(self, **kw)


PRESETS: Dict[str, ModelPreset] = {
    p.name: p
    for p in [
        # HuggingFaceTB/SmolLM-135M, -360M, -1.7B (config.json): the paper's backbones.
        ModelPreset("smollm-135m", 30, 576, 9, 3, 1536, 2048, 2048, hf_model_id="HuggingFaceTB/SmolLM-135M"),
        ModelPreset("smollm-360m", 32, 960, 15, 5, 2560, 2048, 2048, hf_model_id="HuggingFaceTB/SmolLM-360M"),
        ModelPreset("smollm-1.7b", 24, 2048, 32, 32, 8192, 2048, 2048, hf_model_id="HuggingFaceTB/SmolLM-1.7B"),
        # HuggingFaceTB/SmolLM2-*: same shapes, larger RoPE theta and context.
        ModelPreset("smollm2-135m", 30, 576, 9, 3, 1536, 2048, 8192, rotary_base=100000.0,
                    hf_model_id="HuggingFaceTB/SmolLM2-135M"),
        ModelPreset("smollm2-360m", 32, 960, 15, 5, 2560, 2048, 8192, rotary_base=100000.0,
                    hf_model_id="HuggingFaceTB/SmolLM2-360M"),
        ModelPreset("smollm2-1.7b", 24, 2048, 32, 32, 8192, 2048, 8192, rotary_base=130000.0,
                    hf_model_id="HuggingFaceTB/SmolLM2-1.7B"),
        # meta-llama/Llama-3.2-1B, -3.2-3B (tied), Llama-3.1-8B, -70B (untied) (config.json): GQA with
        # 8 key/value heads, head_dim = hidden / heads (64 for 1B, 128 otherwise), rms_norm_eps 1e-5.
        ModelPreset("llama3.2-1b", 16, 2048, 32, 8, 8192, 8192, 131072, rotary_base=500000.0, vocab_size=128256,
                    hf_model_id="meta-llama/Llama-3.2-1B", rope_scaling=True, rope_scaling_factor=32.0),
        ModelPreset("llama3.2-3b", 28, 3072, 24, 8, 8192, 8192, 131072, rotary_base=500000.0, vocab_size=128256,
                    hf_model_id="meta-llama/Llama-3.2-3B", rope_scaling=True, rope_scaling_factor=32.0),
        ModelPreset("llama3.1-8b", 32, 4096, 32, 8, 14336, 8192, 131072, rotary_base=500000.0, vocab_size=128256,
                    tie_embeddings=False, hf_model_id="meta-llama/Llama-3.1-8B", rope_scaling=True,
                    rope_scaling_factor=8.0),
        ModelPreset("llama3.1-70b", 80, 8192, 64, 8, 28672, 8192, 131072, rotary_base=500000.0, vocab_size=128256,
                    tie_embeddings=False, hf_model_id="meta-llama/Llama-3.1-70B", rope_scaling=True,
                    rope_scaling_factor=8.0),
        # CPU-sized: the same architecture family at toy width.
        ModelPreset("tiny", 4, 64, 4, 2, 176, 128, 512),
        ModelPreset("small", 8, 128, 4, 2, 352, 256, 1024),
    ]
}


def get_preset(name: str) -> ModelPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise UsageError(
            f"unknown --model-preset {name!r}; choose one of: {', '.join(PRESETS)}"
        ) from None
