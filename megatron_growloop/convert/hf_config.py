"""Hugging Face Llama ``config.json`` <-> the architecture record :class:`~megatron_growloop.model.arch.Arch` (pure).

:func:`arch_from_hf_config` validates the config and refuses, with a one-line
:class:`UsageError`, everything megatron-core 0.16.1's ``GPTModel`` (local/TE spec,
RMSNorm, SwiGLU, RoPE) cannot represent exactly.  :func:`hf_config_from_arch` is
the inverse used on export.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

from ..errors import UsageError
from ..model.arch import (
    LLAMA3_HIGH_FREQ_FACTOR,
    LLAMA3_LOW_FREQ_FACTOR,
    LLAMA3_ORIGINAL_MAX_POSITIONS,
    Arch,
    pad_vocab_size,
)
from .mapping import LlamaShape

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
SUPPORTED_MODEL_TYPES = ("llama",)
LOOP_KEY = "megatron_growloop"  # config.json entry recording the loop of an exported looped model

# transformers' defaults for ``rope_type: llama3`` keys a config may omit (megatron-core's too).
LLAMA3_ROPE_DEFAULTS = {"low_freq_factor": LLAMA3_LOW_FREQ_FACTOR, "high_freq_factor": LLAMA3_HIGH_FREQ_FACTOR,
                        "original_max_position_embeddings": LLAMA3_ORIGINAL_MAX_POSITIONS}
DEFAULT_SEQ_LENGTH = 2048


def rope_settings(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """The RoPE fields of the architecture record from an HF config: ``rotary_base``,
    ``rope_scaling`` and, for llama3 scaling, its factor, low/high frequency factors and
    original context length (any valid values: the model applies all four, see
    :mod:`megatron_growloop.model.rope`).

    Reads both the transformers-5 ``rope_parameters`` and the older
    ``rope_theta``/``rope_scaling`` keys."""
    params = cfg.get("rope_parameters") or {}
    legacy = cfg.get("rope_scaling") or {}
    if not isinstance(params, dict) or not isinstance(legacy, dict):
        raise UsageError("config.json: rope_parameters/rope_scaling must be objects (per-layer-type RoPE is not supported)")
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    merged = dict(legacy)
    merged.update({k: v for k, v in params.items() if k != "rope_theta"})
    rope_type = merged.get("rope_type", merged.get("type")) or "default"
    out = {"rotary_base": float(theta), "rope_scaling": False, "rope_scaling_factor": 8.0,
           "rope_low_freq_factor": LLAMA3_LOW_FREQ_FACTOR, "rope_high_freq_factor": LLAMA3_HIGH_FREQ_FACTOR,
           "rope_original_max_position_embeddings": LLAMA3_ORIGINAL_MAX_POSITIONS}
    if rope_type == "default":
        return out
    if rope_type != "llama3":
        raise UsageError(
            f"config.json: RoPE scaling type {rope_type!r} is not supported; supported: default (none) and llama3"
        )
    factor = merged.get("factor")
    if factor is None:
        raise UsageError("config.json: llama3 RoPE scaling without a 'factor'")
    values = {key: merged.get(key, default) for key, default in LLAMA3_ROPE_DEFAULTS.items()}
    for key, v in [("factor", factor), *values.items()]:
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
            raise UsageError(f"config.json: llama3 RoPE scaling needs a positive number for {key}, got {v!r}")
    low, high = float(values["low_freq_factor"]), float(values["high_freq_factor"])
    if low >= high:
        raise UsageError(
            f"config.json: llama3 RoPE scaling needs low_freq_factor < high_freq_factor, got {low:g} and {high:g}"
        )
    orig = values["original_max_position_embeddings"]
    if float(orig) != int(orig):
        raise UsageError(f"config.json: llama3 original_max_position_embeddings must be an integer, got {orig!r}")
    out.update(rope_scaling=True, rope_scaling_factor=float(factor), rope_low_freq_factor=low,
               rope_high_freq_factor=high, rope_original_max_position_embeddings=int(orig))
    return out


def arch_from_hf_config(
    cfg: Dict[str, Any],
    make_vocab_size_divisible_by: int = 128,
    tp: int = 1,
    seq_length: Optional[int] = None,
) -> Tuple[Arch, LlamaShape]:
    """Validate an HF Llama config; return ``(arch, shape)`` (``shape`` describes the HF tensors)."""
    archs = cfg.get("architectures") or []
    model_type = cfg.get("model_type")
    bad_arch = [a for a in archs if a not in SUPPORTED_ARCHITECTURES]
    if model_type not in SUPPORTED_MODEL_TYPES or bad_arch:
        what = bad_arch[0] if bad_arch else f"model_type {model_type!r}"
        raise UsageError(
            f"unsupported architecture {what}; supported: LlamaForCausalLM (model_type 'llama': "
            "SmolLM v1/v2, Llama 2/3)"
        )
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
        v = cfg.get(key)
        if not isinstance(v, int) or v < 1:
            raise UsageError(f"config.json: {key} must be a positive integer, got {v!r}")
    if cfg.get("hidden_act", "silu") != "silu":
        raise UsageError(f"config.json: hidden_act {cfg.get('hidden_act')!r} is not supported; Llama uses silu")
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key):
            raise UsageError(f"config.json: {key}=true is not supported (megatron Llama layers have no biases)")
    if float(cfg.get("partial_rotary_factor", 1.0)) != 1.0:
        raise UsageError("config.json: partial_rotary_factor != 1 is not supported")
    if cfg.get("layer_types") and any(t != "full_attention" for t in cfg["layer_types"]):
        raise UsageError("config.json: layer_types other than full_attention (sliding window) are not supported")
    h = cfg["hidden_size"]
    nh = cfg["num_attention_heads"]
    ng = cfg.get("num_key_value_heads") or nh
    if nh % ng:
        raise UsageError(f"config.json: num_attention_heads {nh} is not divisible by num_key_value_heads {ng}")
    head_dim = cfg.get("head_dim")
    if head_dim is None:
        if h % nh:
            raise UsageError(f"config.json: hidden_size {h} is not divisible by num_attention_heads {nh} and no head_dim is given")
        head_dim = h // nh
    rope = rope_settings(cfg)
    vocab = cfg["vocab_size"]
    max_pos = int(cfg.get("max_position_embeddings", 2048))
    shape = LlamaShape(
        num_layers=cfg["num_hidden_layers"],
        hidden_size=h,
        num_attention_heads=nh,
        num_query_groups=ng,
        head_dim=int(head_dim),
        ffn_hidden_size=cfg["intermediate_size"],
        vocab_size=vocab,
    )
    arch = Arch(
        num_layers=shape.num_layers,
        hidden_size=h,
        num_attention_heads=nh,
        num_query_groups=ng,
        ffn_hidden_size=shape.ffn_hidden_size,
        kv_channels=shape.head_dim,
        seq_length=int(seq_length) if seq_length else min(max_pos, DEFAULT_SEQ_LENGTH),
        max_position_embeddings=max_pos,
        **rope,
        norm_epsilon=float(cfg.get("rms_norm_eps", 1e-6)),
        init_method_std=float(cfg.get("initializer_range", 0.02)),
        # transformers' LlamaConfig default is untied.
        untie_embeddings_and_output_weights=not bool(cfg.get("tie_word_embeddings", False)),
        padded_vocab_size=pad_vocab_size(vocab, make_vocab_size_divisible_by, tp),
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
    )
    return arch, shape


def shape_from_arch(arch: Arch, vocab_size: int) -> LlamaShape:
    return LlamaShape(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        head_dim=arch.kv_channels,
        ffn_hidden_size=arch.ffn_hidden_size,
        vocab_size=vocab_size,
    )


# Keys of an imported config.json that describe the model but not the weights; kept on export.
PASSTHROUGH_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "pretraining_tp", "use_cache")


def hf_config_from_arch(
    arch: Arch,
    vocab_size: int,
    num_hidden_layers: int,
    dtype: str,
    source_config: Optional[Dict[str, Any]] = None,
    loop_entry: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """An HF ``LlamaForCausalLM`` config.json (written with the widely read legacy
    ``rope_theta``/``rope_scaling`` keys, which transformers 5 maps to ``rope_parameters``)."""
    cfg: Dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": arch.hidden_size,
        "intermediate_size": arch.ffn_hidden_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": arch.num_attention_heads,
        "num_key_value_heads": arch.num_query_groups,
        "head_dim": arch.kv_channels,
        "hidden_act": "silu",
        "max_position_embeddings": arch.max_position_embeddings,
        "initializer_range": arch.init_method_std,
        "rms_norm_eps": arch.norm_epsilon,
        "rope_theta": arch.rotary_base,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": arch.tied,
        "vocab_size": vocab_size,
        "torch_dtype": dtype,
    }
    if arch.rope_scaling:
        cfg["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": float(arch.rope_scaling_factor),
            "low_freq_factor": float(arch.rope_low_freq_factor),
            "high_freq_factor": float(arch.rope_high_freq_factor),
            "original_max_position_embeddings": int(arch.rope_original_max_position_embeddings),
        }
    for key in PASSTHROUGH_KEYS:
        if source_config and source_config.get(key) is not None:
            cfg[key] = source_config[key]
    if loop_entry:
        cfg[LOOP_KEY] = loop_entry
    return cfg
