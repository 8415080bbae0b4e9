"""``python -m megatron_growloop.eval {primitives,nll,sweep,lm-eval,export-tasks,corpus,tradeoff}``.

Runs in a plain process or under ``torchrun`` (TP/PP via
``--tensor-model-parallel-size`` / ``--pipeline-model-parallel-size``; remaining
ranks are data parallel).  Every rank runs the same driver loop in lock-step; only
global rank 0 prints results and writes files.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..errors import ArgumentParser, UsageError, cli_errors
from ..looping.cli import add_inference_loop_args, validate_inference_loop_args
from ..training.initialize import teardown
from ..data.tokenizer import build_tokenizer
from . import corpus, lm_tasks, plots, primitives, scoring, sft_sweep, sweeps, tradeoff
from .engine import LogProbEngine
from .lm_eval_run import lm_eval_at, run_lm_eval
from .loader import describe_model, load_for_eval, model_label
from .nll import build_eval_dataset, heldout_nll
from .parallel import is_driver

PROG = "megatron_growloop.eval"
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*not installed.*")


def _int_list(text: str) -> List[int]:
    try:
        return [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"expected comma-separated integers, got {text!r}") from None


def _model_args(p) -> None:
    g = p.add_argument_group("model")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--load", help="checkpoint directory (a --save dir or one iter_* dir)")
    src.add_argument("--hf", help="Hugging Face model directory (converted with megatron_growloop.convert)")
    add_inference_loop_args(p)
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--transformer-impl", choices=["local", "transformer_engine"], default="local")
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--batch-size", type=int, default=8, help="sequences per forward (full scoring)")
    g.add_argument("--max-length", type=int, default=None,
                   help="longest sequence a forward may see (default: the model's max positions)")
    g.add_argument("--no-shared-context", action="store_true",
                   help="score every choice with its own full forward (no KV-cache reuse of the prompt)")


def _task_args(p, with_fewshot: bool = True) -> None:
    g = p.add_argument_group("tasks")
    g.add_argument("--tasks", default="all", help="'all', a group (copy, va, va_math, va_d1) or comma-separated names")
    g.add_argument("--limit", type=int, default=100, help="items per task")
    if with_fewshot:
        g.add_argument("--num-fewshot", type=int, default=5, help="in-context examples per prompt")
    g.add_argument("--template", default="fill_blank", help="fill_blank (paper App. D) or continuation")
    g.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog=PROG, description="Evaluate megatron_growloop models: reasoning primitives, "
                "held-out NLL, block-repeat / in-context sweeps, lm-evaluation-harness.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)

    s = sub.add_parser("primitives", help="the 11 reasoning primitives (multiple choice, log-likelihood)")
    _model_args(s)
    _task_args(s)
    s.add_argument("--out", default=None, help="results JSON")
    s.add_argument("--log-samples", action="store_true", help="store per-item log-likelihoods in the JSON")

    s = sub.add_parser("nll", help="held-out negative log-likelihood on an indexed dataset")
    _model_args(s)
    s.add_argument("--data-path", nargs="+", default=None, help="PREFIX or 'W1 P1 W2 P2'; default: embedded corpus")
    s.add_argument("--split", default="969,30,1")
    s.add_argument("--split-name", default="valid", choices=["train", "valid", "test"])
    s.add_argument("--num-samples", type=int, default=64)
    s.add_argument("--seq-length", type=int, default=None, help="default: the model's training sequence length")
    s.add_argument("--micro-batch-size", type=int, default=4)
    s.add_argument("--data-seed", type=int, default=1234, help="the dataset seed (pretraining's --seed)")
    s.add_argument("--data-cache-path", default=None)
    s.add_argument("--out", default=None)

    s = sub.add_parser("sweep", help="repeat-block, in-context, fine-tuning and loop-repeat sweeps (JSON + PNG)")
    ssub = s.add_subparsers(dest="sweep", required=True, parser_class=ArgumentParser)
    r = ssub.add_parser("repeat-block", help="accuracy over block start x total applications R")
    _model_args(r)
    _task_args(r)
    r.add_argument("--block-size", type=int, default=4)
    r.add_argument("--starts", default="all", help="comma-separated start positions, or 'all'")
    r.add_argument("--repeats", default="1,2,3", help="comma-separated R values (1 = unmodified)")
    r.add_argument("--metric", default="acc_norm", choices=["acc", "acc_norm"], help="metric plotted")
    r.add_argument("--out", required=True, help="results JSON")
    r.add_argument("--plot", default=None, help="PNG (default: next to --out)")
    i = ssub.add_parser("icl", help="accuracy over the number of in-context examples")
    _model_args(i)
    _task_args(i, with_fewshot=False)
    i.add_argument("--shots", default=None, help="comma-separated shot counts (default: 0,1,2,3,5,8,10,15,20,...)")
    i.add_argument("--context-length", type=int, default=None,
                   help="largest prompt+answer in tokens (default: the model's training sequence length)")
    i.add_argument("--metric", default="acc_norm", choices=["acc", "acc_norm"], help="metric plotted")
    i.add_argument("--out", required=True)
    i.add_argument("--plot", default=None)

    f = ssub.add_parser("sft", help="fine-tune each model on N examples x seeds, evaluate held-out items (Fig. 8)")
    f.add_argument("--model", action="append", required=True, metavar="label=NAME,hf=DIR|load=CKPT[,retrofit_loop=S:E:R]",
                   help="a model to fine-tune (repeatable); retrofit_loop fine-tunes and evaluates with a block repeated")
    f.add_argument("--sft-tasks", default="va_code_d1,va_code_d2", help="primitives to fine-tune on and evaluate")
    f.add_argument("--examples", default="64,128,256,512",
                   help="comma-separated numbers of fine-tuning examples N (0: the model as it is)")
    f.add_argument("--seeds", default="0,1,2", help="comma-separated data seeds (--sft-seed of each fine-tune)")
    f.add_argument("--limit", type=int, default=100, help="held-out evaluation items per task")
    f.add_argument("--seed", type=int, default=0, help="seed of the held-out evaluation items")
    f.add_argument("--num-fewshot", type=int, default=0, help="demonstrations per prompt, in training and evaluation")
    f.add_argument("--template", default="fill_blank")
    f.add_argument("--finetune-args", default="",
                   help="flags for every fine-tune, e.g. \"--seq-length 256 --epochs 3 --lr 1e-4 --micro-batch-size 4\"")
    f.add_argument("--nproc-per-node", type=int, default=1, help="fine-tune under torchrun with this many ranks")
    f.add_argument("--keep-checkpoints", action="store_true", help="keep every cell's fine-tuned checkpoint")
    f.add_argument("--batch-size", type=int, default=8, help="sequences per forward in evaluation")
    f.add_argument("--metric", default="acc_norm", choices=["acc", "acc_norm"], help="metric plotted")
    f.add_argument("--out", required=True, help="results JSON (cells go to <out stem>_cells/)")
    f.add_argument("--plot", default=None)
    k = ssub.add_parser("loop-repeats", help="accuracy against k of a looped model or R of one block (Fig. 9, 17)")
    _model_args(k)
    _task_args(k)
    k.add_argument("--repeats", default="1,2,3,4", help="comma-separated k (looped model) or R (with --block)")
    k.add_argument("--block", default=None, metavar="START:END",
                   help="sweep the applications R of this block of effective-depth positions (any model)")
    k.add_argument("--lm-eval-tasks", default=None,
                   help="also run these lm-eval tasks at every point, through the lm-eval adapter "
                        "(model_args loop_repeats=k / repeat_block=S:E:R); rp_* tasks are generated locally")
    k.add_argument("--lm-eval-limit", type=int, default=None)
    k.add_argument("--compare", nargs="*", default=[], metavar="RESULT.json",
                   help="earlier loop-repeats results (other models) drawn in the same plot")
    k.add_argument("--label", default=None, help="this model's name in the plot")
    k.add_argument("--metric", default="acc_norm", choices=["acc", "acc_norm"], help="metric plotted")
    k.add_argument("--out", required=True)
    k.add_argument("--plot", default=None)

    s = sub.add_parser("lm-eval", help="run lm-evaluation-harness tasks (rp_* primitives are local)")
    _model_args(s)
    s.add_argument("--tasks", default="reasoning_primitives",
                   help="lm-eval task names; rp_<primitive> and the tag reasoning_primitives are generated locally")
    s.add_argument("--limit", type=int, default=None)
    s.add_argument("--num-fewshot", type=int, default=5, help="in-context examples baked into rp_* prompts")
    s.add_argument("--template", default="fill_blank")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--num-items", type=int, default=1000, help="items generated per rp_* task")
    s.add_argument("--lm-num-fewshot", type=int, default=None, help="lm-eval --num_fewshot for other tasks")
    s.add_argument("--out", default=None)

    s = sub.add_parser("export-tasks", help="write the primitives as local lm-eval tasks (JSONL + YAML)")
    s.add_argument("--dir", required=True)
    _task_args(s)
    s.add_argument("--num-items", type=int, default=1000)

    s = sub.add_parser("corpus", help="a focused pretraining corpus (continuation form) with evaluation items held out")
    s.add_argument("--out", required=True, help="output prefix: PREFIX.jsonl, PREFIX_text_document.{bin,idx}, "
                   "PREFIX.manifest.json")
    s.add_argument("--num-documents", type=int, default=corpus.CorpusSpec.num_documents)
    s.add_argument("--seed", type=int, default=corpus.CorpusSpec.seed, help="the corpus generator's seed")
    s.add_argument("--weights", default=",".join(f"{k}={w}" for k, w in corpus.CorpusSpec.weights),
                   help=f"KIND=WEIGHT,... over {', '.join(corpus.KINDS)} (per document)")
    s.add_argument("--va-depth-weights", default=",".join(str(w) for w in corpus.CorpusSpec.va_depth_weights),
                   help="weights of assignment depths 0,1,2,...")
    s.add_argument("--max-examples", type=int, default=corpus.CorpusSpec.max_examples)
    s.add_argument("--max-queries", type=int, default=corpus.CorpusSpec.max_queries)
    s.add_argument("--heldout-tasks", default="all", help="evaluation tasks whose items are held out ('' = none)")
    s.add_argument("--heldout-seeds", default="0", help="evaluation seeds held out, comma-separated")
    s.add_argument("--heldout-items", type=int, default=1000, help="items per task and seed held out")
    s.add_argument("--heldout-demos", type=int, default=20, help="in-context examples per item held out too")
    s.add_argument("--tokenizer-type", default="ByteTokenizer")
    s.add_argument("--tokenizer-model", default=None)
    s.add_argument("--train-tokenizer", type=int, default=None, metavar="VOCAB",
                   help="train a byte-level BPE of VOCAB tokens on the corpus (PREFIX_tokenizer/) and use it")

    s = sub.add_parser("tradeoff", help="Fig. 1: accuracy vs unique parameters, inference and training FLOPs")
    s.add_argument("--run", action="append", default=[], metavar="NAME=CKPT:RESULTS.json",
                   help="a checkpoint and its primitives result JSON; repeat a NAME for several seeds")
    s.add_argument("--metric", default="all", help="task group or comma-separated tasks averaged (e.g. copy,va_basic)")
    s.add_argument("--score", default="acc_norm", choices=list(tradeoff.SCORES))
    s.add_argument("--out", required=True, help="output directory: tradeoff.json, tradeoff.png")
    return p


# ---------------------------------------------------------------------------------- helpers
def _log(msg: str) -> None:
    if is_driver():
        print(msg, flush=True)


def _write_json(path: Optional[str], obj: Dict[str, Any], quiet: bool = False) -> None:
    if not path or not is_driver():
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)
    os.replace(tmp, path)
    if not quiet:
        print(f"wrote {path}", flush=True)


def _load(args):
    model, meta, tok = load_for_eval(
        load=args.load, hf=args.hf, loop_repeats=args.loop_repeats, repeat_blocks=args.repeat_block,
        tp=args.tensor_model_parallel_size, pp=args.pipeline_model_parallel_size,
        transformer_impl=args.transformer_impl, bf16=args.bf16,
    )
    return model, meta, tok, describe_model(model, meta)


def _engine(args, model, tok):
    return LogProbEngine(model, tok, max_length=args.max_length, batch_size=args.batch_size,
                         use_cache=not args.no_shared_context)


def _validate_task_args(args) -> None:
    primitives.resolve_tasks(args.tasks)
    primitives.get_template(args.template)
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be >= 1, got {args.limit}")
    if getattr(args, "num_fewshot", 0) is not None and getattr(args, "num_fewshot", 0) < 0:
        raise UsageError(f"--num-fewshot must be >= 0, got {args.num_fewshot}")


def _token_length(engine):
    def length(item) -> int:
        return max(len(c) + len(x) - 1 for c, x in (engine.encode_pair(*r) for r in item.requests()))

    return length


def _check_fits(engine, tasks, limit, seed, num_fewshot, template) -> None:
    """Fail early (one line) when a prompt is longer than the model's context."""

    length = _token_length(engine)
    for name in primitives.resolve_tasks(tasks):
        # The longest prompts are the deepest ones; check every item (tokenising is cheap).
        items = primitives.generate_task(name, limit, seed=seed, num_fewshot=num_fewshot, template=template)
        longest = max(length(it) for it in items)
        if longest > engine.max_length:
            raise UsageError(
                f"task {name} with --num-fewshot {num_fewshot}: prompts of up to {longest} tokens exceed the "
                f"model's context length of {engine.max_length} tokens (use a smaller --num-fewshot)"
            )


# ---------------------------------------------------------------------------------- commands
def cmd_primitives(args) -> Dict[str, Any]:
    _validate_task_args(args)
    model, meta, tok, info = _load(args)
    engine = _engine(args, model, tok)
    _check_fits(engine, args.tasks, args.limit, args.seed, args.num_fewshot, args.template)
    _log(f"model: {info['num_layers']} layers, schedule {info['schedule']}")
    t0 = time.time()
    res = scoring.evaluate_primitives(engine, args.tasks, limit=args.limit, seed=args.seed,
                                      num_fewshot=args.num_fewshot, template=args.template, log=_log)
    if not args.log_samples:
        res.pop("samples")
    res["model"] = info
    res["metric_note"] = ("acc: argmax of summed log-likelihood; acc_norm: argmax of log-likelihood / "
                          "len(choice) in characters (lm-eval); stderr: sample std / sqrt(n)")
    res["seconds"] = time.time() - t0
    _log(f"mean acc {res['summary']['mean_acc']:.3f}  mean acc_norm {res['summary']['mean_acc_norm']:.3f}")
    _write_json(args.out, res)
    return res


def cmd_nll(args) -> Dict[str, Any]:
    model, meta, tok, info = _load(args)
    engine = _engine(args, model, tok)
    seq = args.seq_length or int(meta["arch"]["seq_length"])
    if seq > engine.max_length:
        raise UsageError(f"--seq-length {seq} exceeds the model's context length of {engine.max_length} tokens")
    if args.micro_batch_size < 1:
        raise UsageError(f"--micro-batch-size must be >= 1, got {args.micro_batch_size}")
    ds = build_eval_dataset(tok, seq, args.num_samples, args.data_path, args.split, args.split_name,
                            args.data_seed, args.data_cache_path)
    res = heldout_nll(engine, ds, args.num_samples, args.micro_batch_size)
    res.update(model=info, data_path=args.data_path or "embedded default corpus", split=args.split,
               split_name=args.split_name, seq_length=seq)
    _log(f"held-out NLL {res['nll']:.4f} nats/token (perplexity {res['perplexity']:.2f}) over {res['tokens']} "
         f"tokens in {res['samples']} samples")
    _write_json(args.out, res)
    return res


def cmd_sweep_repeat(args) -> Dict[str, Any]:
    _validate_task_args(args)
    model, meta, tok, info = _load(args)
    engine = _engine(args, model, tok)
    _check_fits(engine, args.tasks, args.limit, args.seed, args.num_fewshot, args.template)
    starts = None if args.starts == "all" else _int_list(args.starts)
    res = sweeps.repeat_block_sweep(model, engine, args.tasks, block_size=args.block_size, starts=starts,
                                    repeats=_int_list(args.repeats), limit=args.limit, seed=args.seed,
                                    num_fewshot=args.num_fewshot, template=args.template, log=_log,
                                    on_update=lambda partial: _write_json(args.out, {**partial, "model": info,
                                                                                     "partial": True}, quiet=True))
    return _finish_sweep(args, res, info, plots.plot_repeat_block)


def _finish_sweep(args, res: Dict[str, Any], info, plot) -> Dict[str, Any]:
    """Record the model and write the sweep's JSON and (driver rank) its PNG."""

    res["model"] = info
    res["plot_metric"] = args.metric
    _write_json(args.out, res)
    if is_driver():
        path = args.plot or str(Path(args.out).with_suffix(".png"))
        plot(res, path, metric=args.metric)
        print(f"wrote {path}", flush=True)
    return res


def cmd_sweep_icl(args) -> Dict[str, Any]:
    _validate_task_args(args)
    model, meta, tok, info = _load(args)
    engine = _engine(args, model, tok)
    ctx = args.context_length or int(meta["arch"]["seq_length"])
    if ctx > engine.max_length:
        raise UsageError(f"--context-length {ctx} exceeds the model's context length of {engine.max_length} tokens")
    shots = _int_list(args.shots) if args.shots else None
    res = sweeps.icl_sweep(engine, args.tasks, shots=shots, max_length=ctx, token_length=_token_length(engine),
                           limit=args.limit, seed=args.seed, template=args.template, log=_log)
    return _finish_sweep(args, res, info, plots.plot_icl)


def cmd_sweep_sft(args) -> Dict[str, Any]:
    models = [sft_sweep.SweepModel.parse(m) for m in args.model]
    if args.limit < 1:
        raise UsageError(f"--limit must be >= 1, got {args.limit}")
    if args.nproc_per_node < 1:
        raise UsageError(f"--nproc-per-node must be >= 1, got {args.nproc_per_node}")
    primitives.get_template(args.template)
    extra = shlex.split(args.finetune_args)
    out = Path(args.out)
    root = out.with_name(out.stem + "_cells")

    def load_eval(load=None, hf=None, repeat_blocks=()):
        model, _, tok = load_for_eval(load=load, hf=hf, repeat_blocks=list(repeat_blocks))
        return model, LogProbEngine(model, tok, batch_size=args.batch_size)

    res = sft_sweep.sft_sweep(
        models, args.sft_tasks, _int_list(args.examples), _int_list(args.seeds), root, load_eval, limit=args.limit,
        eval_seed=args.seed, num_fewshot=args.num_fewshot, template=args.template, finetune_args=extra,
        nproc=args.nproc_per_node, keep_checkpoints=args.keep_checkpoints, log=_log,
        on_update=lambda partial: _write_json(args.out, {**partial, "partial": True}, quiet=True))
    res["plot_metric"] = args.metric
    _write_json(args.out, res)
    path = args.plot or str(out.with_suffix(".png"))
    plots.plot_sft(res, path, metric=args.metric)
    _log(f"wrote {path}")
    return res


def cmd_sweep_loop_repeats(args) -> Dict[str, Any]:
    _validate_task_args(args)
    others = []
    for p in args.compare:
        try:
            others.append(json.loads(Path(p).read_text()))
        except (OSError, ValueError):
            raise UsageError(f"--compare {p!r} is not a readable results JSON") from None
        if others[-1].get("kind") != "loop_repeats":
            raise UsageError(f"--compare {p!r} is not a loop-repeats sweep result")
    model, meta, tok, info = _load(args)
    engine = _engine(args, model, tok)
    _check_fits(engine, args.tasks, args.limit, args.seed, args.num_fewshot, args.template)
    extra = None
    base_blocks = list(model.config.repeat_blocks)
    if args.lm_eval_tasks:
        def extra(value, setting):
            key, _, spec = setting.partition("=")
            if key == "repeat_block":  # the model's own repeat blocks stay
                spec = ";".join([str(b) for b in base_blocks] + [spec])
            return lm_eval_at(model, tok, args.lm_eval_tasks, limit=args.lm_eval_limit, seed=args.seed,
                              num_fewshot=args.num_fewshot, template=args.template, batch_size=args.batch_size,
                              **{key: spec})
    res = sweeps.loop_repeats_sweep(model, engine, args.tasks, repeats=_int_list(args.repeats), block=args.block,
                                    limit=args.limit, seed=args.seed, num_fewshot=args.num_fewshot,
                                    template=args.template, log=_log, extra=extra)
    res["label"] = args.label or model_label(info)
    res["model"] = info
    res["plot_metric"] = args.metric
    _write_json(args.out, res)
    if is_driver():
        path = args.plot or str(Path(args.out).with_suffix(".png"))
        plots.plot_loop_repeats(res, path, metric=args.metric, others=others)
        print(f"wrote {path}", flush=True)
    return res


def cmd_lm_eval(args) -> Dict[str, Any]:
    return run_lm_eval(args, _load, _write_json, _log)


def cmd_export(args) -> Dict[str, Any]:
    _validate_task_args(args)
    names = lm_tasks.write_tasks(args.dir, args.tasks, n=args.num_items, seed=args.seed,
                                 num_fewshot=args.num_fewshot, template=args.template)
    print(f"wrote {len(names)} lm-eval tasks to {args.dir}: {', '.join(names)}", flush=True)
    return {"tasks": names, "dir": args.dir}


def cmd_corpus(args) -> Dict[str, Any]:
    spec = corpus.CorpusSpec(
        num_documents=args.num_documents, seed=args.seed, weights=corpus.parse_weights(args.weights),
        va_depth_weights=corpus.float_tuple(args.va_depth_weights, "--va-depth-weights"),
        max_examples=args.max_examples, max_queries=args.max_queries)
    heldout = corpus.HeldOut(tasks=corpus.resolve_heldout_tasks(args.heldout_tasks),
                             seeds=corpus.int_tuple(args.heldout_seeds, "--heldout-seeds"),
                             items=args.heldout_items, demos=args.heldout_demos)
    tok = None if args.train_tokenizer else build_tokenizer(args.tokenizer_type, args.tokenizer_model)
    t0 = time.time()
    manifest = corpus.build_corpus(spec, heldout, args.out, tok, tokenizer_vocab=args.train_tokenizer)
    print(f"wrote {manifest['total_documents']} documents ({manifest['total_chars']} characters) to "
          f"{manifest['data_prefix']}; held out {manifest['heldout_instances']} evaluation instances, dropped "
          f"{sum(manifest['stats']['dropped'].values())} documents, {manifest['heldout_questions_checked']} held-out "
          f"questions checked absent; {time.time() - t0:.0f} s", flush=True)
    return manifest


def cmd_tradeoff(args) -> Dict[str, Any]:
    report = tradeoff.tradeoff([tradeoff.RunSpec.parse(r) for r in args.run], args.metric, args.score)
    out = Path(args.out)
    _write_json(str(out / "tradeoff.json"), report)
    print(f"wrote {plots.plot_tradeoff(report, str(out / 'tradeoff.png'))}", flush=True)
    for m in report["models"]:
        print(f"{m['name']:24s} {report['score']} {m['accuracy']:.3f} ± {m['stderr']:.3f} ({m['n_runs']} run(s))  "
              f"params {m['unique_parameters']:.3e}  inference {m['inference_flops_per_token']:.3e} FLOP/token  "
              f"training {m['training_flops']:.3e} FLOPs", flush=True)
    for key, names in report["pareto"].items():
        print(f"Pareto front ({key}): {', '.join(names)}", flush=True)
    return report


LOCAL_COMMANDS = ("export-tasks", "corpus", "tradeoff")


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    with cli_errors(PROG):
        args = build_parser().parse_args(argv)
        local = args.command in LOCAL_COMMANDS or (args.command == "sweep" and args.sweep == "sft")
        if not local:
            validate_inference_loop_args(args)
        if args.command == "primitives":
            out = cmd_primitives(args)
        elif args.command == "nll":
            out = cmd_nll(args)
        elif args.command == "sweep":
            out = {"repeat-block": cmd_sweep_repeat, "icl": cmd_sweep_icl, "sft": cmd_sweep_sft,
                   "loop-repeats": cmd_sweep_loop_repeats}[args.sweep](args)
        elif args.command == "lm-eval":
            out = cmd_lm_eval(args)
        elif args.command == "corpus":
            out = cmd_corpus(args)
        elif args.command == "tradeoff":
            out = cmd_tradeoff(args)
        else:
            out = cmd_export(args)
        if args.command not in LOCAL_COMMANDS:
            teardown()
        return out
