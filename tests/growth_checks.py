"""Test helpers for growth: compare a post-growth checkpoint with the pre-growth one."""

from __future__ import annotations

import glob
import json
import os
from typing import Dict, List

import torch

LAYER_KEY = "decoder.layers."


def _flat(d, prefix="") -> Dict[str, object]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def load_plain(ckpt_dir: str) -> Dict[str, object]:
    """Every tensor (global, unsharded) and common value of a torch_dist checkpoint."""
    from megatron.core import dist_checkpointing

    return _flat(dist_checkpointing.load_plain_tensors(ckpt_dir))


def dump_dir(root: str, step: int) -> str:
    """The checkpoint the growth dump hook wrote for growth step ``step`` (1-based)."""
    found = glob.glob(os.path.join(root, f"step_{step}", "iter_*"))
    assert len(found) == 1, f"expected one dumped checkpoint for growth step {step}, found {found}"
    return found[0]


def compare_grown(pre_dir: str, post_dir: str) -> Dict[str, int]:
    """Assert the post-growth checkpoint equals the pre-growth one mapped by the source map.

    Every decoder-layer tensor (weights, and optimizer ``exp_avg``, ``exp_avg_sq`` and fp32
    ``param`` where saved) of new layer ``i`` must equal old layer ``src[i]`` bitwise; every
    other tensor must be unchanged; the Adam step of every param group must be unchanged.
    Returns how many layer slices of each kind were compared.
    """
    src: List[int] = json.load(open(os.path.join(post_dir, "growloop.json")))["growth_src"]
    pre, post = load_plain(pre_dir), load_plain(post_dir)
    counts: Dict[str, int] = {}
    tensor_keys = [k for k, v in post.items() if torch.is_tensor(v)]
    assert set(tensor_keys) == {k for k, v in pre.items() if torch.is_tensor(v)}, "different tensor keys"
    for k in tensor_keys:
        new, old = post[k], pre[k]
        if LAYER_KEY in k:
            assert new.shape[0] == len(src) and old.shape[0] == max(src) + 1, (k, new.shape, old.shape)
            for i, s in enumerate(src):
                assert torch.equal(new[i], old[s]), f"{k}: new layer {i} differs from old layer {s}"
            kind = k.split(".")[2] if k.startswith("optimizer.state.") else "weight"
            counts[kind] = counts.get(kind, 0) + len(src)
        else:
            assert torch.equal(new, old), f"{k} changed by growth"
    groups_pre = [v for k, v in pre.items() if k.endswith("param_groups")]
    groups_post = [v for k, v in post.items() if k.endswith("param_groups")]
    assert groups_pre and len(groups_pre) == len(groups_post)
    for gp, gq in zip(groups_pre, groups_post):
        assert [g.get("step") for g in gp] == [g.get("step") for g in gq], "Adam step changed"
        assert [g["lr"] for g in gp] == [g["lr"] for g in gq], "learning rate changed"
    return counts
