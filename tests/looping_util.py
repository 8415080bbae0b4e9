"""Helpers for the looping tests: tiny in-process models and their untied copies."""

from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch

VOCAB = 128
SEQ = 16


def tiny_arch(num_layers: int, loop=None, **extra):
    """An :class:`Arch` with the tiny preset's width (``extra`` overrides fields)."""
    from megatron_growloop.model.arch import Arch

    kw = dict(num_layers=num_layers, hidden_size=64, num_attention_heads=4, num_query_groups=2,
              ffn_hidden_size=176, kv_channels=16, seq_length=SEQ, max_position_embeddings=64,
              padded_vocab_size=VOCAB, norm_epsilon=1e-5, init_method_std=0.02, loop=loop)
    kw.update(extra)
    return Arch(**kw)


def build(num_layers: int, loop=None, repeat_blocks: Sequence[str] = (), seed: int = 0, **extra):
    """A seeded :class:`GrowLoopGPTModel` (PP=1) with the tiny preset's width; ``extra``:
    architecture fields, or implementation settings (``recompute_*``, ``attention_backend``, ...)."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_growloop.looping.spec import RepeatBlock
    from megatron_growloop.model.gpt import build_model
    from megatron_growloop.model.implementation import Implementation
    from megatron_growloop.model.parallel import ParallelLayout

    impl = {k: extra.pop(k) for k in list(extra) if k in Implementation.__dataclass_fields__}
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed, force_reset_rng=True)
    return build_model(tiny_arch(num_layers, loop, **extra), ParallelLayout(), Implementation(**impl),
                       [RepeatBlock.parse(b) for b in repeat_blocks])


def untied_copy(src, **extra):
    """A plain model of depth ``len(src.schedule)`` whose layer p is a copy of ``src``'s
    unique layer ``schedule[p]`` (embeddings, final norm and head copied too)."""
    schedule = src.schedule
    dst = build(len(schedule), None, seed=123, **extra)
    sd_src = src.state_dict()
    new = {}
    for key in dst.state_dict():
        if key.startswith("decoder.layers."):
            _, _, pos, rest = key.split(".", 3)
            new[key] = sd_src[f"decoder.layers.{schedule[int(pos)]}.{rest}"]
        else:
            new[key] = sd_src[key]
    dst.load_state_dict(new, strict=True)
    return dst


def batch(seed: int = 0, b: int = 2, s: int = SEQ) -> Tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (b, s), generator=g)
    pos = torch.arange(s).unsqueeze(0).expand(b, s)
    return tokens, pos


def loss_and_grads(model, seed: int = 0) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Per-token losses of one batch and the gradients of their sum (training mode)."""
    tokens, pos = batch(seed)
    labels = torch.roll(tokens, -1, dims=1)
    model.train()
    model.zero_grad(set_to_none=True)
    losses = model(tokens, pos, None, labels=labels)
    losses.sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return losses.detach(), grads


def summed_copy_grads(untied_grads: Dict[str, torch.Tensor], schedule: Sequence[int]) -> Dict[str, torch.Tensor]:
    """Gradients of the untied model summed over the copies of each unique layer."""
    out: Dict[str, torch.Tensor] = {}
    for name, g in untied_grads.items():
        if name.startswith("decoder.layers."):
            _, _, pos, rest = name.split(".", 3)
            name = f"decoder.layers.{schedule[int(pos)]}.{rest}"
        out[name] = out[name] + g if name in out else g.clone()
    return out


def max_abs_diff(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b), (sorted(set(a) ^ set(b)))
    return max(float((a[k] - b[k]).abs().max()) for k in a)
