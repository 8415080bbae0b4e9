"""Checkpoints (issue 14): no crash loses the last good checkpoint, a full disk says so, and a
damaged checkpoint gets one line naming the bad file and the newest intact iteration -- in
pretrain, convert and eval alike."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import read_metrics
from reliability_util import (
    TINY,
    assert_one_line_error,
    copy_ckpt,
    largest_shard,
    overwrite,
    run,
    truncate,
)

PRE = "megatron_growloop.pretrain"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A save directory with iterations 2 and 4 (latest 4) and the metrics of the run."""
    root = tmp_path_factory.mktemp("trained")
    ck, metrics = root / "ck", root / "m.jsonl"
    proc = run(PRE, TINY + ["--train-iters", "4", "--save-interval", "2", "--save", ck, "--metrics-file", metrics])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return ck, read_metrics(metrics)


# ------------------------------------------------------------------------------ commit protocol
def test_every_kill_point_of_a_resave_leaves_a_loadable_latest(trained, tmp_path, dist_1rank):
    """Re-saving an existing iteration, killed before each rename / rmtree of the commit: the
    latest marker always resolves to a complete checkpoint, and start-up recovery restores the
    directory layout (the old protocol rmtree'd iter_N before renaming the new one in)."""
    from megatron_growloop.training import ckpt_commit, ckpt_validate
    from megatron_growloop.training.checkpointing import TRACKER, resolve_load_dir

    src, _ = trained

    class Killed(BaseException):
        pass

    for op in ("rename", "rmtree"):
        for k in range(1, 6):
            root = copy_ckpt(src, tmp_path / f"{op}{k}")
            tmp = root / "iter_0000004.tmp"
            shutil.copytree(root / "iter_0000004", tmp)  # the complete new save of iteration 4
            calls = {"n": 0}
            names = ("rename", "replace") if op == "rename" else ("rmtree",)
            mod = ckpt_commit.os if op == "rename" else ckpt_commit.shutil
            real = {n: getattr(mod, n) for n in names}

            def faulty(fn):
                def wrapper(*a, **kw):
                    calls["n"] += 1
                    if calls["n"] == k:
                        raise Killed()
                    return fn(*a, **kw)

                return wrapper

            for n in names:
                setattr(mod, n, faulty(real[n]))
            try:
                ckpt_commit.commit_iteration(root, tmp, root / "iter_0000004", root / TRACKER, 4)
                finished = True
            except Killed:
                finished = False
            finally:
                for n in names:
                    setattr(mod, n, real[n])
            ckpt, it = resolve_load_dir(str(root))
            assert it == 4 and ckpt_validate.check_structure(ckpt) is None, (op, k, ckpt)
            ckpt_commit.recover_save_dir(root)
            names = sorted(p.name for p in root.iterdir() if p.name.startswith("iter_"))
            assert names == ["iter_0000002", "iter_0000004"], (op, k, names)
            assert (root / TRACKER).read_text() == "4"
            if finished:
                break


def test_leftovers_are_cleaned_at_startup_with_a_message(trained, tmp_path):
    """An interrupted save's iter_*.tmp and a moved-aside iter_*.old are dealt with at start-up,
    each with a message, and the run resumes from the latest checkpoint."""
    ck = copy_ckpt(trained[0], tmp_path / "ck")
    (ck / "iter_0000006.tmp").mkdir()
    (ck / "iter_0000006.tmp" / "__0_0.distcp").write_bytes(b"partial")
    (ck / "latest_checkpointed_iteration.txt.tmp").write_text("6")
    os.rename(ck / "iter_0000004", ck / "iter_0000004.old")  # a re-save killed between its renames
    metrics = tmp_path / "m.jsonl"
    proc = run(PRE, TINY + ["--train-iters", "5", "--load", ck, "--save", ck, "--metrics-file", metrics])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"removed {ck / 'iter_0000006.tmp'}" in proc.stdout
    assert f"restored {ck / 'iter_0000004'} from iter_0000004.old" in proc.stdout
    assert [r["iteration"] for r in read_metrics(metrics)] == [5]
    assert sorted(p.name for p in ck.iterdir() if p.name.startswith("iter_")) == \
        ["iter_0000002", "iter_0000004", "iter_0000005"]
    assert not (ck / "latest_checkpointed_iteration.txt.tmp").exists()


def test_full_disk_says_so_and_keeps_the_previous_checkpoint(trained, tmp_path):
    """ENOSPC while writing a shard: one line with "no space left on device", the partial save
    is removed, the previous checkpoint stays the latest and resumes."""
    ck = tmp_path / "ck"
    proc = run(PRE, TINY + ["--train-iters", "4", "--save-interval", "2", "--save", ck],
               env_extra={"FAULT_ENOSPC_AT_SAVE": "2"})
    assert_one_line_error(proc, PRE, "no space left on device", "iteration 4", "iter_0000002 is intact")
    assert sorted(p.name for p in ck.iterdir() if p.name != "tensorboard") == \
        ["iter_0000002", "latest_checkpointed_iteration.txt"]
    proc = run(PRE, TINY + ["--train-iters", "4", "--load", ck, "--save", ck])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (ck / "latest_checkpointed_iteration.txt").read_text() == "4"


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_real_full_disk(tmp_path):
    """The same on a real full file system (a 4 MiB tmpfs: the second checkpoint does not fit).
    Needs permission to mount; the injected ENOSPC test above runs everywhere."""
    mnt = tmp_path / "small"
    if not _mount_tmpfs(mnt, "4m"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        ck = mnt / "ck"
        proc = run(PRE, TINY + ["--train-iters", "4", "--save-interval", "2", "--save", ck,
                                "--tensorboard-dir", tmp_path / "tb"])
        assert_one_line_error(proc, PRE, "no space left on device", "iter_0000002 is intact")
        assert sorted(p.name for p in ck.iterdir()) == ["iter_0000002", "latest_checkpointed_iteration.txt"]
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


# ------------------------------------------------------------------------------ validation
DAMAGE = {
    "truncated shard": lambda d: truncate(largest_shard(d)),
    "deleted shard": lambda d: largest_shard(d).unlink(),
    "4 KiB overwritten in a shard": lambda d: overwrite(largest_shard(d)),
    "garbage .metadata": lambda d: (d / ".metadata").write_bytes(b"\x80\x04garbage" * 10),
    "missing common.pt": lambda d: (d / "common.pt").unlink(),
}
NEEDLE = {
    "truncated shard": "is truncated",
    "deleted shard": "is missing",
    "4 KiB overwritten in a shard": "fails its checksum",
    "garbage .metadata": ".metadata is corrupt",
    "missing common.pt": "common.pt is missing",
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_checkpoint_names_the_file_and_the_newest_intact(trained, tmp_path, damage, dist_1rank):
    """Each damage is found before loading; the one-line message names the file and the newest
    intact iteration (what pretrain, convert and eval print)."""
    from megatron_growloop.training.ckpt_validate import DamagedCheckpoint
    from megatron_growloop.training.ckpt_select import select_checkpoint

    ck = copy_ckpt(trained[0], tmp_path / "ck")
    DAMAGE[damage](ck / "iter_0000004")
    with pytest.raises(DamagedCheckpoint) as err:
        select_checkpoint(str(ck), fallback=False, checksums=True)
    msg = str(err.value)
    for needle in (NEEDLE[damage], str(ck / "iter_0000004"), f"newest intact checkpoint: '{ck / 'iter_0000002'}'"):
        assert needle in msg, (needle, msg)
    assert "\n" not in msg
    assert select_checkpoint(str(ck), fallback=True, checksums=True, announce=False) == str(ck / "iter_0000002")


def test_damaged_checkpoint_is_one_line_in_pretrain_convert_and_eval(trained, tmp_path):
    """The three entry points: one line, no traceback, nothing written (pretrain: the
    overwritten shard that used to load silently and train on NaN)."""
    ck = copy_ckpt(trained[0], tmp_path / "ck")
    DAMAGE["4 KiB overwritten in a shard"](ck / "iter_0000004")
    before = sorted(p.name for p in ck.iterdir())
    proc = run(PRE, TINY + ["--train-iters", "6", "--load", ck, "--save", ck])
    assert_one_line_error(proc, PRE, "fails its checksum", str(ck / "iter_0000004"),
                          f"newest intact checkpoint: '{ck / 'iter_0000002'}'", "--ckpt-fallback-to-previous")
    assert sorted(p.name for p in ck.iterdir()) == before
    proc = run("megatron_growloop.eval", ["nll", "--load", ck, "--num-samples", "2", "--out", tmp_path / "n.json"])
    assert_one_line_error(proc, "megatron_growloop.eval", "fails its checksum", str(ck / "iter_0000002"))
    assert not (tmp_path / "n.json").exists()
    DAMAGE["truncated shard"](ck / "iter_0000004")
    proc = run("megatron_growloop.convert", ["mcore-to-hf", "--load", ck, "--out", tmp_path / "hf"])
    assert_one_line_error(proc, "megatron_growloop.convert", "is truncated", str(ck / "iter_0000002"))
    assert not (tmp_path / "hf").exists()


def test_fallback_to_previous_resumes_from_the_newest_intact(trained, tmp_path):
    """--ckpt-fallback-to-previous: a damaged latest is reported and iteration 2 is resumed -- the
    re-trained iterations 3 and 4 reproduce the original run bitwise -- and the damaged iteration
    4 is replaced by the new save."""
    src, original = trained
    ck = copy_ckpt(src, tmp_path / "ck")
    overwrite(largest_shard(ck / "iter_0000004"))
    metrics = tmp_path / "m.jsonl"
    proc = run(PRE, TINY + ["--train-iters", "4", "--load", ck, "--save", ck, "--ckpt-fallback-to-previous",
                            "--metrics-file", metrics])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--ckpt-fallback-to-previous: loading" in proc.stdout and "iter_0000002" in proc.stdout
    got = [(r["iteration"], r["loss"]) for r in read_metrics(metrics)]
    assert got == [(r["iteration"], r["loss"]) for r in original[2:]]
    from megatron_growloop.training.ckpt_validate import check_checksums, check_structure

    assert check_structure(ck / "iter_0000004") is None and check_checksums(ck / "iter_0000004") is None


def test_checkpoint_exception_is_caught(trained, tmp_path):
    """torch's CheckpointException derives from BaseException: a shard whose serialized objects
    are garbage (checksums not verified) fails inside torch DCP and still gives one line."""
    ck = copy_ckpt(trained[0], tmp_path / "ck")
    d = ck / "iter_0000004"
    from torch.distributed.checkpoint import FileSystemReader

    md = FileSystemReader(str(d)).read_metadata()
    # the bytes of a pickled object (an _extra_state / RNG entry), not raw tensor data
    info = next(v for k, v in md.storage_data.items() if "rng_state" in k.fqn or "_extra_state" in k.fqn)
    overwrite(d / info.relative_path, info.offset, min(64, info.length))
    proc = run(PRE, TINY + ["--train-iters", "6", "--load", ck, "--no-verify-ckpt-checksums"])
    assert_one_line_error(proc, PRE, "cannot load checkpoint", str(d))


def test_checksums_are_written_per_shard(trained):
    from megatron_growloop.training.ckpt_validate import MANIFEST, check_checksums

    d = trained[0] / "iter_0000004"
    m = json.loads((d / MANIFEST).read_text())
    shards = sorted(p.name for p in d.glob("*.distcp"))
    assert m["algorithm"] == "crc32" and shards and all(s in m["files"] for s in shards)
    assert {".metadata", "common.pt", "metadata.json"} <= set(m["files"])
    assert check_checksums(d) is None


def test_describe_exception_unwraps_checkpoint_exception():
    from torch.distributed.checkpoint.api import CheckpointException, _wrap_exception

    from megatron_growloop.training.ckpt_validate import describe_exception

    try:
        raise OSError(28, "No space left on device")
    except OSError as e:
        wrapped = _wrap_exception(e)
    exc = CheckpointException("save", {1: wrapped})
    assert not isinstance(exc, Exception)
    assert describe_exception(exc) == "rank 1: OSError: [Errno 28] No space left on device"


# ------------------------------------------------------------------------------ dp_reshardable
@pytest.fixture(scope="module")
def trained_dp_reshardable(tmp_path_factory):
    """Like ``trained`` with the distributed optimizer, whose state is saved ``dp_reshardable``
    (every rank its own buffers; the default since issue 12)."""
    root = tmp_path_factory.mktemp("trained_dp")
    ck, metrics = root / "ck", root / "m.jsonl"
    proc = run(PRE, TINY + ["--use-distributed-optimizer", "--train-iters", "4", "--save-interval", "2",
                            "--save", ck, "--metrics-file", metrics])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return ck, read_metrics(metrics)


def test_dp_reshardable_optimizer_state_is_checksummed_validated_and_resumed(trained_dp_reshardable, tmp_path,
                                                                            dist_1rank):
    """The manifest covers the dp_reshardable format's files; bytes overwritten inside the
    optimizer's buffers (size unchanged) are found before loading, with the file named; the
    fallback resumes iteration 2 and retrains 3 and 4 bitwise."""
    from torch.distributed.checkpoint import FileSystemReader

    from megatron_growloop.training.ckpt_select import select_checkpoint
    from megatron_growloop.training.ckpt_validate import MANIFEST, DamagedCheckpoint, check_checksums

    src, original = trained_dp_reshardable
    ck = copy_ckpt(src, tmp_path / "ck")
    d = ck / "iter_0000004"
    assert json.loads((d / "growloop.json").read_text())["optimizer_sharding"] == "dp_reshardable"
    m = json.loads((d / MANIFEST).read_text())
    assert all(p.name in m["files"] for p in d.glob("*.distcp")) and check_checksums(d) is None
    md = FileSystemReader(str(d)).read_metadata()
    optim = [v for k, v in md.storage_data.items() if k.fqn.startswith("optimizer")]
    assert optim, sorted({k.fqn for k in md.storage_data})[:20]
    info = max(optim, key=lambda v: v.length)
    overwrite(d / info.relative_path, info.offset, min(4096, info.length))
    with pytest.raises(DamagedCheckpoint) as err:
        select_checkpoint(str(ck), fallback=False, checksums=True)
    msg = str(err.value)
    for needle in ("fails its checksum", info.relative_path, f"newest intact checkpoint: '{ck / 'iter_0000002'}'"):
        assert needle in msg, (needle, msg)
    metrics = tmp_path / "m.jsonl"
    proc = run(PRE, TINY + ["--use-distributed-optimizer", "--train-iters", "4", "--load", ck, "--save", ck,
                            "--ckpt-fallback-to-previous", "--metrics-file", metrics])
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = [(r["iteration"], r["loss"]) for r in read_metrics(metrics)]
    assert got == [(r["iteration"], r["loss"]) for r in original[2:]]
    assert check_checksums(d) is None
