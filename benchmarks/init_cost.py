"""Start-up cost of layout-independent initialization (issue 14) at a real model size.

The model is built on the *meta* device (shapes only, no memory), its sharded state dict gives
every tensor's name, layer and full shape; then each full tensor is drawn on the CPU with a
seeded ``torch.Generator`` -- exactly what ``model/layout_init.py`` does per rank -- and timed.
Side by side, the same tensors are drawn the way megatron-core does (one shard per TP rank from
the default generator): at TP=t a rank draws 1/t of every TP-sharded tensor, while the
layout-independent rank draws the full tensor of every shard it holds.

    python benchmarks/init_cost.py --preset smollm-1.7b --out benchmarks/results/init_cost.json

Reported per rank of one pipeline stage holding all layers (PP=1); with PP=p every stage draws
1/p of the layers, for both methods alike.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import print_table, write_json  # noqa: E402
from megatron_growloop.model.arch import Arch, pad_vocab_size  # noqa: E402
from megatron_growloop.model.gpt import build_model  # noqa: E402
from megatron_growloop.model.layout_init import derive_seed, sharded_tensors  # noqa: E402
from megatron_growloop.model.presets import get_preset  # noqa: E402
from megatron_growloop.training.initialize import init_distributed  # noqa: E402


def tensors_of(preset: str):
    """``[(key, layer, full shape, TP-sharded dims)]`` of the model, from a meta-device build."""
    p = get_preset(preset)
    arch = Arch(num_layers=p.num_layers, hidden_size=p.hidden_size, num_attention_heads=p.num_attention_heads,
                num_query_groups=p.num_query_groups, ffn_hidden_size=p.ffn_hidden_size, kv_channels=p.kv_channels,
                seq_length=p.seq_length, max_position_embeddings=p.max_position_embeddings,
                padded_vocab_size=pad_vocab_size(p.vocab_size), rotary_base=p.rotary_base,
                untie_embeddings_and_output_weights=not p.tie_embeddings)
    with torch.device("meta"):
        model = build_model(arch, initialize=False, to_device=False)
    seen, out = set(), []
    for sh in sharded_tensors(model.sharded_state_dict()):
        k = sh.prepend_axis_num
        ident = (sh.key, tuple(sh.global_offset[:k]))
        if ident in seen or not isinstance(sh.data, torch.Tensor) or sh.data.dim() == 0:
            continue
        seen.add(ident)
        out.append((sh.key, ident[1], tuple(sh.global_shape[k:]), sh.data.dim() >= 2))
    return out


def time_draws(tensors, tp: int, layout_independent: bool, seed: int = 1234) -> float:
    """Seconds to draw, on one rank at tensor-parallel size ``tp``, what it initializes."""
    t0 = time.perf_counter()
    for key, layer, shape, sharded in tensors:
        if not sharded:  # norms: ones either way
            torch.ones(shape)
            continue
        if layout_independent:
            g = torch.Generator().manual_seed(derive_seed(seed, key, layer))
            torch.empty(shape).normal_(0.0, 0.02, generator=g)
        else:
            rows = max(1, shape[0] // tp)
            torch.empty((rows,) + shape[1:]).normal_(0.0, 0.02)
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="smollm-1.7b")
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    init_distributed(1, 1)
    torch.set_num_threads(1)
    tensors = tensors_of(a.preset)
    numel = sum(int(torch.Size(s).numel()) for _, _, s, _ in tensors)
    rows = []
    for tp in a.tp:
        mc = time_draws(tensors, tp, False)
        li = time_draws(tensors, tp, True)
        rows.append({"preset": a.preset, "tp": tp, "megatron_init_s": mc, "layout_independent_s": li,
                     "ratio": li / mc})
    print(f"{a.preset}: {len(tensors)} tensors, {numel / 1e9:.3f} B elements; one CPU thread "
          f"({torch.__version__}); PP=1 rank")
    print_table(rows, ["preset", "tp", "megatron_init_s", "layout_independent_s", "ratio"])
    write_json(a.out, {"preset": a.preset, "tensors": len(tensors), "elements": numel,
                       "threads": 1, "rows": rows})


if __name__ == "__main__":
    main()
