"""Helpers shared by the benchmark scripts: run pretraining in a subprocess, read its metrics."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]


def env() -> Dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e.setdefault("PYTHONWARNINGS", "ignore")
    return e


def run_pretrain(args: List[str], nproc: int = 1, timeout: int = 3600) -> List[dict]:
    """Run pretraining with ``--metrics-file`` and return the per-iteration records."""
    with tempfile.TemporaryDirectory() as d:
        metrics = Path(d) / "m.jsonl"
        if nproc == 1:
            cmd = [sys.executable, "-m", "megatron_growloop.pretrain"]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                   "-m", "megatron_growloop.pretrain"]
        proc = subprocess.run(cmd + args + ["--metrics-file", str(metrics)], env=env(), cwd=ROOT,
                              capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"pretrain failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return [json.loads(l) for l in metrics.read_text().splitlines() if l.strip()]


def steady(records: List[dict], warmup: int) -> List[dict]:
    return records[warmup:] if len(records) > warmup else records[-1:]


def median_step_time(records: List[dict], warmup: int = 2) -> float:
    return statistics.median(r["step_time_s"] for r in steady(records, warmup))


def print_table(rows: List[dict], columns: List[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print(" | ".join(c.ljust(widths[c]) for c in columns))
    print("-+-".join("-" * widths[c] for c in columns))
    for r in rows:
        print(" | ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_json(path: Optional[str], payload) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2))
        print(f"wrote {path}")


def saved_activation_bytes(trainer) -> int:
    """Bytes of the distinct non-parameter tensors autograd saves for backward in one
    forward pass (the activation memory of a step, device independent)."""
    import torch  # the parent benchmark processes do not import torch

    params = {p.untyped_storage().data_ptr() for p in trainer.unwrapped.parameters()}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    for m in trainer.model:
        m.zero_grad_buffer()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        trainer._fwd_bwd(trainer.train_iter, forward_only=False)
    return sum(seen.values())
