"""Result objects: numbers (JSON + NPZ) and the figure (PNG, matplotlib Agg) of one analysis.

Every analysis returns a subclass of :class:`Result` holding

* ``model`` -- the analysed model (label, schedule, effective depth, loop / repeat-block
  ``boundaries`` and growth ``grown_boundaries`` on the effective-depth axis);
* ``config`` -- every setting the numbers depend on (prompts, mode, seeds, ...);
* ``arrays`` -- named numpy arrays (also written to ``<kind>.npz``);
* ``scalars`` -- small numbers and lists (depth score, noise floor, ...).

``result.save(out_dir)`` writes ``<kind>.json``, ``<kind>.npz`` and ``<kind>.png``;
:func:`load_result` reads the JSON (+NPZ) back, e.g. for ``compare``.
"""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Type

import matplotlib
import matplotlib.pyplot as plt
import numpy as np

from ..errors import UsageError

_REGISTRY: Dict[str, Type["Result"]] = {}


def mpl():
    matplotlib.use("Agg", force=True)

    return plt


def _jsonable(x):
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and (x != x):
        return None
    return x


@dataclass
class Result:
    kind = "result"
    model: Dict[str, Any]
    config: Dict[str, Any]
    arrays: Dict[str, np.ndarray] = field(default_factory=dict)
    scalars: Dict[str, Any] = field(default_factory=dict)

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        _REGISTRY[cls.kind] = cls

    def to_dict(self) -> Dict[str, Any]:
        return _jsonable({"kind": self.kind, "model": self.model, "config": self.config,
                          "scalars": self.scalars, "arrays": self.arrays})

    def save(self, out_dir, plot: bool = True) -> List[str]:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        jpath = out / f"{self.kind}.json"
        tmp = jpath.with_suffix(f".json.tmp{os.getpid()}")
        tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        os.replace(tmp, jpath)
        paths.append(str(jpath))
        if self.arrays:
            npath = out / f"{self.kind}.npz"
            np.savez(npath, **{k: np.asarray(v) for k, v in self.arrays.items()})
            paths.append(str(npath))
        if plot:
            paths.append(self.plot(str(out / f"{self.kind}.png")))
        return paths

    def plot(self, path: str) -> str:  # pragma: no cover - overridden
        raise NotImplementedError

    # helpers ---------------------------------------------------------------
    @property
    def title(self) -> str:
        return str(self.model.get("label", ""))


def load_result(path) -> Result:
    """A result from its JSON file (or a directory + kind: ``load_result(dir / 'norms.json')``)."""

    for mod in ("depth", "norms", "local", "lens", "swap"):  # register the result classes
        importlib.import_module(f"{__package__}.{mod}")
    p = Path(path)
    d = json.loads(p.read_text())
    cls = _REGISTRY.get(d.get("kind"))
    if cls is None:

        raise UsageError(f"{path}: unknown result kind {d.get('kind')!r}")
    arrays = {k: np.asarray(v, dtype=float) if _numeric(v) else np.asarray(v, dtype=object)
              for k, v in (d.get("arrays") or {}).items()}
    npz = p.with_suffix(".npz")
    if npz.exists():
        with np.load(npz, allow_pickle=False) as z:
            arrays.update({k: z[k] for k in z.files})
    return cls(model=d["model"], config=d["config"], arrays=arrays, scalars=d.get("scalars") or {})


def _numeric(v) -> bool:
    try:
        np.asarray(v, dtype=float)
        return True
    except (TypeError, ValueError):
        return False


def draw_structure(ax, model: Dict[str, Any], axis: str = "x", offset: float = -0.5, scale: float = 1.0) -> None:
    """Mark loop / repeat-block boundaries (solid grey) and growth boundaries (dashed red)
    on the effective-depth axis (``offset`` puts a line between two positions)."""
    draw = ax.axvline if axis == "x" else ax.axhline
    for b in model.get("boundaries") or []:
        draw((b + offset) * scale, color="0.35", lw=0.9, ls="-", alpha=0.7)
    for b in _grown_positions(model):
        draw((b + offset) * scale, color="tab:red", lw=0.8, ls="--", alpha=0.7)


def _grown_positions(model: Dict[str, Any]) -> List[int]:
    """Growth boundaries (unique-layer index) mapped to effective-depth positions."""
    gb = model.get("grown_boundaries") or []
    sched = model.get("schedule") or []
    out = []
    for b in gb:
        for p in range(1, len(sched)):
            if sched[p] == b and sched[p - 1] == b - 1:
                out.append(p)
    return out
