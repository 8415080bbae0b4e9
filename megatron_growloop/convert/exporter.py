"""megatron_growloop checkpoint -> Hugging Face ``LlamaForCausalLM`` directory.

Reads the model tensors straight from the distributed checkpoint (whatever TP/PP
and layer spec wrote it; optimizer state is not read), removes the vocabulary
padding and unrolls a looped model along its schedule.  The loop is recorded in
``config.json`` so that :func:`~megatron_growloop.convert.importer.hf_to_mcore`
restores the tied model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from transformers import AutoTokenizer

from ..data.tokenizer import SMOLLM2_ALIASES, smollm2_tokenizer_dir
from ..errors import UsageError
from ..looping.spec import RepeatBlock
from ..training import checkpointing
from ..training.inference import checkpoint_arch
from . import mapping
from .hf_config import hf_config_from_arch, shape_from_arch
from .hf_io import (
    DEFAULT_MAX_SHARD_BYTES,
    GENERATION_CONFIG,
    TOKENIZER_FILES,
    atomic_output_dir,
    check_new_output,
    dtype_name,
    generation_config,
    parse_dtype,
    write_safetensors,
)
from .looped import loop_entry
from .megatron_io import load_model_tensors


def _vocab_size(meta: Dict[str, Any], override: Optional[int]) -> int:
    padded = int(meta["arch"]["padded_vocab_size"])
    for v in (override, (meta.get("hf") or {}).get("vocab_size"), (meta.get("tokenizer") or {}).get("vocab_size")):
        if v:
            if int(v) > padded:
                raise UsageError(f"vocabulary {v} exceeds the checkpoint's padded vocabulary {padded}")
            return int(v)
    return padded


def _save_tokenizer(meta: Dict[str, Any], ckpt_dir: Path, dest: Path) -> Optional[str]:
    """Copy the checkpoint's tokenizer files into ``dest``; return where they came from."""
    tok = meta.get("tokenizer") or {}
    if tok.get("type") not in ("HuggingFaceTokenizer", "HFTokenizer"):
        return None
    candidates = [ckpt_dir / "tokenizer"]
    model = tok.get("model")
    if model is None or str(model).lower() in SMOLLM2_ALIASES:
        candidates.append(smollm2_tokenizer_dir())
    elif Path(model).is_dir():
        candidates.append(Path(model))
    elif Path(model).is_file() and Path(model).name == "tokenizer.json":
        shutil.copy2(model, dest / "tokenizer.json")
        return str(model)
    elif Path(model).is_file() and Path(model).suffix == ".gguf":

        AutoTokenizer.from_pretrained(str(Path(model).parent), gguf_file=Path(model).name).save_pretrained(str(dest))
        return str(model)
    for c in candidates:
        files = [c / n for n in TOKENIZER_FILES if (c / n).is_file()]
        if files:
            for f in files:
                shutil.copy2(f, dest / f.name)
            return str(c)
    return None


def mcore_to_hf(
    ckpt: str,
    out_dir: str,
    dtype: Optional[str] = None,
    loop_repeats: Optional[int] = None,
    repeat_blocks: Sequence[str] = (),
    vocab_size: Optional[int] = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> str:
    """Export ``ckpt`` (a save directory or ``iter_*``) as an HF directory ``out_dir``.

    ``dtype`` defaults to the dtype of the HF model it was imported from, else float32.
    ``loop_repeats``/``repeat_blocks`` export another schedule (k of a loop, or repeated
    blocks); the unrolled layers are recorded in ``config.json["megatron_growloop"]``.
    Returns ``out_dir``.  Nothing is written when anything is refused.
    """
    out = check_new_output(out_dir)
    meta = checkpointing.read_metadata(ckpt)
    ckpt_dir = Path(meta["_dir"])
    if not meta.get("arch"):
        raise UsageError(f"checkpoint {str(ckpt_dir)!r} has no architecture record (arch) in growloop.json")
    arch = checkpoint_arch(meta, loop_repeats)
    hf_meta = meta.get("hf") or {}
    out_dtype = parse_dtype(dtype or hf_meta.get("dtype") or "float32")
    vocab = _vocab_size(meta, vocab_size)
    blocks = [RepeatBlock.parse(b) for b in repeat_blocks]
    schedule = arch.schedule(blocks)
    shape = shape_from_arch(arch, vocab)
    tied = arch.tied

    tensors = load_model_tensors(str(ckpt_dir))
    stacked = tensors.get(mapping.LAYER_PREFIX + mapping.MC_QKV)
    if stacked is None or stacked.shape[0] != arch.num_layers:
        raise UsageError(
            f"checkpoint {str(ckpt_dir)!r}: model tensors do not match its architecture record "
            f"({arch.num_layers} layers)"
        )
    if not tied and mapping.MC_OUTPUT not in tensors:
        raise UsageError(f"checkpoint {str(ckpt_dir)!r} records untied embeddings but has no output_layer.weight")
    hf_sd = mapping.mcore_to_hf_state_dict(tensors, shape, tied, naming="dist", schedule=schedule)
    del tensors
    hf_sd = {k: v.to(out_dtype) for k, v in hf_sd.items()}

    entry = None
    if schedule != list(range(arch.num_layers)):
        loop = str(arch.loop) if arch.loop is not None and not blocks else None
        entry = loop_entry(loop, arch.num_layers, schedule)
    cfg = hf_config_from_arch(
        arch, vocab, len(schedule), dtype_name(out_dtype), source_config=hf_meta.get("config"), loop_entry=entry
    )
    with atomic_output_dir(out) as tmp:
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        write_safetensors(tmp, hf_sd, max_shard_bytes)
        gen = hf_meta.get("generation_config") or generation_config(cfg)
        if gen:
            (tmp / GENERATION_CONFIG).write_text(json.dumps(gen, indent=2) + "\n")
        _save_tokenizer(meta, ckpt_dir, tmp)
    return str(out)
