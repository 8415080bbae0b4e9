"""The reasoning primitives as local lm-evaluation-harness tasks (nothing downloaded).

:func:`write_tasks` writes, per task, a JSONL file of items whose ``context``
already holds the in-context examples (pre-baked, so the shot count and the items
are exactly those of ``python -m megatron_growloop.eval primitives``), and a YAML
config (``dataset_path: json``, ``output_type: multiple_choice``, ``num_fewshot: 0``,
metrics ``acc`` and ``acc_norm``).  The task names are ``rp_<task>`` (e.g.
``rp_va_code_d1``) and all carry the tag ``reasoning_primitives``::

    python -m megatron_growloop.eval export-tasks --dir /tmp/rp_tasks
    lm_eval ... --include_path /tmp/rp_tasks --tasks reasoning_primitives   # with our model imported
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Dict, List, Optional

from ..paths import cache_dir
from . import primitives

PREFIX = "rp_"
TAG = "reasoning_primitives"
FORMAT_VERSION = 1


def lm_task_name(task: str) -> str:
    return PREFIX + task


def primitive_of(lm_name: str) -> Optional[str]:
    if lm_name.startswith(PREFIX) and lm_name[len(PREFIX):] in primitives.TASKS:
        return lm_name[len(PREFIX):]
    return None


def _yaml(task: str, data_file: str, delimiter: str, meta: Dict) -> str:
    return "\n".join([
        f"task: {lm_task_name(task)}",
        "tag:",
        f"  - {TAG}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {json.dumps(data_file)}",
        "test_split: test",
        "output_type: multiple_choice",
        "doc_to_text: context",
        "doc_to_choice: choices",
        "doc_to_target: gold",
        f"target_delimiter: {json.dumps(delimiter)}",
        "num_fewshot: 0",
        "metric_list:",
        "  - metric: acc",
        "    aggregation: mean",
        "    higher_is_better: true",
        "  - metric: acc_norm",
        "    aggregation: mean",
        "    higher_is_better: true",
        "metadata:",
        f"  version: {FORMAT_VERSION}.0",
        *(f"  {k}: {json.dumps(v)}" for k, v in meta.items()),
        "",
    ])


def write_tasks(
    out_dir: str,
    tasks="all",
    n: int = 1000,
    seed: int = 0,
    num_fewshot: int = primitives.DEFAULT_NUM_FEWSHOT,
    template=primitives.DEFAULT_TEMPLATE,
) -> List[str]:
    """Write JSONL + YAML for ``tasks`` into ``out_dir``; returns the lm-eval task names."""
    names = primitives.resolve_tasks(tasks)
    tmpl = primitives.get_template(template).name
    root = Path(out_dir).resolve()
    (root / "data").mkdir(parents=True, exist_ok=True)
    out = []
    for name in names:
        items = primitives.generate_task(name, n, seed=seed, num_fewshot=num_fewshot, template=tmpl)
        data = root / "data" / f"{name}.jsonl"
        tmp = data.with_name(data.name + f".tmp{os.getpid()}")
        with open(tmp, "w", encoding="utf-8") as f:
            for it in items:
                f.write(json.dumps({"task": it.task, "index": it.index, "context": it.context,
                                    "choices": list(it.choices), "gold": it.gold}) + "\n")
        os.replace(tmp, data)
        delims = {it.delimiter for it in items}
        if len(delims) != 1:
            raise RuntimeError(f"task {name}: items disagree on the answer delimiter {delims}")
        meta = {"seed": seed, "num_fewshot_prebaked": num_fewshot, "template": tmpl, "items": n}
        yml = root / f"{lm_task_name(name)}.yaml"
        tmp = yml.with_name(yml.name + f".tmp{os.getpid()}")
        tmp.write_text(_yaml(name, str(data), delims.pop(), meta), encoding="utf-8")
        os.replace(tmp, yml)
        out.append(lm_task_name(name))
    return out


def cached_task_dir(tasks="all", n: int = 1000, seed: int = 0,
                    num_fewshot: int = primitives.DEFAULT_NUM_FEWSHOT,
                    template=primitives.DEFAULT_TEMPLATE) -> str:
    """A task directory in the cache for these parameters (written once)."""

    names = primitives.resolve_tasks(tasks)
    tmpl = primitives.get_template(template).name
    key = hashlib.md5(json.dumps([FORMAT_VERSION, names, n, seed, num_fewshot, tmpl]).encode()).hexdigest()[:12]
    root = cache_dir() / "lm_eval_tasks" / key
    done = root / "DONE"
    if not done.exists():
        write_tasks(str(root), names, n, seed, num_fewshot, tmpl)
        done.write_text("ok\n")
    return str(root)
