"""Megatron distributed checkpoints (torch_dist), written atomically, resumed exactly.

Layout (Megatron-LM's)::

    SAVE/latest_checkpointed_iteration.txt      # moves only after a complete save
    SAVE/iter_0000120/                          # torch_dist: .metadata, *.distcp, common.pt
    SAVE/iter_0000120/growloop.json             # what is needed to rebuild the model

A save goes to ``iter_XXXXXXX.tmp`` first; only when every rank has finished (and
has checksummed its shard files, :mod:`.ckpt_validate`), rank 0 writes ``growloop.json``
and ``checksums.json`` and commits the directory (:mod:`.ckpt_commit`: an existing copy
of the same iteration is moved aside, never deleted first; the ``latest`` marker moves
with an atomic rename).  A kill at any point leaves a loadable latest checkpoint; a
failed save (a full disk: "no space left on device") removes its partial files.
Loading validates the checkpoint first (:mod:`.ckpt_validate`).

The distributed optimizer's state is saved as Megatron-LM saves it
(``megatron/training/checkpointing.py``): ``dp_reshardable`` by default -- every rank
writes its own buffers, fully parallel, no gather; it loads at another DP size but the
same TP/PP -- and ``fully_reshardable`` (model space: loads at any TP/PP/DP) with
``--dist-ckpt-optim-fully-reshardable``.  The format is recorded in ``growloop.json``
and used on load; other optimizers are always saved in model space.  Validation and
checksums (:mod:`.ckpt_validate`) cover the torch_dist files whatever the format.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.serialization import load_sharded_metadata
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from torch.distributed.checkpoint.api import CheckpointException

from .. import platform
from ..errors import UsageError
from . import ckpt_commit, ckpt_validate
from .optimizer_state import ensure_optimizer_state, load_optimizer_state
from .save_strategy import SyncSaveStrategy

FORMAT_VERSION = 1
META_NAME = "growloop.json"
TRACKER = ckpt_validate.TRACKER
# Writer threads per rank for training saves (megatron-core's default torch_dist writer also
# writes with 2 workers per rank, but as forked processes; see save_strategy.py).
SAVE_THREADS = 2
FULLY_RESHARDABLE = {"distrib_optim_sharding_type": "fully_reshardable"}
DP_RESHARDABLE = {"distrib_optim_sharding_type": "dp_reshardable"}
OPTIMIZER_FORMATS = {"fully_reshardable": FULLY_RESHARDABLE, "dp_reshardable": DP_RESHARDABLE}


def iter_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


# ------------------------------------------------------------------------------------ paths
def resolve_load_dir(path: str) -> Tuple[Path, int]:
    """``(checkpoint directory, iteration)`` for a ``--load`` argument.

    Accepts a save directory (uses its ``latest`` marker) or one ``iter_*`` directory.
    Raises a one-line :class:`UsageError` for missing, partial or corrupt checkpoints.
    """
    p = Path(path)
    if not p.exists():
        raise UsageError(f"--load {path!r} does not exist")
    if (p / META_NAME).exists() or p.name.startswith("iter_"):
        ckpt = p
    else:
        tracker = p / TRACKER
        if not tracker.exists():
            partial = sorted(x.name for x in p.glob("iter_*.tmp*"))
            hint = f" (found only incomplete saves: {', '.join(partial)})" if partial else ""
            raise UsageError(f"--load {path!r} holds no checkpoint: {TRACKER} is missing{hint}")
        text = tracker.read_text().strip()
        if not text.isdigit():
            raise UsageError(f"--load {path!r}: {TRACKER} is corrupt (content {text[:40]!r})")
        ckpt = p / iter_dir_name(int(text))
    if not ckpt.exists():
        # a re-save killed between its two renames: the data sits in iter_N.old
        aside = ckpt.with_name(ckpt.name + ckpt_commit.ASIDE_SUFFIX)
        if aside.is_dir():
            ckpt = aside
    problem = ckpt_validate.check_structure(ckpt)
    if problem is not None:
        ckpt_validate.raise_damaged(ckpt, problem)
    meta = json.loads((ckpt / META_NAME).read_text())
    return ckpt, int(meta.get("iteration", 0))


def read_metadata(path: str) -> Dict[str, Any]:
    ckpt, _ = resolve_load_dir(path)
    meta = json.loads((ckpt / META_NAME).read_text())
    meta["_dir"] = str(ckpt)
    return meta


def tokenizer_source(meta: Dict[str, Any]) -> Tuple[Optional[str], Optional[str]]:
    """``(tokenizer type, model)`` recorded in checkpoint metadata; a tokenizer directory
    stored inside the checkpoint (``<iter dir>/tokenizer``, written by the HF converter)
    is found even when the checkpoint was moved."""
    tok = meta.get("tokenizer") or {}
    model = tok.get("model")
    local = Path(meta.get("_dir", "")) / "tokenizer"
    if model and not Path(model).exists() and Path(model).name == "tokenizer" and local.is_dir():
        model = str(local)
    return tok.get("type"), model


# ------------------------------------------------------------------------------------ RNG
def rng_state() -> Dict[str, Any]:
    return {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded_object(state=None) -> ShardedObject:
    pp, tp = parallel_state.get_pipeline_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_world_size()
    dp = parallel_state.get_data_parallel_world_size()
    offset = (
        parallel_state.get_pipeline_model_parallel_rank(),
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_data_parallel_rank(),
    )
    return ShardedObject("rng_state", state, (pp, tp, dp), offset, replica_id=0)


def _parallel_layout() -> Dict[str, int]:
    return {
        "tp": parallel_state.get_tensor_model_parallel_world_size(),
        "pp": parallel_state.get_pipeline_model_parallel_world_size(),
        "dp": parallel_state.get_data_parallel_world_size(),
    }


# ------------------------------------------------------------------------------------ state dicts
def model_sharded_state_dict(model_chunks) -> Dict[str, Any]:
    assert len(model_chunks) == 1, "virtual pipeline stages are not supported"
    return unwrap(model_chunks[0]).sharded_state_dict()


def _absent_extra_state(ckpt: Path, model_sd: Dict[str, Any]) -> set:
    """Names of requested ``*._extra_state`` objects the checkpoint does not hold.

    Modules may carry extra state in one layer spec and not in another (Transformer
    Engine's linears, attention and norms keep FP8 metadata there -- megatron-core builds
    the final norm as ``TENorm`` whenever TE imports, even for the local spec).  Extra state
    that a checkpoint never recorded loads as None ("nothing recorded"), so every checkpoint
    loads into either spec, whatever modules carry extra state."""
    wanted = {k: v for k, v in model_sd.items() if k.endswith("._extra_state") and isinstance(v, ShardedObject)}
    if not wanted:
        return set()
    present = {k for k, v in load_sharded_metadata(str(ckpt)).items() if isinstance(v, ShardedObject)}
    return {k for k, v in wanted.items() if v.unique_key not in present}


def unwrap(module):
    while hasattr(module, "module"):
        module = module.module
    return module


def save_checkpoint(
    save_dir: str,
    iteration: int,
    model_chunks,
    optimizer=None,
    scheduler=None,
    common: Optional[Dict[str, Any]] = None,
    metadata: Optional[Dict[str, Any]] = None,
    sharded_strategy=None,
    optimizer_format: str = "dp_reshardable",
    checksums: bool = True,
) -> str:
    """Save model (+ optimizer, scheduler, RNG, counters) at ``iteration``; return its directory.

    ``sharded_strategy``: :class:`~megatron_growloop.training.save_strategy.SyncSaveStrategy`
    (in-process writer threads, fsynced) when None.  ``optimizer_format``: the distributed
    optimizer's sharding, ``dp_reshardable`` or ``fully_reshardable`` (see the module
    docstring).  ``checksums``: write each shard file's
    CRC-32 into ``checksums.json`` (sizes are always recorded).  A model with a NaN/Inf
    parameter is never saved (one line naming the iteration).  Any failure removes the
    partial ``iter_*.tmp``; a full disk is reported as "no space left on device"."""
    root = Path(save_dir)
    final = root / iter_dir_name(iteration)
    tmp = root / (iter_dir_name(iteration) + ckpt_commit.TMP_SUFFIX)
    rank0 = dist.get_rank() == 0
    _check_finite_model(model_chunks, iteration, root)
    if sharded_strategy is None:
        sharded_strategy = SyncSaveStrategy(sync_files=True, thread_count=SAVE_THREADS)

    def prepare():
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)

    _on_rank0_then_everywhere(prepare, rank0, root, tmp, iteration)

    model_sd = model_sharded_state_dict(model_chunks)
    state: Dict[str, Any] = {"model": model_sd}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(model_sd, metadata=OPTIMIZER_FORMATS[optimizer_format])
    if scheduler is not None:
        state["opt_param_scheduler"] = scheduler.state_dict()
    state["rng_state"] = _rng_sharded_object(rng_state())
    state["iteration"] = iteration
    state["growloop"] = dict(common or {})
    try:
        dist_checkpointing.save(state, str(tmp), sharded_strategy=sharded_strategy, validate_access_integrity=True)
        crcs = _gather_checksums(tmp) if checksums else None
    except (Exception, CheckpointException) as exc:  # noqa: BLE001 - CheckpointException is a BaseException
        # torch DCP agrees on failures across ranks, so every rank gets here together
        raise _save_failed(exc, rank0, root, tmp, iteration) from None

    def finalize():
        meta = dict(metadata or {})
        meta.update(
            format_version=FORMAT_VERSION,
            iteration=iteration,
            parallel=_parallel_layout(),
            has_optimizer=optimizer is not None,
            distributed_optimizer=_is_distributed_optimizer(optimizer),
            optimizer_sharding=optimizer_format if _is_distributed_optimizer(optimizer) else "model_space",
        )
        ckpt_commit.write_atomic(tmp / META_NAME, json.dumps(meta, indent=2, sort_keys=True, default=str))
        manifest = ckpt_validate.build_manifest(tmp, crcs)
        ckpt_commit.write_atomic(tmp / ckpt_validate.MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
        ckpt_commit.commit_iteration(root, tmp, final, root / TRACKER, iteration)

    _on_rank0_then_everywhere(finalize, rank0, root, tmp, iteration)
    return str(final)


def _on_rank0_then_everywhere(fn, rank0: bool, root: Path, tmp: Path, iteration: int) -> None:
    """Run ``fn`` on rank 0 and let every rank raise the same one-line error if it failed."""
    msg = None
    if rank0:
        try:
            fn()
        except Exception as exc:  # noqa: BLE001
            msg = str(_save_failed(exc, True, root, tmp, iteration))
    box = [msg]
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise UsageError(box[0])


def _save_failed(exc: BaseException, rank0: bool, root: Path, tmp: Path, iteration: int) -> UsageError:
    """Remove the partial save (rank 0) and describe the failure in one line."""
    full = ckpt_commit.is_out_of_space(exc, root)
    if rank0:
        shutil.rmtree(tmp, ignore_errors=True)
    prev = latest_checkpoint(root)
    kept = f"; the previous checkpoint {prev} is intact" if prev else ""
    if full:
        return UsageError(f"cannot save checkpoint iteration {iteration} to {str(root)!r}: no space left on device "
                          f"(the partial save was removed{kept})")
    return UsageError(f"cannot save checkpoint iteration {iteration} to {str(root)!r}: "
                      f"{ckpt_validate.describe_exception(exc)} (the partial save was removed{kept})")


def latest_checkpoint(root) -> Optional[str]:
    """The directory the ``latest`` marker of a save directory names (None: no marker)."""
    root = Path(root)
    try:
        text = (root / TRACKER).read_text().strip()
    except OSError:
        return None
    return str(root / iter_dir_name(int(text))) if text.isdigit() else None


def _gather_checksums(tmp: Path) -> Dict[str, int]:
    """CRC-32 of every torch_dist file of ``tmp``: each rank checksums its share (the files are
    still in the page cache), rank 0 gets them all."""
    files = ckpt_validate.manifest_files(tmp)
    world = dist.get_world_size()
    mine = ckpt_validate.checksum_files(ckpt_validate.my_share(files, dist.get_rank(), world))
    if world == 1:
        return mine
    parts: List[Optional[Dict[str, int]]] = [None] * world
    dist.all_gather_object(parts, mine)
    out: Dict[str, int] = {}
    for part in parts:
        out.update(part or {})
    return out


def _check_finite_model(model_chunks, iteration: int, root: Path) -> None:
    """Refuse to save NaN/Inf parameters (every rank checks its own; the verdict is shared)."""
    bad = torch.zeros(1, dtype=torch.float32, device=_flag_device())
    for chunk in model_chunks:
        for p in unwrap(chunk).parameters():
            if not bool(torch.isfinite(p.detach()).all()):
                bad.fill_(1.0)
                break
    if dist.get_world_size() > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if bad.item() > 0:
        prev = latest_checkpoint(root)
        raise UsageError(
            f"refusing to save checkpoint iteration {iteration}: the model has NaN/Inf parameters "
            f"(last good checkpoint: {prev or 'none'})"
        )


def _flag_device():
    return platform.device()


def _check_dp_reshardable_layout(ckpt: Path, meta: Dict[str, Any]) -> None:
    """A ``dp_reshardable`` optimizer state loads only at the TP/PP it was written with."""
    saved, now = meta.get("parallel") or {}, _parallel_layout()
    if (saved.get("tp"), saved.get("pp")) != (now["tp"], now["pp"]):
        raise UsageError(
            f"checkpoint {str(ckpt)!r} holds distributed-optimizer state in the dp_reshardable format, "
            f"written at TP {saved.get('tp')} x PP {saved.get('pp')}; this run is TP {now['tp']} x PP {now['pp']}: "
            "resume at that TP/PP, pass --no-load-optim, or save with --dist-ckpt-optim-fully-reshardable"
        )


def _is_distributed_optimizer(optimizer) -> bool:
    if optimizer is None:
        return False

    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    return any(isinstance(o, DistributedOptimizer) for o in inner)


def load_checkpoint(
    load_dir: str,
    model_chunks,
    optimizer=None,
    scheduler=None,
    load_rng: bool = True,
) -> Dict[str, Any]:
    """Load into live model (and optimizer/scheduler); return the common state and metadata."""
    ckpt, _ = resolve_load_dir(load_dir)
    meta = json.loads((ckpt / META_NAME).read_text())
    ckpt_validate.validate_for_load(ckpt)  # before anything reads the shards
    model_sd = model_sharded_state_dict(model_chunks)
    absent = _absent_extra_state(ckpt, model_sd)
    request: Dict[str, Any] = {"model": {k: v for k, v in model_sd.items() if k not in absent}}
    load_optim = optimizer is not None and meta.get("has_optimizer", False)
    if load_optim and meta.get("distributed_optimizer", False) != _is_distributed_optimizer(optimizer):
        saved = "with" if meta.get("distributed_optimizer") else "without"
        raise UsageError(
            f"checkpoint {str(ckpt)!r} was saved {saved} --use-distributed-optimizer; resume the same "
            "way (any TP/PP/DP works) or pass --no-load-optim to start the optimizer fresh"
        )
    if load_optim:
        ensure_optimizer_state(optimizer)
        saved = meta.get("optimizer_sharding") or "fully_reshardable"  # checkpoints before the choice
        if saved == "dp_reshardable":
            _check_dp_reshardable_layout(ckpt, meta)
        request["optimizer"] = optimizer.sharded_state_dict(
            model_sd, is_loading=True, metadata=OPTIMIZER_FORMATS.get(saved, FULLY_RESHARDABLE))
    same_layout = meta.get("parallel") == _parallel_layout()
    if load_rng and same_layout:
        request["rng_state"] = _rng_sharded_object()
    loaded = ckpt_validate.checked_load(request, ckpt)
    unwrap(model_chunks[0]).load_state_dict({**loaded["model"], **{k: None for k in absent}}, strict=True)
    if load_optim:
        load_optimizer_state(optimizer, loaded["optimizer"])
    if scheduler is not None and "opt_param_scheduler" in loaded and meta.get("has_optimizer", False):
        scheduler.load_state_dict(loaded["opt_param_scheduler"])
    if "rng_state" in loaded:
        set_rng_state(loaded["rng_state"])
    common = loaded.get("growloop", {}) or {}
    return {"common": common, "metadata": meta, "dir": str(ckpt), "loaded_optimizer": load_optim}
