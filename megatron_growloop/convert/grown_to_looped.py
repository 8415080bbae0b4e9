"""A depth-grown checkpoint -> a looped one, through the growth lineage.

    python -m megatron_growloop.convert grown-to-looped --load runs/midas --block 4:12 \\
        --tie mean --out ckpts/midas-looped [--repeats 3]

Depth growth (MIDAS, LIDAS, stacking) makes new layers as copies of old ones and records,
per layer, the initial layer it descends from (``growloop.json["lineage"]``: ``root`` and
``born``, :mod:`megatron_growloop.growth.operators`).  Layers ``S..E-1`` that are ``c``
consecutive copies of one block of ``L`` initial layers
(:func:`~megatron_growloop.growth.lineage.tie_plan`) compute the same function as that block
applied ``c`` times for as long as the copies are equal -- the paper's "growing is looping".
This tool ties them into one recurrent block: ``Loop(S-L×k-(N-E))`` with k = ``--repeats``
(default c), its block from

* ``mean``: the average of the c copies (per parameter),
* ``first``: the first copy,
* ``source``: per block layer, the copy closest to the source (the oldest line: the smallest
  ``born``, the first on ties).

The output is an ordinary looped checkpoint (weights only, iteration 0, like an imported
Hugging Face model): evaluation, generation, analysis, HF export and training
(``pretrain --load OUT --loop-repeats-dist ...``, a fresh optimizer) load it as usual.  The
run's cumulative training FLOPs and tokens carry over; ``tied_from`` records the source,
the copies, the tie and a probe comparison of the looped model's logits with the grown
model's (equal right after a growth step, when all copies are still equal).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from .. import accounting
from ..errors import UsageError
from ..growth.lineage import TIE_MODES, TiePlan, tie_plan
from ..model.arch import Arch
from ..model.generate import logits as model_logits
from ..training import checkpointing
from ..training.save_strategy import SyncSaveStrategy
from .hf_io import atomic_output_dir, check_new_output
from .megatron_io import build_single_rank_model, ensure_single_process

LAYER_PREFIX = "decoder.layers."
ITERATION = 0
TOKENIZER_SUBDIR = "tokenizer"


def parse_block(text: str):
    parts = str(text).split(":")
    try:
        start, end = (int(p) for p in parts)
    except ValueError:
        raise UsageError(f"invalid --block {text!r}: expected START:END with integers, e.g. 4:12") from None
    if start < 0 or end <= start:
        raise UsageError(f"invalid --block {text!r}: need 0 <= START < END")
    return start, end


def tie_state_dict(grown: Dict[str, Any], sources: List[List[int]]) -> Dict[str, Any]:
    """The looped model's state dict: unique layer ``u`` from the grown layers ``sources[u]``
    (floating tensors averaged over several, anything else from the first); the rest as is."""
    out: Dict[str, Any] = {k: v for k, v in grown.items() if not k.startswith(LAYER_PREFIX)}
    names = sorted({k.split(".", 3)[3] for k in grown if k.startswith(LAYER_PREFIX)})
    for u, positions in enumerate(sources):
        for name in names:
            values = [grown[f"{LAYER_PREFIX}{p}.{name}"] for p in positions]
            v = values[0]
            if len(values) > 1 and torch.is_tensor(v) and v.is_floating_point():
                v = (torch.stack([x.float() for x in values]).mean(0)).to(v.dtype)
            out[f"{LAYER_PREFIX}{u}.{name}"] = v
    return out


@torch.no_grad()
def logit_distance(a: torch.Tensor, b: torch.Tensor, vocab: int) -> Dict[str, float]:
    """How far logits ``b`` are from ``a`` (``[batch, seq, vocab]``) over the real vocabulary."""
    a, b = a[..., :vocab].double(), b[..., :vocab].double()
    la, lb = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
    return {
        "max_abs_logit_diff": float((a - b).abs().max()),
        "mean_abs_logit_diff": float((a - b).abs().mean()),
        "kl_grown_to_looped": float((la.exp() * (la - lb)).sum(-1).mean()),
        "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).double().mean()),
    }


def _probe_tokens(vocab: int, length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (2, length), generator=g)


def _check_source(meta: Dict[str, Any], load: str) -> List[Dict[str, int]]:
    arch = meta.get("arch") or {}
    if arch.get("loop"):
        raise UsageError(f"--load {load!r} is already looped (Loop({arch['loop']})); grown-to-looped needs a grown "
                         "(plain) checkpoint")
    lineage = meta.get("lineage")
    if not lineage:
        raise UsageError(
            f"--load {load!r} records no layer lineage (growloop.json 'lineage'; a model that never grew has none): "
            "grown-to-looped ties the copies made by depth growth (--grow-method); to loop a block of a plain model "
            "use pretrain --retrofit-loop START:END:R"
        )
    if len(lineage) != int(arch.get("num_layers", -1)):
        raise UsageError(f"--load {load!r}: its lineage lists {len(lineage)} layers but the model has "
                         f"{arch.get('num_layers')}")
    return lineage


def _tokenizer_entry(meta: Dict[str, Any], iter_tmp: Path, final_iter: Path) -> Dict[str, Any]:
    """The tokenizer record; a tokenizer stored inside the source checkpoint is copied along."""
    tok = dict(meta.get("tokenizer") or {})
    tok_type, tok_model = checkpointing.tokenizer_source(meta)
    src_dir = Path(meta["_dir"])
    if tok_model and Path(tok_model).is_dir() and Path(tok_model).resolve().is_relative_to(src_dir.resolve()):
        shutil.copytree(tok_model, iter_tmp / TOKENIZER_SUBDIR)
        tok["model"] = str(final_iter / TOKENIZER_SUBDIR)
    return tok


def grown_to_looped(load: str, out_dir: str, block: str, tie: str = "mean", repeats: Optional[int] = None,
                    probe_length: int = 64) -> Dict[str, Any]:
    """Write the looped checkpoint of ``load`` with layers ``block`` (``S:E``) tied; return the
    ``tied_from`` report (with ``"checkpoint"``: the new ``iter_*`` directory).  Nothing is
    written when anything is refused."""
    if tie not in TIE_MODES:
        raise UsageError(f"unknown --tie {tie!r}; choose one of: {', '.join(TIE_MODES)}")
    if repeats is not None and repeats < 1:
        raise UsageError(f"--repeats must be >= 1, got {repeats}")
    out = check_new_output(out_dir)
    meta = checkpointing.read_metadata(load)
    lineage = _check_source(meta, load)
    start, end = parse_block(block)
    plan: TiePlan = tie_plan(lineage, start, end)
    grown_arch = Arch.from_meta(meta["arch"])
    loop = plan.loop(repeats)
    looped_arch = grown_arch.with_depth(loop.unique_layers).with_loop(loop)
    sources = plan.sources(tie)

    ensure_single_process()
    grown = build_single_rank_model(grown_arch)
    checkpointing.load_checkpoint(meta["_dir"], [grown], load_rng=False)
    looped = build_single_rank_model(looped_arch)
    looped.load_state_dict(tie_state_dict(grown.state_dict(), sources), strict=True)

    vocab = int((meta.get("tokenizer") or {}).get("vocab_size") or grown_arch.padded_vocab_size)
    tokens = _probe_tokens(min(vocab, grown_arch.padded_vocab_size), min(probe_length, grown_arch.seq_length))
    probe = logit_distance(model_logits(grown, tokens), model_logits(looped, tokens), vocab)
    probe["tokens"] = int(tokens.numel())
    del grown

    seq = grown_arch.seq_length
    before = accounting.summary(grown_arch, grown_arch.padded_vocab_size, grown_arch.tied, seq, grown_arch.num_layers)
    after = accounting.summary(looped_arch, looped_arch.padded_vocab_size, looped_arch.tied, seq,
                               looped.effective_depth)
    new_lineage = [{"root": int(lineage[p[0]]["root"]), "born": min(int(lineage[q]["born"]) for q in p)}
                   for p in sources]
    report = {
        "source": str(Path(meta["_dir"]).resolve()),
        "source_iteration": int(meta.get("iteration", 0)),
        "block": f"{start}:{end}",
        "block_layers": plan.block,
        "copies": plan.copies,
        "copy_positions": [plan.positions(j) for j in range(plan.block)],
        "born": [list(b) for b in plan.born],
        "tie": tie,
        "loop": str(loop),
        "layer_sources": sources,
        "source_accounting": before,
        "probe": probe,
    }
    final_iter = out / checkpointing.iter_dir_name(ITERATION)
    new_meta = {
        "arch": looped_arch.to_meta(),
        "model_preset": meta.get("model_preset"),
        "accounting": after,
        "training_flops": float(meta.get("training_flops") or 0.0),
        "consumed_train_samples": 0,
        "tokens": int(meta.get("tokens") or 0),
        "lineage": new_lineage,
        "growth": None,
        "tied_from": report,
        "converted_by": "megatron_growloop.convert grown-to-looped",
    }
    if meta.get("hf"):
        new_meta["hf"] = meta["hf"]
    state = {"iteration": ITERATION, "consumed_train_samples": 0, "consumed_valid_samples": 0,
             "training_flops": new_meta["training_flops"], "tokens": new_meta["tokens"], "lineage": new_lineage}
    with atomic_output_dir(out) as tmp:
        iter_tmp = tmp / checkpointing.iter_dir_name(ITERATION)
        stage = tmp / ".stage"
        stage.mkdir()
        new_meta["tokenizer"] = _tokenizer_entry(meta, stage, final_iter)
        # one process: write in-process (fsynced) instead of megatron's forked async writers
        checkpointing.save_checkpoint(str(tmp), ITERATION, [looped], common={"state": state}, metadata=new_meta,
                                      sharded_strategy=SyncSaveStrategy(sync_files=True))
        if (stage / TOKENIZER_SUBDIR).exists():
            (stage / TOKENIZER_SUBDIR).rename(iter_tmp / TOKENIZER_SUBDIR)
        stage.rmdir()
    return {**report, "checkpoint": str(final_iter), "accounting": after}


def format_report(r: Dict[str, Any]) -> str:
    b, a, p = r["source_accounting"], r["accounting"], r["probe"]
    return "\n".join([
        f"tied layers {r['block']} ({r['copies']} copies of {r['block_layers']} layers; lineage born "
        f"{r['born']}) with --tie {r['tie']}: Loop({r['loop']})",
        f"unique layers {b['unique_layers']} -> {a['unique_layers']}, unique parameters "
        f"{b['unique_parameters']:,} -> {a['unique_parameters']:,}, effective depth {b['effective_depth']} -> "
        f"{a['effective_depth']}, inference {b['inference_flops_per_token'] / 1e9:.4f} -> "
        f"{a['inference_flops_per_token'] / 1e9:.4f} GFLOP/token",
        f"logits vs the grown (untied) model on {p['tokens']} probe tokens: max |diff| {p['max_abs_logit_diff']:.3e}, "
        f"mean |diff| {p['mean_abs_logit_diff']:.3e}, KL {p['kl_grown_to_looped']:.3e}, top-1 agreement "
        f"{p['top1_agreement']:.3f}",
    ])
