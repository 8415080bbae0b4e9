"""Check a converted checkpoint against ``transformers``: logits and greedy tokens, at any TP/PP.

    torchrun --nproc_per_node 2 -m megatron_growloop.convert verify --hf DIR --load CKPT \\
        --tensor-model-parallel-size 2 --prompt "The capital of France is" --new-tokens 32

Logits come from megatron's forward-only pipeline schedule (PP > 1) or a plain
forward (PP = 1), gathered over TP.  Greedy decoding uses the KV-cached
:func:`~megatron_growloop.model.generate.greedy_generate` at PP = 1 and repeated full
forwards through the pipeline at PP > 1.  The last rank (last pipeline stage) loads
the HF model and compares; every rank returns the same report.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from transformers import AutoModelForCausalLM

from ..errors import UsageError
from ..model.generate import greedy_generate
from ..model.generate import logits as plain_logits
from ..model.implementation import Implementation
from ..training.inference import load_model


def _positions(batch: int, length: int, device) -> torch.Tensor:
    return torch.arange(length, device=device).unsqueeze(0).expand(batch, length)


@torch.no_grad()
def pipeline_logits(model, tokens: torch.Tensor) -> Optional[torch.Tensor]:
    """Logits ``[batch, seq, vocab]`` of a full forward; on the last pipeline stage only
    (None elsewhere).  Every rank of the model-parallel group must call it."""

    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return plain_logits(model, tokens)

    b, s = tokens.shape
    pos = _positions(b, s, tokens.device)

    def step(_data_iterator, m):
        return m(tokens, pos, None), None

    was_training = model.training
    model.eval()
    try:
        out = get_forward_backward_func()(
            forward_step_func=step,
            data_iterator=iter([None]),
            model=[model],
            num_microbatches=1,
            seq_length=s,
            micro_batch_size=b,
            forward_only=True,
        )
    finally:
        model.train(was_training)
    if not parallel_state.is_pipeline_last_stage():
        return None
    return out[0].detach()


@torch.no_grad()
def pipeline_greedy(model, prompt: torch.Tensor, new_tokens: int, vocab_size: int) -> torch.Tensor:
    """Greedy continuation on every rank (KV-cached at PP=1, full forwards through the pipeline otherwise)."""
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:

        return greedy_generate(model, prompt, new_tokens, use_cache=True, vocab_size=vocab_size)
    last = dist.get_world_size() - 1
    out = prompt
    for _ in range(new_tokens):
        lg = pipeline_logits(model, out)
        nxt = torch.zeros(out.shape[0], dtype=torch.long, device=out.device)
        if dist.get_rank() == last:
            nxt = lg[:, -1, :vocab_size].argmax(dim=-1)
        dist.broadcast(nxt, src=last)
        out = torch.cat([out, nxt[:, None]], dim=1)
    return out


@torch.no_grad()
def hf_greedy(hf_model, prompt: torch.Tensor, new_tokens: int, vocab_size: int) -> torch.Tensor:
    """Plain KV-cached greedy loop over ``transformers`` logits (no generation-config side effects)."""
    out, x, past = prompt, prompt, None
    for _ in range(new_tokens):
        res = hf_model(x, past_key_values=past, use_cache=True)
        past = res.past_key_values
        nxt = res.logits[:, -1, :vocab_size].argmax(dim=-1)
        out = torch.cat([out, nxt[:, None]], dim=1)
        x = nxt[:, None]
    return out


def compare_logits(ours: torch.Tensor, ref: torch.Tensor) -> Dict[str, float]:
    """Max absolute and relative (to the reference's max |logit|) error over the real vocabulary."""
    ours = ours[..., : ref.shape[-1]].float()
    diff = (ours - ref.float()).abs().max().item()
    scale = ref.float().abs().max().item()
    return {"max_abs_error": diff, "max_rel_error": diff / max(scale, 1e-30), "ref_max_abs": scale}


def verify(
    hf_dir: str,
    ckpt: str,
    prompts: Sequence[str] = (),
    token_prompts: Sequence[Sequence[int]] = (),
    new_tokens: int = 32,
    tolerance: float = 1e-4,
    transformer_impl: str = "local",
) -> Dict[str, Any]:
    """Compare checkpoint ``ckpt`` (at the current TP/PP) with the HF model in ``hf_dir``.

    Initialise the process groups first (:func:`~megatron_growloop.training.initialize.init_distributed`)."""

    model, meta, tok = load_model(ckpt, impl=Implementation(transformer_impl=transformer_impl))
    vocab = int((meta.get("hf") or {}).get("vocab_size") or (meta.get("tokenizer") or {}).get("vocab_size") or meta["arch"]["padded_vocab_size"])
    inputs: List[List[int]] = [list(map(int, t)) for t in token_prompts]
    if prompts:
        if tok is None:
            raise UsageError(f"checkpoint {ckpt!r} has no tokenizer; give --token-prompt ids instead of --prompt text")
        inputs += [tok.tokenize(p) for p in prompts]
    if not inputs:
        raise UsageError("give at least one --prompt or --token-prompt")
    is_cmp = dist.get_rank() == dist.get_world_size() - 1
    hf_model = None
    if is_cmp:

        hf_model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    results = []
    for ids in inputs:
        x = torch.tensor([ids], dtype=torch.long)
        lg = pipeline_logits(model, x)
        gen = pipeline_greedy(model, x, new_tokens, vocab) if new_tokens else x
        entry: Dict[str, Any] = {"prompt_tokens": len(ids)}
        if is_cmp:
            with torch.no_grad():
                ref = hf_model(x).logits
            entry.update(compare_logits(lg, ref))
            ref_gen = hf_greedy(hf_model, x, new_tokens, vocab) if new_tokens else x
            ours_new, ref_new = gen[0, len(ids):].tolist(), ref_gen[0, len(ids):].tolist()
            entry["tokens"] = ours_new
            entry["hf_tokens"] = ref_new
            entry["tokens_equal"] = ours_new == ref_new
        results.append(entry)
    report = None
    if is_cmp:
        worst = max(r["max_rel_error"] for r in results)
        report = {
            "tp": parallel_state.get_tensor_model_parallel_world_size(),
            "pp": parallel_state.get_pipeline_model_parallel_world_size(),
            "new_tokens": new_tokens,
            "tolerance": tolerance,
            "max_rel_error": worst,
            "all_tokens_equal": all(r["tokens_equal"] for r in results),
            "prompts": results,
        }
        report["ok"] = bool(worst <= tolerance and report["all_tokens_equal"])
    box = [report]
    dist.broadcast_object_list(box, src=dist.get_world_size() - 1)
    return box[0]


def format_report(report: Dict[str, Any]) -> str:
    lines = [f"verify TP={report['tp']} PP={report['pp']}: max relative logit error {report['max_rel_error']:.3e} "
             f"(tolerance {report['tolerance']:g}); {report['new_tokens']} greedy tokens identical: {report['all_tokens_equal']}"]
    for i, r in enumerate(report["prompts"]):
        lines.append(f"  prompt {i}: {r['prompt_tokens']} tokens, rel {r['max_rel_error']:.3e}, abs {r['max_abs_error']:.3e}, "
                     f"tokens equal {r['tokens_equal']}")
    lines.append("OK" if report["ok"] else "MISMATCH")
    return "\n".join(lines)


def dump(report: Dict[str, Any], path: Optional[str]) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(report, f, indent=2)
