"""The growth step inside a (one-process) training job: state is copied by the source map.

Multi-process layouts (TP=2, PP=2, DP=2 with the distributed optimizer) are covered by
``test_growth_parallel.py``; this file runs in-process and fast.
"""

from __future__ import annotations

import math

import pytest

from growth_checks import compare_grown, dump_dir


def _train(tmp_path, extra):
    from megatron_growloop.pretrain import build_trainer, parse_pretrain_args

    argv = ["--tokenizer-type", "ByteTokenizer", "--mock-data", "--vocab-size", "256",
            "--train-iters", "5", "--log-interval", "1", "--save", str(tmp_path / "ck"), "--save-interval", "2",
            "--metrics-file", str(tmp_path / "m.jsonl"), "--grow-final-layers", "8", "--grow-iters", "6",
            "--grow-dump-dir", str(tmp_path / "dump"), "--dist-ckpt-optim-fully-reshardable", *extra]
    trainer = build_trainer(parse_pretrain_args(argv, world_size=1))
    trainer.setup()
    return trainer, trainer.train()


@pytest.mark.parametrize("optim,transfer", [("adam", "memory"), ("adam", "checkpoint"), ("distopt", "memory"),
                                            ("distopt", "checkpoint"), ("bf16-distopt", "memory"),
                                            ("bf16-adam", "checkpoint")])
def test_new_layers_equal_their_sources(dist_1rank, tmp_path, capsys, optim, transfer):
    """Invariant: after growth (4 -> 8, LIDAS), with either transfer of the state, every new
    layer's weights and Adam moments (and the distributed optimizer's fp32 main params, also
    under bf16) equal those of its source layer bitwise, embeddings/norm/head and the Adam
    step are unchanged, and training continues with finite loss at the new depth."""
    from conftest import read_metrics

    distopt = "distopt" in optim
    extra = ["--grow-method", "lidas", "--grow-transfer", transfer]
    extra += ["--use-distributed-optimizer"] if distopt else []
    extra += ["--bf16"] if optim.startswith("bf16") else []
    trainer, summary = _train(tmp_path, extra)
    (grower,) = trainer.controllers
    # PROP-1 over 6 iterations with 2 stages: budgets 2, 4 -> grows after iteration 2
    assert grower.plan.growth_iterations == [2]
    counts = compare_grown(str(tmp_path / "ck" / "iter_0000002"), dump_dir(str(tmp_path / "dump"), 1))
    assert counts["weight"] == 6 * 8  # six layer tensors x eight layers
    assert counts["exp_avg"] == counts["exp_avg_sq"] == 6 * 8
    if distopt:
        assert counts["param"] == 6 * 8  # the distributed optimizer's fp32 main params
    elif optim.startswith("bf16"):
        assert counts["fp32_param"] == 6 * 8  # Float16Optimizer's fp32 main params
    rows = read_metrics(tmp_path / "m.jsonl")
    assert [r["num_layers"] for r in rows] == [4, 4, 8, 8, 8]
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert trainer.state.lineage == [
        {"root": r, "born": b} for r, b in zip([0, 1, 0, 1, 2, 3, 2, 3], [0, 0, 1, 1, 1, 1, 0, 0])
    ]
    out = capsys.readouterr().out
    assert "grows after iterations [2]" in out
    assert "growth step 1/1 (lidas) before iteration 3: 4 -> 8 layers" in out
    assert f"({transfer} transfer, " in out and grower.last_growth["transfer"] == transfer
    assert summary["growth_flops"]["final_depth"] == 8


def test_resume_depth_checks():
    """Invariant: a resumed depth must be one the plan passes through and not ahead of the plan;
    a checkpoint grown with other growth flags is refused; a consistent one sets the number of
    growth steps done (the rest happen at their iterations)."""
    from megatron_growloop.errors import UsageError
    from megatron_growloop.growth.controller import check_resume
    from megatron_growloop.growth.plan import GrowthPlan

    plan = GrowthPlan.build("lidas", 4, 4, 12, 12, 1.0)  # grows after iterations 2 and 6

    def check(depth, iteration, saved=None, lineage_len=None):
        n = depth if lineage_len is None else lineage_len
        return check_resume(plan, depth, iteration, [{"root": i % 4, "born": 0} for i in range(n)], saved, "CK")

    saved = {"method": "lidas", "block_size": 4, "start_depth": 4, "final_depth": 12, "growth_iterations": [2, 6]}
    assert check(8, 4, saved)[0] == 1
    assert check(4, 2, saved)[0] == 0  # taken at the growth iteration, before growing
    for args, msg in [
        ((10, 4, saved), "never has"),
        ((12, 4, saved), "reaches only 8 by then"),
        ((8, 4, {**saved, "method": "midas"}), "was grown with method=midas"),
        ((8, 4, {**saved, "growth_iterations": [3, 6]}), "growth_iterations=[3, 6]"),
        ((8, 4, saved, 4), "lineage metadata lists 4"),
    ]:
        with pytest.raises(UsageError) as e:
            check(*args)
        assert msg in str(e.value) and "\n" not in str(e.value)


def test_scratch_directory_choice(monkeypatch, tmp_path):
    """Invariant: the checkpoint transfer writes where all ranks can read: an explicit
    --grow-scratch-dir, else /dev/shm on one node if it has room, else under --save."""
    import os

    from megatron_growloop.growth.controller import scratch_base

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert scratch_base("/x", None) == "/x"
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        assert scratch_base(None, str(tmp_path), needed_bytes=1) == "/dev/shm"
    assert scratch_base(None, str(tmp_path), needed_bytes=1 << 60) == str(tmp_path / "growth_scratch")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # several nodes: shared storage
    assert scratch_base(None, str(tmp_path)) == str(tmp_path / "growth_scratch")


@pytest.mark.parametrize("optim", ["adam", "bf16-adam", "distopt"])
def test_memory_and_checkpoint_transfers_train_identically(dist_1rank, tmp_path, optim):
    """Invariant: training after a growth step does not depend on how the state was carried.
    LIDAS 4 -> 8 gives every old layer two copies on the same rank; each copy must own its
    Adam moments (a shared moment tensor would be updated once per copy), so the losses and
    grad norms after growth are bitwise equal for the in-memory and the checkpoint transfer."""
    from conftest import read_metrics

    extra = ["--grow-method", "lidas"] + (["--use-distributed-optimizer"] if optim == "distopt" else [])
    extra += ["--bf16"] if optim.startswith("bf16") else []
    rows = {}
    for transfer in ("memory", "checkpoint"):
        d = tmp_path / transfer
        d.mkdir()
        _train(d, [*extra, "--grow-transfer", transfer])
        rows[transfer] = [(r["iteration"], r["loss"], r["grad_norm"]) for r in read_metrics(d / "m.jsonl")]
    assert len(rows["memory"]) == 5 and rows["memory"] == rows["checkpoint"]
