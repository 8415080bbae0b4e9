"""Checkpoint directories for tests that only read metadata: structurally complete for the
checkpoint validation (``training/ckpt_validate.py``) without building a model."""

import json
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp


def write_torch_dist_skeleton(directory: Path) -> None:
    """A tiny torch_dist checkpoint in ``directory``: ``.metadata`` and a shard, ``common.pt``,
    ``metadata.json`` -- what the validation reads before ``growloop.json``."""
    directory.mkdir(parents=True, exist_ok=True)
    dcp.save({"x": torch.zeros(1)}, storage_writer=dcp.FileSystemWriter(str(directory)), no_dist=True)
    torch.save({}, directory / "common.pt")
    (directory / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist"}))
