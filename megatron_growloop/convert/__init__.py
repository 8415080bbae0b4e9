"""Checkpoint conversion: Hugging Face Llama/SmolLM <-> megatron_growloop, looped export, resharding.

Python API::

    from megatron_growloop.convert import hf_to_mcore, mcore_to_hf, reshard, smollm2_hf_dir
    ckpt = hf_to_mcore(smollm2_hf_dir(), "ckpts/smollm2")      # -> ckpts/smollm2/iter_0000000
    mcore_to_hf("runs/looped", "hf/looped")                     # unrolled Llama + loop record

CLI: ``python -m megatron_growloop.convert {hf-to-mcore,mcore-to-hf,reshard,verify} ...``
(also ``tools/convert_checkpoint.py``).  See ``docs/conversion.md``.
"""

from __future__ import annotations

from .exporter import mcore_to_hf
from .fixtures import smollm2_hf_dir
from .importer import hf_to_mcore
from .reshard import reshard

__all__ = ["hf_to_mcore", "mcore_to_hf", "reshard", "smollm2_hf_dir"]
