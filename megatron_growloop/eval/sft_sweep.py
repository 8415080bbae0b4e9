"""``eval sweep sft``: the paper's fine-tuning experiment (§5.1, Fig. 8).

For every model x number of training examples N x seed: fine-tune with
``python -m megatron_growloop.finetune`` (a child process, so every cell starts from a clean
process and can run under ``torchrun``), evaluate the fine-tuned checkpoint on held-out items
of the same tasks, record the cell.  ``N = 0`` evaluates the model as it is (once per model).

Cells are written to ``<out stem>_cells/<label>/n<N>_s<seed>/cell.json`` as they finish; a
rerun keeps finished cells and resumes an interrupted fine-tune from its own checkpoint, so
the sweep survives interruption.  The result JSON holds every cell and, per model, task and
N, the mean and standard deviation over seeds (the paper's Fig. 8 bands; ``N = 0`` is one
evaluation, nothing varies with the seed).

Held-out items are items ``0..limit-1`` of the evaluation stream at ``--seed``; the
fine-tuning data is told to avoid exactly those questions (``--sft-heldout-items limit
--sft-heldout-seed seed``), so no evaluated question was trained on.
"""

from __future__ import annotations

import gc
import json
import os
import re
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from ..errors import UsageError
from ..looping.spec import RepeatBlock
from . import primitives
from .scoring import evaluate_items

MODEL_KEYS = ("label", "load", "hf", "retrofit_loop")
# finetune flags the sweep sets itself (per cell)
SWEEP_OWNED = ("--hf", "--pretrained-checkpoint", "--load", "--save", "--sft-tasks", "--sft-examples", "--sft-seed",
               "--sft-num-fewshot", "--sft-template", "--sft-heldout-items", "--sft-heldout-seed", "--sft-data",
               "--retrofit-loop", "--metrics-file")


@dataclass(frozen=True)
class SweepModel:
    """One model of the sweep: ``label=NAME,load=CKPT`` or ``label=NAME,hf=DIR``, optionally
    ``retrofit_loop=S:E:R`` (fine-tune and evaluate with that block repeated)."""

    label: str
    load: Optional[str] = None
    hf: Optional[str] = None
    retrofit_loop: Optional[str] = None

    @classmethod
    def parse(cls, text: str) -> "SweepModel":
        fields: Dict[str, str] = {}
        for part in str(text).split(","):
            if not part.strip():
                continue
            key, sep, value = part.partition("=")
            key = key.strip()
            if not sep or key not in MODEL_KEYS:
                raise UsageError(
                    f"--model {text!r}: expected comma-separated key=value with keys {', '.join(MODEL_KEYS)} "
                    "(e.g. label=base,hf=DIR,retrofit_loop=13:17:2)"
                )
            fields[key] = value.strip()
        if bool(fields.get("load")) == bool(fields.get("hf")):
            raise UsageError(f"--model {text!r}: give exactly one of load=CHECKPOINT or hf=HF_DIR")
        if not fields.get("label"):
            raise UsageError(f"--model {text!r}: give a label=NAME")
        if fields.get("retrofit_loop"):
            fields["retrofit_loop"] = str(RepeatBlock.parse(fields["retrofit_loop"], what="retrofit_loop"))
        return cls(**fields)

    def source_flags(self) -> List[str]:
        return ["--hf", self.hf] if self.hf else ["--pretrained-checkpoint", self.load]

    def to_dict(self) -> Dict[str, Any]:
        return {"label": self.label, "load": self.load, "hf": self.hf, "retrofit_loop": self.retrofit_loop}


def cell_dir(root: Path, label: str, n: int, seed: int) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", label)
    return root / safe / (f"n{n}" if n == 0 else f"n{n}_s{seed}")


def _child_env() -> Dict[str, str]:
    env = dict(os.environ)
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                 "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID"):
        env.pop(name, None)
    env["PYTHONWARNINGS"] = "ignore"
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_finetune_args(extra: Sequence[str]) -> None:
    owned = sorted({a.split("=")[0] for a in extra if a.split("=")[0] in SWEEP_OWNED})
    if owned:
        raise UsageError(f"--finetune-args must not set {', '.join(owned)}: the sweep sets them per cell")


def finetune_command(model: SweepModel, tasks: Sequence[str], n: int, seed: int, num_fewshot: int, template: str,
                     limit: int, eval_seed: int, save: Path, extra: Sequence[str], nproc: int) -> List[str]:
    """The child command that fine-tunes one cell (``--save X --load X``: reruns resume)."""
    launch = ([sys.executable, "-m", "megatron_growloop.finetune"] if nproc == 1 else
              [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(_free_port()), "-m", "megatron_growloop.finetune"])
    cmd = launch + model.source_flags() + [
        "--sft-tasks", ",".join(tasks), "--sft-examples", str(n), "--sft-seed", str(seed),
        "--sft-num-fewshot", str(num_fewshot), "--sft-template", template,
        "--sft-heldout-items", str(limit), "--sft-heldout-seed", str(eval_seed),
        "--save", str(save), "--load", str(save), "--metrics-file", str(save.parent / "metrics.jsonl"),
    ]
    if model.retrofit_loop:
        cmd += ["--retrofit-loop", model.retrofit_loop]
    return cmd + list(extra)


def _write_json(path: Path, obj: Dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def _run_finetune(cmd: List[str], log: Path) -> float:
    t0 = time.time()
    with open(log, "a") as f:
        f.write("$ " + " ".join(shlex.quote(c) for c in cmd) + "\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=_child_env())
    if proc.returncode != 0:
        lines = [l for l in log.read_text().splitlines() if l.strip()]
        raise UsageError(f"fine-tuning failed ({lines[-1] if lines else 'no output'}); see {log}")
    return time.time() - t0


def evaluate_checkpoint(load_eval: Callable, tasks: Sequence[str], limit: int, seed: int, num_fewshot: int,
                        template: str, **source) -> Dict[str, Any]:
    """Held-out accuracy (``acc``, ``acc_norm`` and standard errors) per task."""
    model, engine = load_eval(**source)
    try:
        out = {}
        for task in tasks:
            items = primitives.generate_task(task, limit, seed=seed, num_fewshot=num_fewshot, template=template)
            res, _ = evaluate_items(engine, items)
            out[task] = {k: res.to_dict()[k] for k in ("acc", "acc_norm", "acc_stderr", "acc_norm_stderr", "n")}
        return out
    finally:
        del model, engine
        gc.collect()


def aggregate(cells: List[Dict[str, Any]], models: Sequence[str], tasks: Sequence[str],
              examples: Sequence[int]) -> Dict[str, Any]:
    """``summary[model][task or 'mean'][metric] = {"n": [...], "mean": [...], "std": [...], "seeds": [...]}``;
    the std is over seeds (sample std, 0 for a single seed)."""
    out: Dict[str, Any] = {}
    for m in models:
        out[m] = {}
        for task in list(tasks) + ["mean"]:
            out[m][task] = {}
            for metric in ("acc", "acc_norm"):
                ns, means, stds, counts = [], [], [], []
                for n in examples:
                    vals = []
                    for c in cells:
                        if c["model"] != m or c["n"] != n:
                            continue
                        r = c["results"]
                        vals.append(statistics.fmean(r[t][metric] for t in tasks) if task == "mean" else r[task][metric])
                    if not vals:
                        continue
                    ns.append(n)
                    means.append(statistics.fmean(vals))
                    stds.append(statistics.stdev(vals) if len(vals) > 1 else 0.0)
                    counts.append(len(vals))
                out[m][task][metric] = {"n": ns, "mean": means, "std": stds, "seeds": counts}
    return out


def sft_sweep(models: Sequence[SweepModel], tasks: Sequence[str], examples: Sequence[int], seeds: Sequence[int],
              root: Path, load_eval: Callable, limit: int = 100, eval_seed: int = 0, num_fewshot: int = 0,
              template: str = primitives.DEFAULT_TEMPLATE, finetune_args: Sequence[str] = (), nproc: int = 1,
              keep_checkpoints: bool = False, log: Optional[Callable[[str], None]] = None,
              on_update: Optional[Callable[[Dict[str, Any]], None]] = None) -> Dict[str, Any]:
    """Run (or resume) the sweep; returns the result dictionary (see the module docstring)."""
    log = log or (lambda s: None)
    tasks = primitives.resolve_tasks(tasks)
    template = primitives.get_template(template).name
    labels = [m.label for m in models]
    if len(set(labels)) != len(labels):
        raise UsageError(f"--model labels must be distinct, got {labels}")
    examples = sorted({int(n) for n in examples})
    seeds = sorted({int(s) for s in seeds})
    if not examples or examples[0] < 0:
        raise UsageError(f"--examples must be integers >= 0, got {examples}")
    if not seeds:
        raise UsageError("--seeds is empty")
    for n in examples:
        if n and n % len(tasks):
            raise UsageError(f"--examples {n} cannot be split equally over the {len(tasks)} tasks {', '.join(tasks)}")
    check_finetune_args(finetune_args)
    cells: List[Dict[str, Any]] = []
    config = {"tasks": tasks, "examples": examples, "seeds": seeds, "limit": limit, "eval_seed": eval_seed,
              "num_fewshot": num_fewshot, "template": template, "finetune_args": list(finetune_args),
              "nproc_per_node": nproc}

    def result() -> Dict[str, Any]:
        return {"kind": "sft", "models": [m.to_dict() for m in models], "tasks": tasks, "config": config,
                "chance": {t: primitives.get_task(t).chance for t in tasks}, "cells": list(cells),
                "summary": aggregate(cells, labels, tasks, examples)}

    for model in models:
        for n in examples:
            for seed in (seeds if n else [None]):
                d = cell_dir(root, model.label, n, seed if seed is not None else 0)
                done = d / "cell.json"
                if done.exists():
                    cell = json.loads(done.read_text())
                    if cell.get("config") != _cell_config(config):
                        raise UsageError(f"{done} was made with other sweep settings; use another --out")
                    log(f"{model.label} N={n}{'' if seed is None else f' seed={seed}'}: kept ({done})")
                    cells.append(cell)
                    continue
                d.mkdir(parents=True, exist_ok=True)
                t0 = time.time()
                train_s = 0.0
                if n == 0:
                    source = dict(load=model.load, hf=model.hf,
                                  repeat_blocks=[model.retrofit_loop] if model.retrofit_loop else [])
                else:
                    ck = d / "checkpoint"
                    cmd = finetune_command(model, tasks, n, seed, num_fewshot, template, limit, eval_seed, ck,
                                           finetune_args, nproc)
                    log(f"{model.label} N={n} seed={seed}: fine-tuning ({d / 'finetune.log'})")
                    train_s = _run_finetune(cmd, d / "finetune.log")
                    source = dict(load=str(ck))
                results = evaluate_checkpoint(load_eval, tasks, limit, eval_seed, num_fewshot, template, **source)
                cell = {"model": model.label, "n": n, "seed": seed, "results": results, "config": _cell_config(config),
                        "train_seconds": round(train_s, 1), "seconds": round(time.time() - t0, 1)}
                if n:
                    metrics = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines() if l.strip()]
                    cell["losses"] = [m["loss"] for m in metrics]
                _write_json(done, cell)
                if n and not keep_checkpoints:
                    shutil.rmtree(d / "checkpoint", ignore_errors=True)
                mean = statistics.fmean(results[t]["acc_norm"] for t in tasks)
                log(f"{model.label} N={n}{'' if seed is None else f' seed={seed}'}: mean acc_norm {mean:.3f} "
                    f"({cell['seconds']:.0f}s)")
                cells.append(cell)
                if on_update:
                    on_update(result())
    return result()


def _cell_config(config: Dict[str, Any]) -> Dict[str, Any]:
    """What must match for a finished cell to be kept."""
    return {k: config[k] for k in ("tasks", "limit", "eval_seed", "num_fewshot", "template", "finetune_args")}
