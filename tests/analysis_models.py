"""Tiny in-process models for the analysis tests (CPU, fp32, random weights).

Weights are drawn larger than megatron's default init so that every layer changes the
residual stream visibly (differences would show).
"""

from __future__ import annotations

import torch

VOCAB = 257  # ByteTokenizer


def arch(num_layers: int, hidden: int = 32, loop=None, seq: int = 64):
    from megatron_growloop.model.arch import Arch

    return Arch(num_layers=num_layers, hidden_size=hidden, num_attention_heads=4, num_query_groups=2,
                ffn_hidden_size=2 * hidden, kv_channels=hidden // 4, seq_length=seq, max_position_embeddings=256,
                rotary_base=10000.0, norm_epsilon=1e-5, padded_vocab_size=384, loop=loop)


def build(num_layers: int = 4, loop=None, seed: int = 0, hidden: int = 32):
    """A randomly initialised GrowLoopGPTModel (needs the dist_1rank fixture)."""
    from megatron_growloop.model.gpt import build_inference_model

    torch.manual_seed(seed)
    model = build_inference_model(arch(num_layers, hidden, loop))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layer_norm_weight") or name.endswith("final_layernorm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))
    model.eval()
    return model


def unrolled_copy(looped, seed: int = 0):
    """A plain model with one untied layer per application of ``looped`` (same weights)."""
    sched = list(looped.schedule)
    plain = build(len(sched), None, seed, looped.config.hidden_size)
    src = looped.state_dict()
    dst = plain.state_dict()
    for k in dst:
        if dst[k] is None or not torch.is_tensor(dst[k]):
            continue
        if k.startswith("decoder.layers."):
            parts = k.split(".")
            p = int(parts[2])
            parts[2] = str(sched[p])
            dst[k] = src[".".join(parts)].clone()
        elif k in src:
            dst[k] = src[k].clone()
    plain.load_state_dict(dst)
    return plain


def analysis_model(model, label="tiny"):
    from megatron_growloop.analysis.access import AnalysisModel
    from megatron_growloop.eval.loader import describe_model

    return AnalysisModel(model, vocab_size=VOCAB, info=describe_model(model), label=label)


def prompt_set(n: int = 3, seq_len: int = 40, seed: int = 0):
    """Random byte sequences of varying length (some shorter than others: exercises padding)."""
    from megatron_growloop.analysis.prompts import PromptSet

    g = torch.Generator().manual_seed(seed)
    seqs = []
    for i in range(n):
        L = seq_len - 7 * (i % 3)
        seqs.append(torch.randint(0, 256, (L,), generator=g).tolist())
    return PromptSet(seqs, "random bytes")
