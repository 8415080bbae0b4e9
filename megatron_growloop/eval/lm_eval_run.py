"""``python -m megatron_growloop.eval lm-eval``: lm-evaluation-harness on our models.

``rp_*`` task names and the tag ``reasoning_primitives`` are generated locally
(:mod:`megatron_growloop.eval.lm_tasks`); any other name is passed to lm-eval's
own task registry (which may download its dataset from the Hugging Face Hub).
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Dict, List, Optional

import torch.distributed as dist

from ..errors import UsageError
from . import lm_tasks, primitives


def _lm_eval():
    """lm-eval and the adapter on it, imported when needed: lm-eval is an optional extra, and the
    rest of the evaluation CLI (primitives, NLL, sweeps) must work without it."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UsageError("lm-eval is not installed: pip install 'megatron_growloop[eval]' (or lm-eval>=0.4.8)") from None
    from .harness import GrowLoopLM  # the adapter subclasses lm-eval's TemplateLM

    return lm_eval, TaskManager, GrowLoopLM


def _split_tasks(spec: str):
    names = [t.strip() for t in str(spec).split(",") if t.strip()]
    if not names:
        raise UsageError("--tasks is empty")
    prims: List[str] = []
    others: List[str] = []
    for n in names:
        if n in (lm_tasks.TAG, "rp_all"):
            prims.extend(p for p in primitives.TASKS if p not in prims)
        elif n.startswith(lm_tasks.PREFIX):
            p = lm_tasks.primitive_of(n)
            if p is None:
                raise UsageError(
                    f"unknown reasoning-primitive task {n!r}; choose from: "
                    f"{', '.join(lm_tasks.lm_task_name(t) for t in primitives.TASKS)} or {lm_tasks.TAG}"
                )
            if p not in prims:
                prims.append(p)
        else:
            others.append(n)
    return prims, others


def run_lm_eval(args, load: Callable, write_json: Callable, log: Callable) -> Dict[str, Any]:


    if not _wants_downloads(args.tasks):
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    prims, others = _split_tasks(args.tasks)
    primitives.get_template(args.template)
    if args.num_fewshot < 0:
        raise UsageError(f"--num-fewshot must be >= 0, got {args.num_fewshot}")
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be >= 1, got {args.limit}")
    model, meta, tok, info = load(args)
    task_dir = _task_dir(prims, max(args.num_items, args.limit or 0), args.seed, args.num_fewshot, args.template)
    lm_eval, TaskManager, GrowLoopLM = _lm_eval()

    lm = GrowLoopLM(model=model, tokenizer=tok, batch_size=args.batch_size, max_length=args.max_length,
                    use_cache=not args.no_shared_context)
    tm = TaskManager(include_path=task_dir, include_defaults=bool(others)) if task_dir else TaskManager()
    task_names = [lm_tasks.lm_task_name(p) for p in prims] + others
    t0 = time.time()
    out = lm_eval.simple_evaluate(
        model=lm, tasks=task_names, num_fewshot=args.lm_num_fewshot, limit=args.limit, task_manager=tm,
        log_samples=False, bootstrap_iters=1000, random_seed=args.seed,
    )
    results = {"results": out["results"] if out else {}, "model": info, "tasks": task_names,
               "config": {"num_fewshot_prebaked": args.num_fewshot, "template": args.template, "seed": args.seed,
                          "limit": args.limit, "task_dir": task_dir},
               "seconds": time.time() - t0}
    for name, r in results["results"].items():
        acc = r.get("acc,none")
        accn = r.get("acc_norm,none")
        if acc is not None:
            log(f"{name:18s} acc {acc:.3f}" + (f"  acc_norm {accn:.3f}" if accn is not None else ""))
    write_json(args.out, results)
    return results


def _wants_downloads(spec: str) -> bool:
    return any(not (t.strip().startswith(lm_tasks.PREFIX) or t.strip() == lm_tasks.TAG)
               for t in str(spec).split(",") if t.strip())


def _task_dir(prims: List[str], n_items: int, seed: int, num_fewshot: int, template) -> Optional[str]:
    """The local lm-eval task directory of the ``rp_*`` primitives (written by rank 0, cached)."""
    if not prims:
        return None
    task_dir = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        task_dir = lm_tasks.cached_task_dir(prims, n_items, seed, num_fewshot, template)
    if dist.is_initialized():
        box = [task_dir]
        dist.broadcast_object_list(box, src=0)
        task_dir = box[0]
    return task_dir


def lm_eval_at(model, tokenizer, tasks: str, limit: Optional[int] = None, seed: int = 0, num_fewshot: int = 5,
               template="fill_blank", batch_size: int = 8, num_items: int = 1000,
               loop_repeats: Optional[str] = None, repeat_block: Optional[str] = None) -> Dict[str, Dict[str, float]]:
    """lm-eval ``tasks`` on a loaded model at ``loop_repeats=k`` or ``repeat_block=S:E:R[;...]``,
    passed to the adapter exactly as ``--model_args`` would pass them: ``{task: {metric: value}}``
    (numeric metrics, lm-eval's ``metric,filter`` names)."""
    if not _wants_downloads(tasks):
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    prims, others = _split_tasks(tasks)
    task_dir = _task_dir(prims, max(num_items, limit or 0), seed, num_fewshot, template)
    lm_eval, TaskManager, GrowLoopLM = _lm_eval()

    lm = GrowLoopLM(model=model, tokenizer=tokenizer, batch_size=batch_size, loop_repeats=loop_repeats,
                    repeat_block=repeat_block)
    tm = TaskManager(include_path=task_dir, include_defaults=bool(others)) if task_dir else TaskManager()
    names = [lm_tasks.lm_task_name(p) for p in prims] + others
    out = lm_eval.simple_evaluate(model=lm, tasks=names, limit=limit, task_manager=tm, log_samples=False,
                                  bootstrap_iters=0, random_seed=seed)
    res = (out or {}).get("results", {})
    return {t: {k: float(v) for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                and "stderr" not in k} for t, r in res.items()}
