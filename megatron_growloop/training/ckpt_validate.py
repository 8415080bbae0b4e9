"""Checkpoint validation before loading: one line naming the bad file, never a traceback or NaNs.

Every load of a ``torch_dist`` checkpoint -- ``pretrain --load``, ``convert``, ``eval``,
``analysis`` -- goes through :func:`~megatron_growloop.training.checkpointing.resolve_load_dir`,
which calls :func:`check_structure` here, and reads tensors through :func:`checked_load`.

Two levels of checking:

* **structure** (always, a few ``stat`` calls): ``growloop.json`` parses, torch's ``.metadata``
  unpickles, every shard file it names exists and is at least as long as the byte ranges it
  records, and -- when the checkpoint has a manifest (``checksums.json``, written at save) --
  every file has exactly the recorded size.  This catches truncated and deleted shards.
* **checksums** (when the manifest has them; ``--no-verify-ckpt-checksums`` skips them in
  ``pretrain``): CRC-32 of every shard file, computed at save and verified at load with the
  files divided among the ranks.  This catches bytes overwritten
  inside a shard (same size), which otherwise load silently and train on garbage.

A damaged checkpoint is reported with the newest intact iteration of the same save directory
(:func:`newest_intact`); ``pretrain --ckpt-fallback-to-previous`` loads that one instead
(:mod:`.run_guard`).

torch's ``CheckpointException`` derives from ``BaseException`` (torch/distributed/checkpoint/api.py),
so ``except Exception`` does not catch it; :func:`checked_load` does.
"""

from __future__ import annotations

import json
import os
import pickle
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch.distributed as dist
from megatron.core import dist_checkpointing
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException

from ..errors import UsageError

MANIFEST = "checksums.json"
META_NAME = "growloop.json"
TRACKER = "latest_checkpointed_iteration.txt"
# Files of megatron-core's torch_dist format that the manifest covers.  growloop.json is not
# covered (conversion rewrites it after the save; it is checked by parsing it) and neither is a
# tokenizer directory stored next to the shards.
TORCH_DIST_FILES = (".metadata", "common.pt", "metadata.json")
SHARD_SUFFIX = ".distcp"
_CHUNK = 16 << 20


@dataclass(frozen=True)
class Problem:
    """What is wrong with one checkpoint: the file and why."""

    file: str
    reason: str

    def __str__(self) -> str:
        return f"{self.file} {self.reason}"


class DamagedCheckpoint(UsageError):
    """A checkpoint that fails validation; the message names the file and the newest intact one."""

    def __init__(self, message: str, ckpt: str, problem: Problem, intact: Optional[str]):
        super().__init__(message)
        self.ckpt, self.problem, self.intact = ckpt, problem, intact


# ------------------------------------------------------------------------------------ checksums
def file_crc32(path: os.PathLike) -> int:
    """CRC-32 of a file, read in 16 MiB chunks (zlib releases the GIL: threads run in parallel)."""
    crc = 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_CHUNK)
            if not chunk:
                return crc
            crc = zlib.crc32(chunk, crc)


def checksum_files(paths: Sequence[os.PathLike], threads: int = 4) -> Dict[str, int]:
    """``{file name: crc32}`` for ``paths``, a few files at a time."""
    if not paths:
        return {}
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(paths)))) as pool:
        crcs = list(pool.map(file_crc32, paths))
    return {Path(p).name: c for p, c in zip(paths, crcs)}


def manifest_files(ckpt_dir: os.PathLike) -> List[Path]:
    """The torch_dist files of a checkpoint directory that a manifest covers, sorted."""
    d = Path(ckpt_dir)
    files = [d / n for n in TORCH_DIST_FILES if (d / n).is_file()]
    files += sorted(p for p in d.iterdir() if p.suffix == SHARD_SUFFIX and p.is_file())
    return files


def my_share(files: Sequence[Path], rank: int, world: int) -> List[Path]:
    """The files rank ``rank`` of ``world`` checksums (round robin over the sorted list)."""
    return [f for i, f in enumerate(files) if i % world == rank]


def build_manifest(ckpt_dir: os.PathLike, crcs: Optional[Dict[str, int]]) -> Dict[str, object]:
    """The manifest record: size of every torch_dist file and (``crcs`` given) its CRC-32."""
    files = manifest_files(ckpt_dir)
    if crcs is not None:
        missing = [f.name for f in files if f.name not in crcs]
        if missing:
            raise RuntimeError(f"no checksum computed for {missing}")
    return {
        "format": 1,
        "algorithm": "crc32" if crcs is not None else None,
        "files": {f.name: {"size": f.stat().st_size, **({"crc32": crcs[f.name]} if crcs is not None else {})}
                  for f in files},
    }


def read_manifest(ckpt_dir: os.PathLike) -> Optional[Dict[str, object]]:
    p = Path(ckpt_dir) / MANIFEST
    if not p.exists():
        return None
    try:
        m = json.loads(p.read_text())
        if not isinstance(m, dict) or not isinstance(m.get("files"), dict):
            raise ValueError("no 'files' record")
        return m
    except (ValueError, OSError) as exc:
        raise _Bad(MANIFEST, f"is corrupt ({exc})") from None


class _Bad(Exception):
    def __init__(self, file: str, reason: str):
        super().__init__(file, reason)
        self.problem = Problem(file, reason)


# ------------------------------------------------------------------------------------ structure
def check_structure(ckpt_dir: os.PathLike) -> Optional[Problem]:
    """Cheap check (stat calls and two small files): ``None`` when the checkpoint looks complete."""
    d = Path(ckpt_dir)
    try:
        if not d.is_dir():
            raise _Bad(d.name, "is missing")
        meta_path = d / META_NAME
        if not meta_path.is_file():
            raise _Bad(META_NAME, "is missing")
        try:
            meta = json.loads(meta_path.read_text())
            if not isinstance(meta, dict):
                raise ValueError("not a JSON object")
        except (ValueError, OSError) as exc:
            raise _Bad(META_NAME, f"is corrupt ({exc})") from None
        for name in TORCH_DIST_FILES:
            if not (d / name).is_file():
                raise _Bad(name, "is missing")
        manifest = read_manifest(d)
        need = _required_shard_sizes(d)
        for name, size in sorted(need.items()):
            f = d / name
            if not f.is_file():
                raise _Bad(name, "is missing (named by .metadata)")
            have = f.stat().st_size
            if have < size:
                raise _Bad(name, f"is truncated: {have} bytes, .metadata needs {size}")
        if manifest is not None:
            for name, rec in sorted(manifest["files"].items()):
                f = d / name
                if not f.is_file():
                    raise _Bad(name, f"is missing (listed in {MANIFEST})")
                have = f.stat().st_size
                if have != int(rec["size"]):
                    raise _Bad(name, f"has {have} bytes, {MANIFEST} records {rec['size']}")
    except _Bad as bad:
        return bad.problem
    return None


def _required_shard_sizes(d: Path) -> Dict[str, int]:
    """``{shard file: bytes it must hold}`` from torch DCP's ``.metadata`` (its storage_data
    records ``relative_path, offset, length`` of every saved item)."""
    try:
        md = FileSystemReader(str(d)).read_metadata()
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError, OSError, IndexError) as exc:
        raise _Bad(".metadata", f"is corrupt ({type(exc).__name__})") from None
    except Exception as exc:  # noqa: BLE001 - unpickling garbage raises almost anything
        raise _Bad(".metadata", f"is corrupt ({type(exc).__name__})") from None
    need: Dict[str, int] = {}
    for info in (getattr(md, "storage_data", None) or {}).values():
        rel = getattr(info, "relative_path", None)
        if rel is None:
            continue
        need[rel] = max(need.get(rel, 0), int(info.offset) + int(info.length))
    return need


def check_checksums(ckpt_dir: os.PathLike, files: Optional[Iterable[str]] = None) -> Optional[Problem]:
    """Verify the manifest's CRC-32 of ``files`` (default: all); ``None`` when they match or the
    checkpoint has no checksums."""
    d = Path(ckpt_dir)
    try:
        manifest = read_manifest(d)
    except _Bad as bad:
        return bad.problem
    if manifest is None or manifest.get("algorithm") != "crc32":
        return None
    recs = manifest["files"]
    names = sorted(recs) if files is None else [n for n in files if n in recs]
    got = checksum_files([d / n for n in names if (d / n).is_file()])
    for n in names:
        if n not in got:
            return Problem(n, f"is missing (listed in {MANIFEST})")
        if got[n] != int(recs[n]["crc32"]):
            return Problem(n, f"fails its checksum (crc32 {got[n]:08x}, {MANIFEST} records {int(recs[n]['crc32']):08x})")
    return None


def has_checksums(ckpt_dir: os.PathLike) -> bool:
    try:
        m = read_manifest(ckpt_dir)
    except _Bad:
        return True  # a corrupt manifest is reported by check_checksums
    return bool(m) and m.get("algorithm") == "crc32"


# ------------------------------------------------------------------------------------ save dirs
def iteration_dirs(root: os.PathLike) -> List[Tuple[int, Path]]:
    """``[(iteration, dir)]`` of the complete-looking ``iter_NNNNNNN`` directories, newest first
    (``iter_*.old`` -- a directory moved aside by a re-save that was interrupted -- counts when its
    ``iter_*`` is missing)."""
    r = Path(root)
    if not r.is_dir():
        return []
    out: Dict[int, Path] = {}
    for p in r.iterdir():
        name = p.name
        if not name.startswith("iter_") or not p.is_dir():
            continue
        core, _, suffix = name[5:].partition(".")
        if not core.isdigit() or suffix not in ("", "old"):
            continue
        it = int(core)
        if suffix == "" or it not in out:
            out[it] = p
    return sorted(out.items(), reverse=True)


def newest_intact(root: os.PathLike, exclude: Optional[os.PathLike] = None, verify_checksums: bool = False,
                  below: Optional[int] = None) -> Optional[Path]:
    """The newest ``iter_*`` directory of ``root`` that passes :func:`check_structure` (and
    :func:`check_checksums` when asked), other than ``exclude``; ``None`` if there is none."""
    ex = Path(exclude).resolve() if exclude is not None else None
    for it, d in iteration_dirs(root):
        if below is not None and it >= below:
            continue
        if ex is not None and d.resolve() == ex:
            continue
        if check_structure(d) is None and (not verify_checksums or check_checksums(d) is None):
            return d
    return None


def holds_checkpoint(load: os.PathLike) -> bool:
    """``--load`` names a checkpoint (or a save directory with a marker) -- not an empty
    ``--save X --load X`` directory that has not saved yet."""
    p = Path(os.path.abspath(load))
    return (p / TRACKER).exists() or (p / META_NAME).exists() or p.name.startswith("iter_")


def latest_dir(load: os.PathLike) -> Optional[str]:
    """The directory the ``latest`` marker of a save directory names (no validation); ``load``
    itself when it has no marker (an ``iter_*`` directory); ``None`` for a corrupt marker."""
    p = Path(os.path.abspath(load))
    try:
        text = (p / TRACKER).read_text().strip()
    except OSError:
        return str(p)
    return str(p / f"iter_{int(text):07d}") if text.isdigit() else None


def save_root_of(ckpt_dir: os.PathLike) -> Path:
    return Path(ckpt_dir).parent


def damaged_message(ckpt: Path, problem: Problem, intact: Optional[Path]) -> str:
    where = f"checkpoint {str(ckpt)!r} is incomplete or corrupt: {problem}"
    if intact is None:
        return f"{where}; no intact checkpoint remains in {str(save_root_of(ckpt))!r}"
    return (f"{where}; newest intact checkpoint: {str(intact)!r} (pretrain: add --ckpt-fallback-to-previous; "
            f"convert/eval: --load {intact})")


def raise_damaged(ckpt: Path, problem: Problem, verify_checksums: bool = False) -> "NoReturn":  # noqa: F821
    intact = newest_intact(save_root_of(ckpt), exclude=ckpt, verify_checksums=verify_checksums)
    raise DamagedCheckpoint(damaged_message(ckpt, problem, intact), str(ckpt), problem,
                            str(intact) if intact else None)


# ------------------------------------------------------------------------------------ loading
_VERIFIED: Dict[str, int] = {}


def _manifest_stamp(ckpt: Path) -> int:
    try:
        return (ckpt / MANIFEST).stat().st_mtime_ns
    except OSError:
        return -1


def verify_checksums(ckpt_dir: os.PathLike) -> Optional[Problem]:
    """Checksum verification, divided among the ranks when a process group exists (every rank
    must call it then); the same answer on every rank.  Remembered per process."""
    ckpt = Path(ckpt_dir).resolve()
    stamp = _manifest_stamp(ckpt)
    if _VERIFIED.get(str(ckpt)) == stamp:
        return None
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if not has_checksums(ckpt):
        return None
    if distributed:
        try:
            recs = sorted(read_manifest(ckpt)["files"])
            share = [f.name for f in my_share([Path(n) for n in recs], dist.get_rank(), dist.get_world_size())]
            mine = check_checksums(ckpt, share)
        except _Bad as bad:
            mine = bad.problem
        found: List[Optional[Problem]] = [None] * dist.get_world_size()
        dist.all_gather_object(found, mine)
        problem = next((p for p in found if p is not None), None)
    else:
        problem = check_checksums(ckpt)
    if problem is None:
        _VERIFIED[str(ckpt)] = stamp
    return problem


def forget_verified() -> None:
    """Verify every checkpoint again on its next load (benchmarks, tests)."""
    _VERIFIED.clear()


def mark_verified(ckpt_dir: os.PathLike) -> None:
    """Skip checksum verification of this checkpoint in this process (``--no-verify-ckpt-checksums``)."""
    ckpt = Path(ckpt_dir).resolve()
    _VERIFIED[str(ckpt)] = _manifest_stamp(ckpt)


def validate_for_load(ckpt_dir: os.PathLike, checksums: bool = True) -> None:
    """Structure (and checksums) of one checkpoint; raises :class:`DamagedCheckpoint`."""
    ckpt = Path(ckpt_dir)
    problem = check_structure(ckpt)
    if problem is None and checksums:
        problem = verify_checksums(ckpt)
    if problem is not None:
        raise_damaged(ckpt, problem, verify_checksums=checksums)


def checked_load(sharded_state_dict, ckpt_dir: os.PathLike, checksums: bool = True, what: str = "checkpoint",
                 **kwargs):
    """``dist_checkpointing.load`` after :func:`validate_for_load`; any failure of the load itself
    -- torch's ``CheckpointException`` (a ``BaseException``) included -- becomes one line."""
    validate_for_load(ckpt_dir, checksums=checksums)
    try:
        return dist_checkpointing.load(sharded_state_dict, str(ckpt_dir), **kwargs)
    except (Exception, CheckpointException) as exc:  # noqa: BLE001
        raise UsageError(f"cannot load {what} {str(ckpt_dir)!r}: {describe_exception(exc)}") from None


def describe_exception(exc: BaseException) -> str:
    """First line of an exception; for torch's ``CheckpointException`` the first rank's failure."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        rank, inner = sorted(failures.items())[0]
        inner_exc = unwrap_failure(inner)
        return f"rank {rank}: {type(inner_exc).__name__}: {_first_line(inner_exc)}"
    return f"{type(exc).__name__}: {_first_line(exc)}"


def unwrap_failure(failure) -> BaseException:
    """The exception of one rank's entry in ``CheckpointException.failures`` (torch stores
    ``(exception, traceback summary)`` tuples there)."""
    if isinstance(failure, tuple) and failure and isinstance(failure[0], BaseException):
        return failure[0]
    return failure if isinstance(failure, BaseException) else RuntimeError(str(failure))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else "")[:300]
