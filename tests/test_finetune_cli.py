"""``megatron_growloop.finetune`` flags: bad data and bad flag combinations are one-line errors
before anything is written; epochs and warm-up fractions turn into iterations as in Megatron-LM."""

from __future__ import annotations

import json
import math

import pytest

from megatron_growloop import finetune
from megatron_growloop.errors import UsageError

BASE = ["--tokenizer-type", "ByteTokenizer", "--seq-length", "32", "--micro-batch-size", "2"]


def _jsonl(tmp_path, records, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(p)


GOOD = [{"prompt": f"w{i}=", "answer": str(i % 10)} for i in range(20)]


@pytest.mark.parametrize("bad,what", [
    ({"prompt": "x="}, "missing key 'answer'"),
    ({"prompt": "x=", "answer": ""}, "empty answer"),
    ({"prompt": "x=", "answer": "9" * 40}, "the answer alone is longer than the context"),
    ({"prompt": "x" * 40, "answer": "1"}, "prompt + answer is longer than the context"),
])
def test_bad_data_is_one_line_naming_the_line_and_nothing_is_written(tmp_path, capsys, bad, what):
    path = _jsonl(tmp_path, GOOD[:3] + [bad] + GOOD[3:])
    save = tmp_path / "save"
    with pytest.raises(SystemExit) as exc:
        finetune.main(BASE + ["--sft-data", path, "--save", str(save)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert err.startswith("megatron_growloop.finetune: error: ") and f"{path}:4:" in err and what in err
    assert not save.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"]


@pytest.mark.parametrize("extra,words", [
    (["--epochs", "2", "--train-iters", "5"], "either --epochs or --train-iters"),
    (["--epochs", "0"], "--epochs must be > 0"),
    (["--lr-warmup-fraction", "0.1", "--lr-warmup-iters", "2"], "either --lr-warmup-fraction or --lr-warmup-iters"),
    (["--lr-warmup-fraction", "1.5"], "--lr-warmup-fraction must be in [0, 1)"),
    (["--data-path", "x"], "--data-path is a pretraining flag"),
    (["--mock-data"], "--mock-data is a pretraining flag"),
])
def test_bad_flags(tmp_path, extra, words):
    path = _jsonl(tmp_path, GOOD)
    with pytest.raises(UsageError) as exc:
        finetune.parse_finetune_args(BASE + ["--sft-data", path] + extra, world_size=1)
    assert words in str(exc.value)


def test_data_source_flags(tmp_path):
    path = _jsonl(tmp_path, GOOD)
    with pytest.raises(UsageError, match="exactly one of --sft-data"):
        finetune.parse_finetune_args(BASE, world_size=1)
    with pytest.raises(UsageError, match="exactly one of --sft-data"):
        finetune.parse_finetune_args(BASE + ["--sft-data", path, "--sft-tasks", "va_code_d1"], world_size=1)
    with pytest.raises(UsageError, match="--sft-tasks needs --sft-examples"):
        finetune.parse_finetune_args(BASE + ["--sft-tasks", "va_code_d1"], world_size=1)
    with pytest.raises(UsageError, match="cannot be split equally"):
        finetune.parse_finetune_args(BASE + ["--seq-length", "256", "--sft-tasks", "va_code_d1,va_code_d2",
                                             "--sft-examples", "5"], world_size=1)
    with pytest.raises(UsageError, match="unknown reasoning-primitive task"):
        finetune.parse_finetune_args(BASE + ["--sft-tasks", "nope", "--sft-examples", "4"], world_size=1)


def test_epochs_and_warmup_fraction_become_iterations(tmp_path):
    """Megatron-LM: train_iters = epochs x iterations per epoch (tasks/finetune_utils.py);
    warm-up = fraction x lr-decay-iters (training.py get_optimizer_param_scheduler)."""
    path = _jsonl(tmp_path, GOOD)
    data = finetune.SFTData()
    args = finetune.parse_finetune_args(BASE + ["--sft-data", path, "--epochs", "3", "--global-batch-size", "4",
                                                "--lr-warmup-fraction", "0.25"], world_size=2, data=data).args
    n_seq = data.record["stats"]["sequences"]
    assert n_seq == math.ceil(sum(len(f"w{i}=") + 1 for i in range(20)) / 32)  # prompt + answer + EOD - 1
    assert args.train_iters == math.ceil(3 * n_seq / 4)
    assert args.lr_warmup_iters == int(0.25 * args.train_iters)
    args1 = finetune.parse_finetune_args(BASE + ["--sft-data", path], world_size=1).args
    assert args1.train_iters == math.ceil(n_seq / 2)  # default: one epoch at micro batch x DP
    args2 = finetune.parse_finetune_args(BASE + ["--sft-data", path, "--train-iters", "7"], world_size=1).args
    assert args2.train_iters == 7 and args2.lr == 1e-4  # fine-tuning's default LR


def test_packing_refuses_transformer_engine():
    class A:
        sft_packing, transformer_impl = "pack", "transformer_engine"

    with pytest.raises(UsageError, match="--sft-packing pad"):
        finetune._check_attention(A())
    A.sft_packing = "pad"
    finetune._check_attention(A())


def test_load_of_another_checkpoint_needs_pretrained_checkpoint(tmp_path):
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "latest_checkpointed_iteration.txt").write_text("1")
    path = _jsonl(tmp_path, GOOD)
    with pytest.raises(UsageError, match="give the model to fine-tune as --pretrained-checkpoint"):
        finetune.parse_finetune_args(BASE + ["--sft-data", path, "--load", str(ck), "--save", str(tmp_path / "s")],
                                     world_size=1)
    with pytest.raises(UsageError, match="holds no checkpoint"):
        finetune.parse_finetune_args(BASE + ["--sft-data", path, "--pretrained-checkpoint", str(tmp_path / "none")],
                                     world_size=1)
