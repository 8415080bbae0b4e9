"""The README's main job, shortened: torchrun pretraining on the embedded default data with the
SmolLM2 tokenizer ends by printing where its checkpoint and tensorboard logs are."""

import re
from pathlib import Path

import pytest

from conftest import ROOT, pretrain

pytestmark = pytest.mark.slow


def test_readme_main_command_shortened(tmp_path):
    readme = (ROOT / "README.md").read_text()
    m = re.search(r"torchrun --nproc_per_node 2 -m megatron_growloop\.pretrain ([^\n`]*)", readme)
    assert m, "README main command not found"
    args = m.group(1).split()
    # shorten: fewer iterations, save under tmp
    args[args.index("--train-iters") + 1] = "6"
    args[args.index("--save") + 1] = str(tmp_path / "quickstart")
    proc = pretrain(args + ["--log-interval", "2"], nproc=2)
    out = proc.stdout
    assert "iteration      6/6" in out
    ck = re.search(r"checkpoint: (\S+)", out).group(1)
    tb = re.search(r"tensorboard logs: (\S+)", out).group(1)
    assert Path(ck, "growloop.json").exists()
    assert list(Path(tb).glob("events.out.tfevents.*"))
    assert "smollm2" in Path(ck, "growloop.json").read_text()  # the real tokenizer by default
