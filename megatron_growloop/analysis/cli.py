"""``python -m megatron_growloop.analysis {depth-score,lens,norms,local-effects,swap,repeat-sweep,icl-sweep,all,compare}``.

Every analysis command loads one model (``--load CKPT`` or ``--hf DIR``), takes prompts
from ``--data`` (an indexed dataset prefix, ``default`` = the embedded corpus, a
``.jsonl``/``.txt`` file, or ``primitives[:TASKS]``) and writes ``<kind>.json``,
``<kind>.npz`` and ``<kind>.png`` into ``--out``.  ``compare`` overlays result
directories of several models.  Runs in fp32 unless ``--bf16``; in a plain process or
under ``torchrun`` with ``--tensor-model-parallel-size`` (pipeline parallelism is not
supported: the analyses need every layer on one rank).  Only rank 0 prints and writes.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from ..errors import ArgumentParser, UsageError, cli_errors
from ..eval import plots, primitives, sweeps
from ..eval.engine import LogProbEngine
from ..eval.loader import describe_model, load_for_eval
from ..eval.parallel import is_driver
from ..looping.cli import add_inference_loop_args, validate_inference_loop_args
from ..training.initialize import teardown
from .access import AnalysisModel
from .depth import depth_score
from .lens import TunedLens, lens_analysis
from .local import local_effects
from .norms import residual_norms
from .overlay import compare
from .prompts import load_prompts
from .swap import layer_swap, make_task

PROG = "megatron_growloop.analysis"
ANALYSES = ("depth-score", "lens", "norms", "local-effects", "swap")
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*not installed.*")


def _ints(text: str, what: str) -> List[int]:
    try:
        vals = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{what} {text!r}: expected comma-separated integers") from None
    if not vals:
        raise UsageError(f"{what} is empty")
    return vals


def _positions(text: str) -> Optional[List[int]]:
    """``all`` -> None; ``START:STOP:STEP`` -> range; else a comma-separated list."""
    if text == "all":
        return None
    if ":" in text:
        parts = text.split(":")
        try:
            a, b, c = (int(x) for x in (parts + ["1"])[:3]) if len(parts) in (2, 3) else (None, None, None)
        except (TypeError, ValueError):
            a = None
        if a is None or c < 1 or a < 0 or b <= a:
            raise UsageError(f"--swap-positions {text!r}: expected 'all', START:STOP[:STEP] with 0 <= START < STOP, "
                             "or a comma-separated list")
        return list(range(a, b, c))
    vals = _ints(text, "--swap-positions")
    if min(vals) < 0:
        raise UsageError(f"--swap-positions {text!r}: positions must be >= 0")
    return vals


def _model_args(p) -> None:
    g = p.add_argument_group("model")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--load", help="checkpoint directory (a --save dir or one iter_* dir)")
    src.add_argument("--hf", help="Hugging Face model directory (converted with megatron_growloop.convert, cached)")
    add_inference_loop_args(p)
    g.add_argument("--label", default=None, help="model name in figures (default: from its structure)")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--bf16", action="store_true", help="run the model in bf16 (default fp32)")
    g.add_argument("--out", required=True, help="output directory (JSON, NPZ and PNG per analysis)")


def _prompt_args(p) -> None:
    g = p.add_argument_group("prompts")
    g.add_argument("--data", default="default",
                   help="indexed dataset PREFIX, 'default' (embedded corpus), 'pydoc' (Python's help text), "
                        "FILE.jsonl/.txt, or primitives[:TASKS]")
    g.add_argument("--num-prompts", type=int, default=16)
    g.add_argument("--seq-len", type=int, default=128, help="tokens per prompt (longer ones are cut)")
    g.add_argument("--batch-size", type=int, default=2, help="prompts per forward")
    g.add_argument("--seed", type=int, default=123, help="seed of the split points t")


def _intervention_args(p) -> None:
    g = p.add_argument_group("interventions (depth score, local effects)")
    g.add_argument("--mode", choices=["future", "current"], default="future",
                   help="future: intervene on positions [1,t), measure at >= t (Csordás); current: all positions")
    g.add_argument("--num-splits", type=int, default=4, help="split points t per prompt (future mode)")


def _lens_args(p) -> None:
    g = p.add_argument_group("tuned lens")
    g.add_argument("--lens-load", default=None, help="a saved tuned lens directory (skip training)")
    g.add_argument("--lens-data", default=None, help="held-out training text (default: --data after the analysis prompts)")
    g.add_argument("--lens-prompts", type=int, default=64, help="training sequences")
    g.add_argument("--lens-steps", type=int, default=100, help="training steps (tuned-lens default: 250)")
    g.add_argument("--lens-batch-size", type=int, default=4)
    g.add_argument("--lens-optimizer", choices=["sgd", "adam"], default="sgd")
    g.add_argument("--lens-lr", type=float, default=None, help="sgd: unit lr (x (1-momentum)), default 1.0; adam: 1e-3")
    g.add_argument("--lens-init", choices=["zeros", "lstsq"], default="zeros",
                   help="zeros (tuned-lens) or a ridge-regression warm start")


def _task_args(p) -> None:
    g = p.add_argument_group("multiple-choice task (early exit, swaps)")
    g.add_argument("--task", default="va_math_d0", help="reasoning primitive for early-exit accuracy and swaps")
    g.add_argument("--task-items", type=int, default=20, help="items for the early-exit accuracy")
    g.add_argument("--num-fewshot", type=int, default=5)
    g.add_argument("--template", default="fill_blank")


def _swap_args(p) -> None:
    g = p.add_argument_group("layer swaps")
    g.add_argument("--swap-task", default=None, help="a reasoning primitive or lambada:FILE.jsonl (default: --task)")
    g.add_argument("--swap-items", type=int, default=50)
    g.add_argument("--swap-widths", default="1,2", help="comma-separated block widths")
    g.add_argument("--swap-metric", choices=["acc", "acc_norm"], default=None,
                   help="metric plotted (default: acc_norm for primitives, acc for lambada; both are saved)")
    g.add_argument("--swap-positions", default="all",
                   help="first positions of the swapped pairs: 'all', START:STOP:STEP or a comma-separated list")


def _sweep_args(p, repeat: bool) -> None:
    g = p.add_argument_group("repeat-block sweep" if repeat else "in-context sweep")
    g.add_argument("--tasks", default="all", help="reasoning primitives: 'all', a group or names")
    g.add_argument("--limit", type=int, default=50, help="items per task")
    if repeat:
        g.add_argument("--block-size", type=int, default=4)
        g.add_argument("--starts", default="all", help="comma-separated start positions or 'all'")
        g.add_argument("--repeats", default="1,2,3", help="total applications R (1 = unmodified)")
        g.add_argument("--sweep-fewshot", type=int, default=5)
    else:
        g.add_argument("--shots", default=None, help="comma-separated shot counts")
        g.add_argument("--context-length", type=int, default=None, help="default: the model's training sequence length")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog=PROG, description="Depth-utilisation diagnostics and residual-stream interventions "
                "(paper §4.1, App. B, App. E) on any model megatron_growloop loads.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    helps = {
        "depth-score": "skip each application: output effect, layer effects, depth score",
        "lens": "logit lens and tuned lens: KL, top-5 overlap, early-exit accuracy",
        "norms": "residual-stream norms and sublayer contributions",
        "local-effects": "future local effects heatmap (no propagation)",
        "swap": "accuracy with adjacent layers / 2-layer blocks swapped",
        "all": "depth-score, lens, norms, local-effects and swap (+ sweeps with --with-sweeps)",
    }
    for name, h in helps.items():
        s = sub.add_parser(name, help=h)
        _model_args(s)
        if name in ("depth-score", "lens", "norms", "local-effects", "all"):
            _prompt_args(s)
        if name in ("depth-score", "local-effects", "all"):
            _intervention_args(s)
        if name in ("lens", "all"):
            _lens_args(s)
        if name in ("lens", "swap", "all"):
            _task_args(s)
        if name in ("swap", "all"):
            _swap_args(s)
        if name == "swap":
            s.add_argument("--seed", type=int, default=123)
        if name == "all":
            s.add_argument("--with-sweeps", action="store_true", help="also the repeat-block and in-context sweeps")
            s.add_argument("--skip", default="", help="comma-separated analyses to leave out")
            _sweep_args(s, True)
            s.add_argument("--shots", default=None, help="in-context sweep: comma-separated shot counts")
            s.add_argument("--context-length", type=int, default=None)
    s = sub.add_parser("repeat-sweep", help="accuracy with a block repeated R times (eval package's sweep)")
    _model_args(s)
    _sweep_args(s, True)
    s.add_argument("--template", default="fill_blank")
    s.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("icl-sweep", help="accuracy over the number of in-context examples (eval package's sweep)")
    _model_args(s)
    _sweep_args(s, False)
    s.add_argument("--template", default="fill_blank")
    s.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("compare", help="overlay the results of several models")
    s.add_argument("dirs", nargs="+", help="result directories (--out of earlier runs)")
    s.add_argument("--labels", default=None, help="comma-separated model names, one per directory")
    s.add_argument("--normalize-depth", action="store_true", help="x axis as a fraction of the effective depth")
    s.add_argument("--out", required=True)
    return p


# ---------------------------------------------------------------------------------- helpers
def _is_driver() -> bool:
    return is_driver()


def _log(msg: str) -> None:
    if _is_driver():
        print(msg, flush=True)


def _validate(args) -> None:
    for name in ("num_prompts", "seq_len", "batch_size", "num_splits", "lens_prompts", "lens_batch_size",
                 "task_items", "swap_items", "limit", "block_size"):
        v = getattr(args, name, None)
        if v is not None and v < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if getattr(args, "lens_steps", None) is not None and args.lens_steps < 0:
        raise UsageError(f"--lens-steps must be >= 0, got {args.lens_steps}")
    if getattr(args, "num_fewshot", None) is not None and args.num_fewshot < 0:
        raise UsageError(f"--num-fewshot must be >= 0, got {args.num_fewshot}")
    if args.tensor_model_parallel_size < 1:
        raise UsageError(f"--tensor-model-parallel-size must be >= 1, got {args.tensor_model_parallel_size}")
    if getattr(args, "task", None):
        primitives.get_task(args.task)
    if getattr(args, "template", None):
        primitives.get_template(args.template)
    st = getattr(args, "swap_task", None)
    if st:
        if st.startswith("lambada:"):
            if not Path(st.split(":", 1)[1]).is_file():
                raise UsageError(f"--swap-task {st!r}: no such file")
            if getattr(args, "swap_metric", None) == "acc_norm":
                raise UsageError("--swap-metric acc_norm: LAMBADA reports acc only (greedy last word)")
        else:
            primitives.get_task(st)
    if getattr(args, "swap_widths", None):
        args.swap_widths_list = _ints(args.swap_widths, "--swap-widths")
        if min(args.swap_widths_list) < 1:
            raise UsageError(f"--swap-widths {args.swap_widths!r}: widths must be >= 1")
    if getattr(args, "swap_positions", None):
        args.swap_positions_list = _positions(args.swap_positions)
    if getattr(args, "tasks", None):
        primitives.resolve_tasks(args.tasks)
    if getattr(args, "lens_load", None) and not Path(args.lens_load).is_dir():
        raise UsageError(f"--lens-load {args.lens_load!r}: no such directory")
    if getattr(args, "skip", ""):
        bad = [s for s in args.skip.split(",") if s and s not in ANALYSES]
        if bad:
            raise UsageError(f"--skip {args.skip!r}: unknown analyses {bad}; choose from {', '.join(ANALYSES)}")
    for name, what in (("repeats", "--repeats"), ("shots", "--shots")):
        v = getattr(args, name, None)
        if v:
            _ints(v, what)
    if getattr(args, "starts", None) not in (None, "all"):
        _ints(args.starts, "--starts")


def _load(args):
    model, meta, tok = load_for_eval(load=args.load, hf=args.hf, loop_repeats=args.loop_repeats,
                                     repeat_blocks=args.repeat_block, tp=args.tensor_model_parallel_size, pp=1,
                                     bf16=args.bf16)
    info = describe_model(model, meta)
    am = AnalysisModel(model, tok, info=info, label=args.label)
    _log(f"model: {am.label}; schedule {am.schedule}; boundaries {info.get('boundaries')}")
    return am, meta


def _save(result, out: str) -> None:
    if _is_driver():
        paths = result.save(out)
        _log("wrote " + ", ".join(paths))


def _prompts(args, am):
    ps = load_prompts(args.data, am.tokenizer, args.num_prompts, args.seq_len, offset=0)
    _log(f"prompts: {ps.describe()}")
    return ps


def _probe(prompts):
    tokens, _, _ = next(prompts.batches(min(2, len(prompts))))
    return tokens


# ---------------------------------------------------------------------------------- analyses
def run_depth_score(args, am, prompts):
    t0 = time.time()
    r = depth_score(am, prompts, mode=args.mode, num_splits=args.num_splits, seed=args.seed,
                    batch_size=args.batch_size, log=_log)
    r.config["seconds"] = time.time() - t0
    _log(f"depth score {r.scalars['depth_score']:.3f} ({r.scalars['depth_score_normalized']:.3f} of depth); "
         f"noise floor {r.scalars['noise_floor']}  [{time.time() - t0:.0f}s]")
    _save(r, args.out)
    return r


def run_norms(args, am, prompts):
    t0 = time.time()
    r = residual_norms(am, prompts, batch_size=args.batch_size)
    r.config["seconds"] = time.time() - t0
    _log(f"norms: residual {r.arrays['resid_mean'][0]:.2f} -> {r.scalars['final_resid_mean']:.2f}  [{time.time() - t0:.0f}s]")
    _save(r, args.out)
    return r


def run_local_effects(args, am, prompts):
    t0 = time.time()
    r = local_effects(am, prompts, mode=args.mode, num_splits=args.num_splits, seed=args.seed,
                      batch_size=args.batch_size, log=_log)
    r.config["seconds"] = time.time() - t0
    _log(f"local effects: noise floor {r.scalars['noise_floor']:.1e}  [{time.time() - t0:.0f}s]")
    _save(r, args.out)
    return r


def run_lens(args, am, prompts):
    t0 = time.time()
    lens, fit_prompts = None, None
    if args.lens_load:
        lens = TunedLens.load(args.lens_load).to(am.device)
    else:
        spec = args.lens_data or args.data
        offset = 0 if args.lens_data else args.num_prompts
        fit_prompts = load_prompts(spec, am.tokenizer, args.lens_prompts, args.seq_len, offset=offset, seed=1)
        _log(f"tuned-lens training text: {fit_prompts.describe()}")
    fit_kwargs = {"steps": args.lens_steps, "batch_size": args.lens_batch_size, "optimizer": args.lens_optimizer,
                  "lr": args.lens_lr, "init": args.lens_init}
    r, lens = lens_analysis(am, prompts, lens=lens, fit_prompts=fit_prompts, fit_kwargs=fit_kwargs,
                            task=args.task, task_items=args.task_items, num_fewshot=args.num_fewshot,
                            template=args.template, batch_size=args.batch_size, log=_log)
    r.config["seconds"] = time.time() - t0
    if args.lens_load:
        r.config["lens_loaded_from"] = args.lens_load
    _log(f"lens: mean KL logit {r.scalars['mean_logit_kl']:.3f}, tuned {r.scalars['mean_tuned_kl']:.3f}  "
         f"[{time.time() - t0:.0f}s]")
    _save(r, args.out)
    if _is_driver() and not args.lens_load:
        path = lens.save(Path(args.out) / "tuned_lens")
        _log(f"wrote {path}")
    return r


def run_swap(args, am, prompts=None):
    t0 = time.time()
    spec = args.swap_task or args.task
    task = make_task(spec, args.swap_items, seed=0, num_fewshot=args.num_fewshot, template=args.template)
    probe = _probe(prompts) if prompts is not None else torch_probe(am)
    r = layer_swap(am, task, widths=args.swap_widths_list, positions=args.swap_positions_list, probe=probe, log=_log,
                   metric=args.swap_metric)
    r.config["seconds"] = time.time() - t0
    _log(f"swap: baseline {r.scalars['baseline']}; null-swap noise floor {r.scalars['noise_floor']:.1e}  "
         f"[{time.time() - t0:.0f}s]")
    _save(r, args.out)
    return r


def torch_probe(am):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, am.vocab_size, (2, 32), generator=g)


def run_repeat_sweep(args, am) -> Dict[str, Any]:
    engine = LogProbEngine(am.model, am.tokenizer, vocab_size=am.vocab_size)
    starts = None if args.starts == "all" else _ints(args.starts, "--starts")
    res = sweeps.repeat_block_sweep(am.model, engine, args.tasks, block_size=args.block_size, starts=starts,
                                    repeats=_ints(args.repeats, "--repeats"), limit=args.limit,
                                    seed=getattr(args, "sweep_seed", 0),
                                    num_fewshot=getattr(args, "sweep_fewshot", 5),
                                    template=args.template, log=_log)
    res["model"] = am.describe()
    _write(args.out, "repeat_sweep", res, lambda p: plots.plot_repeat_block(res, p))
    return res


def run_icl_sweep(args, am, meta) -> Dict[str, Any]:
    engine = LogProbEngine(am.model, am.tokenizer, vocab_size=am.vocab_size)
    ctx = args.context_length or int(meta["arch"]["seq_length"])
    if ctx > engine.max_length:
        raise UsageError(f"--context-length {ctx} exceeds the model's context length of {engine.max_length}")

    def length(item) -> int:
        return max(len(c) + len(x) - 1 for c, x in (engine.encode_pair(*r) for r in item.requests()))

    shots = _ints(args.shots, "--shots") if args.shots else None
    res = sweeps.icl_sweep(engine, args.tasks, shots=shots, max_length=ctx, token_length=length, limit=args.limit,
                           seed=getattr(args, "sweep_seed", 0), template=args.template, log=_log)
    res["model"] = am.describe()
    _write(args.out, "icl_sweep", res, lambda p: plots.plot_icl(res, p))
    return res


def _write(out: str, kind: str, obj: Dict[str, Any], plot) -> None:
    if not _is_driver():
        return
    Path(out).mkdir(parents=True, exist_ok=True)
    path = Path(out) / f"{kind}.json"
    tmp = path.with_suffix(f".json.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n")
    os.replace(tmp, path)
    png = str(Path(out) / f"{kind}.png")
    plot(png)
    _log(f"wrote {path}, {png}")


# ---------------------------------------------------------------------------------- main
def main(argv: Optional[List[str]] = None):
    with cli_errors(PROG):
        args = build_parser().parse_args(argv)
        if args.command == "compare":

            labels = [s.strip() for s in args.labels.split(",")] if args.labels else None
            paths = compare(args.dirs, args.out, labels=labels, normalize_depth=args.normalize_depth)
            for k, v in paths.items():
                print(f"wrote {v}", flush=True)
            return paths
        validate_inference_loop_args(args)
        _validate(args)
        am, meta = _load(args)
        out: Dict[str, Any] = {}
        try:
            if args.command == "repeat-sweep":
                args.sweep_seed = args.seed
                out["repeat_sweep"] = run_repeat_sweep(args, am)
            elif args.command == "icl-sweep":
                args.sweep_seed = args.seed
                out["icl_sweep"] = run_icl_sweep(args, am, meta)
            elif args.command == "swap":
                out["swap"] = run_swap(args, am)
            else:
                prompts = _prompts(args, am)
                todo = list(ANALYSES) if args.command == "all" else [args.command]
                if args.command == "all" and args.skip:
                    todo = [t for t in todo if t not in args.skip.split(",")]
                runners = {"depth-score": run_depth_score, "norms": run_norms, "local-effects": run_local_effects,
                           "lens": run_lens, "swap": run_swap}
                for name in todo:
                    _log(f"== {name}")
                    out[name] = runners[name](args, am, prompts)
                if args.command == "all" and args.with_sweeps:
                    args.sweep_seed = 0
                    _log("== repeat-sweep")
                    out["repeat_sweep"] = run_repeat_sweep(args, am)
                    _log("== icl-sweep")
                    out["icl_sweep"] = run_icl_sweep(args, am, meta)
                if args.command == "all" and _is_driver():
                    _summary(args.out, out)
        finally:
            teardown()
        return out


def _summary(out_dir: str, results: Dict[str, Any]) -> None:
    s: Dict[str, Any] = {}
    for name, r in results.items():
        if hasattr(r, "scalars"):
            s[r.kind] = {k: v for k, v in r.scalars.items() if not isinstance(v, list)}
            s["model"] = r.model
    Path(out_dir, "summary.json").write_text(json.dumps(s, indent=1, default=str) + "\n")
