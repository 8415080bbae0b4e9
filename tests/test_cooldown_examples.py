"""The cooldown recipes in ``examples/`` pass valid flags: a WSD decay over the last 15 % of
iterations, the blend switched to 20 % math at its start, the architecture from the loaded
stable-phase checkpoint, and (retrofit recipes) layers 8-11 looped once more."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from ckpt_fixtures import write_torch_dist_skeleton

ROOT = Path(__file__).resolve().parents[1]

SHIM = """#!/usr/bin/env bash
# records each launch's arguments (one per line, launches separated by ---) instead of running
printf '%s\\n' "$@" >> "$SHIM_OUT"
echo --- >> "$SHIM_OUT"
"""

PRESET_ARCH = {
    "smollm-360m": dict(num_layers=32, hidden_size=960, num_attention_heads=15, num_query_groups=5,
                        ffn_hidden_size=2560, kv_channels=64, max_position_embeddings=2048, padded_vocab_size=49152),
    "smollm-1.7b": dict(num_layers=24, hidden_size=2048, num_attention_heads=32, num_query_groups=32,
                        ffn_hidden_size=8192, kv_channels=64, max_position_embeddings=2048, padded_vocab_size=49152),
}


def _fake_checkpoint(path: Path, iteration: int, arch: dict) -> None:
    """The files ``--load`` reads before anything is built: the marker and ``growloop.json``."""
    d = path / f"iter_{iteration:07d}"
    write_torch_dist_skeleton(d)
    rec = {"seq_length": 2048, "rotary_base": 10000.0, "norm_epsilon": 1e-5, "init_method_std": 0.02, "loop": None,
           **arch}
    (d / "growloop.json").write_text(json.dumps({"iteration": iteration, "arch": rec, "tokenizer": {
        "type": "HuggingFaceTokenizer", "model": "HuggingFaceTB/SmolLM-360M"}}))
    (path / "latest_checkpointed_iteration.txt").write_text(str(iteration))


def _launches(script: str, tmp_path, env_extra):
    shim = tmp_path / "bin"
    shim.mkdir()
    for name in ("torchrun", "python"):
        (shim / name).write_text(SHIM)
        (shim / name).chmod(0o755)
    out = tmp_path / "args.txt"
    env = {**os.environ, "PATH": f"{shim}:{os.environ['PATH']}", "SHIM_OUT": str(out), **env_extra}
    subprocess.run(["bash", str(ROOT / "examples" / script)], env=env, check=True, timeout=60)
    runs, cur = [], []
    for line in out.read_text().splitlines():
        if line == "---":
            runs.append(cur[cur.index("megatron_growloop.pretrain") + 1:])
            cur = []
        else:
            cur.append(line)
    return runs


@pytest.mark.parametrize("script,preset,world,retrofit", [
    ("cooldown_math_360m.sh", "smollm-360m", 8, None),
    ("retrofit_cooldown_360m.sh", "smollm-360m", 8, "8-4x2-20"),
    ("cooldown_math_1.7b.sh", "smollm-1.7b", 8, None),
    ("retrofit_cooldown_1.7b.sh", "smollm-1.7b", 8, "8-4x2-12"),
])
def test_gpu_cooldown_recipes(tmp_path, script, preset, world, retrofit):
    from megatron_growloop.pretrain import parse_pretrain_args

    base = tmp_path / "base"
    _fake_checkpoint(base, 170_000, PRESET_ARCH[preset])
    env = {"BASE": str(base), "DATA": "/data/web_text_document", "MATH": "/data/math_text_document",
           "SAVE": str(tmp_path / "save")}
    runs = _launches(script, tmp_path, env)
    assert len(runs) == 1
    argv = runs[0]
    args = parse_pretrain_args(argv, world_size=world).args
    assert args.load == str(base) and args.save == str(tmp_path / "save")
    assert args.lr_decay_style == "WSD" and args.train_iters == 200_000
    assert args.lr_wsd_decay_iters == 30_000 == 0.15 * args.train_iters
    assert args.cooldown_start_iter == 170_000  # the blend switches where the decay starts
    assert args.cooldown_data_path == ["0.8", "/data/web_text_document", "0.2", "/data/math_text_document"]
    assert args.num_layers == PRESET_ARCH[preset]["num_layers"]  # from the checkpoint
    assert args.loop == retrofit
    assert (args.retrofit_loop == "8:12:2") == bool(retrofit)


def test_gpu_recipe_resumes_from_its_own_save(tmp_path):
    base, save = tmp_path / "base", tmp_path / "save"
    _fake_checkpoint(base, 170_000, PRESET_ARCH["smollm-360m"])
    _fake_checkpoint(save, 180_000, PRESET_ARCH["smollm-360m"])
    argv = _launches("cooldown_math_360m.sh", tmp_path, {"BASE": str(base), "DATA": "/d", "MATH": "/m",
                                                         "SAVE": str(save)})[0]
    assert argv[argv.index("--load") + 1] == str(save)


@pytest.mark.parametrize("script,retrofit", [("cooldown_math_cpu.sh", None), ("retrofit_cooldown_cpu.sh", "8-4x2-0")])
def test_cpu_cooldown_recipes(tmp_path, script, retrofit):
    """The CPU recipe trains the stable phase (170 of 200 WSD iterations) when BASE holds no
    checkpoint, then the 30-iteration cooldown with 20% math (and the retrofit loop)."""
    from megatron_growloop.pretrain import parse_pretrain_args

    env = {"BASE": str(tmp_path / "base"), "SAVE": str(tmp_path / "save"), "DATA": "/d/web", "MATH": "/d/math"}
    stable, cool = _launches(script, tmp_path, env)
    s = parse_pretrain_args(stable, world_size=1).args
    assert s.exit_interval == 170 and s.train_iters == 200 and s.lr_wsd_decay_iters == 30
    assert s.save == env["BASE"] and not s.cooldown_data_path and s.num_layers == 12
    # the cooldown step loads BASE; give it a stand-in checkpoint so its flags can be parsed
    _fake_checkpoint(tmp_path / "base", 170, dict(num_layers=12, hidden_size=64, num_attention_heads=4,
                                                  num_query_groups=2, ffn_hidden_size=176, kv_channels=16,
                                                  max_position_embeddings=512, padded_vocab_size=384))
    c = parse_pretrain_args(cool, world_size=1).args
    assert c.load == env["BASE"] and c.save == env["SAVE"]
    assert c.cooldown_start_iter == 170 and c.cooldown_data_path == ["0.8", "/d/web", "0.2", "/d/math"]
    assert c.loop == retrofit
    head = (ROOT / "examples" / "cooldown_math_cpu.sh").read_text()
    assert "synthetic arithmetic and variable-assignment corpus" in head
