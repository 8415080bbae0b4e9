"""Hugging Face Llama (directory or GGUF) -> megatron_growloop checkpoint.

The checkpoint is written at TP=1/PP=1 through megatron's ``dist_checkpointing``
(global tensors), so it loads at any TP/PP: megatron reshards on load.  Target
TP/PP are checked up front and pad the vocabulary to a multiple of
``make_vocab_size_divisible_by * TP`` (Megatron-LM's rule), which keeps the
embedding splittable at that TP.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from .. import accounting
from ..errors import UsageError
from ..growth.operators import initial_lineage
from ..training import checkpointing
from ..training.save_strategy import SyncSaveStrategy
from . import mapping
from .hf_config import LOOP_KEY, arch_from_hf_config
from .hf_io import atomic_output_dir, check_new_output, check_tensors, open_hf
from .looped import repeated_positions, restore_plan
from .megatron_io import build_single_rank_model, ensure_single_process

TOKENIZER_SUBDIR = "tokenizer"
ITERATION = 0


def _check_loop_copies(src, plan: Dict[str, Any]) -> None:
    """Every repeated copy of a unique layer must equal its first copy bitwise."""
    for u, positions in repeated_positions(plan["schedule"]).items():
        for name in mapping.HF_LAYER_KEYS:
            ref = src.get(f"model.layers.{positions[0]}.{name}")
            for p in positions[1:]:
                if not torch.equal(ref, src.get(f"model.layers.{p}.{name}")):
                    raise UsageError(
                        f"--hf {src.path!r}: layer {p} ({name}) differs from layer {positions[0]}, so the unrolled "
                        f"loop {plan['loop']} is no longer tied; pass --ignore-loop to import it as an ordinary "
                        f"{len(plan['schedule'])}-layer model"
                    )


def _copy_into(param: torch.Tensor, value: torch.Tensor, name: str) -> None:
    if tuple(param.shape) != tuple(value.shape):
        raise UsageError(f"internal mapping error: {name} expects {tuple(param.shape)}, got {tuple(value.shape)}")
    with torch.no_grad():
        param.copy_(value)


def hf_to_mcore(
    hf_path: str,
    out_dir: str,
    target_tensor_parallel_size: int = 1,
    target_pipeline_model_parallel_size: int = 1,
    make_vocab_size_divisible_by: int = 128,
    seq_length: Optional[int] = None,
    ignore_loop: bool = False,
) -> str:
    """Convert an HF Llama-family model to a megatron_growloop checkpoint in ``out_dir``
    (a save directory: ``iter_0000000/`` + ``latest_checkpointed_iteration.txt``).

    Returns the ``iter_*`` directory.  Nothing is written when anything is refused.
    """
    out = check_new_output(out_dir)
    tp, pp = int(target_tensor_parallel_size), int(target_pipeline_model_parallel_size)
    src = open_hf(hf_path)
    try:
        arch, shape = arch_from_hf_config(src.config, make_vocab_size_divisible_by, tp, seq_length)
        tied = arch.tied
        check_tensors(src, shape, tied)
        layer_source = list(range(shape.num_layers))
        entry = src.config.get(LOOP_KEY)
        if entry is not None and not ignore_loop:
            plan = restore_plan(entry, shape.num_layers)
            _check_loop_copies(src, plan)
            arch = replace(arch, num_layers=plan["num_unique_layers"], loop=plan["loop"])
            layer_source = plan["first_position"]
        arch.check_parallel(tp, pp, what="target")

        ensure_single_process()
        model = build_single_rank_model(arch)
        params = dict(model.named_parameters())
        assigned = set()

        def put(name: str, value: torch.Tensor) -> None:
            _copy_into(params[name], value, name)
            assigned.add(name)

        put(mapping.MC_EMBED, mapping.pad_vocab(src.get(mapping.HF_EMBED), arch.padded_vocab_size))
        put(mapping.MC_FINAL_NORM, src.get(mapping.HF_FINAL_NORM))
        if not tied:
            put(mapping.MC_OUTPUT, mapping.pad_vocab(src.get(mapping.HF_LM_HEAD), arch.padded_vocab_size))
        for u, pos in enumerate(layer_source):
            hf_layer = {k: src.get(f"model.layers.{pos}.{k}") for k in mapping.HF_LAYER_KEYS}
            for name, value in mapping.hf_layer_to_mcore(hf_layer, shape, "local").items():
                put(f"{mapping.LAYER_PREFIX}{u}.{name}", value)
        left = sorted(set(params) - assigned)
        if left:
            raise UsageError(f"internal mapping error: parameters not converted: {', '.join(left[:3])}")

        final_iter = out / checkpointing.iter_dir_name(ITERATION)
        meta = {
            "arch": arch.to_meta(),
            "model_preset": None,
            "tokenizer": {"type": None, "model": None, "vocab_size": shape.vocab_size},
            "accounting": accounting.summary(arch, arch.padded_vocab_size, tied, arch.seq_length, model.effective_depth),
            "training_flops": 0.0,
            "consumed_train_samples": 0,
            "tokens": 0,
            "lineage": [l.to_dict() for l in initial_lineage(arch.num_layers)],
            "growth": None,
            "hf": {
                "source": str(Path(hf_path).resolve()),
                "config": src.config,
                "vocab_size": shape.vocab_size,
                "dtype": src.dtype,
                "num_hidden_layers": shape.num_layers,
            },
            "converted_by": "megatron_growloop.convert hf-to-mcore",
            "target_parallel": {"tp": tp, "pp": pp},
        }
        with atomic_output_dir(out) as tmp:
            tok_tmp = tmp / checkpointing.iter_dir_name(ITERATION) / TOKENIZER_SUBDIR
            # Decide the tokenizer entry first: save_checkpoint writes growloop.json.
            tok_stage = tmp / ".tokenizer"
            if src.save_tokenizer(tok_stage):
                meta["tokenizer"].update(type="HuggingFaceTokenizer", model=str(final_iter / TOKENIZER_SUBDIR))
            for name, path in src.extra_files.items():
                meta["hf"][name.replace(".json", "")] = json.loads(path.read_text())
            # one process: write in-process (fsynced) instead of megatron's forked async writers
            checkpointing.save_checkpoint(str(tmp), ITERATION, [model], metadata=meta,
                                          sharded_strategy=SyncSaveStrategy(sync_files=True))
            if tok_stage.exists():
                tok_stage.rename(tok_tmp)
        del model, params
    finally:
        src.close()
    return str(out / checkpointing.iter_dir_name(ITERATION))
