"""The package structure: no import cycle between packages, imports at module top.

Walks every module of ``megatron_growloop`` with ``ast`` (function-local imports
included, so a cycle cannot hide behind a lazy import) and checks the dependency
graph between its packages (``model``, ``training``, ``growth``, ...).
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Set, Tuple

PKG_DIR = Path(__file__).resolve().parents[1] / "megatron_growloop"
# Optional dependencies (extras): the only imports allowed inside functions.
OPTIONAL = {"transformer_engine", "lm_eval", "flash_attn", "apex", "accelerate"}
# Modules that exist to wrap an optional dependency (they import it at their top): importing them
# inside a function is importing that dependency lazily.
OPTIONAL_WRAPPERS = {"megatron_growloop.eval.harness"}
# The intended layering, bottom to top: a package may import only packages listed before it.
LAYERS = ["errors", "paths", "accounting", "platform", "looping", "model", "data", "training", "growth",
          "convert", "eval", "analysis", "plan", "generate", "finetune", "pretrain"]


def _imports() -> List[Tuple[str, str, bool]]:
    """``(importing module, imported module, inside a function)`` for every import statement."""
    out = []
    for path in sorted(PKG_DIR.rglob("*.py")):
        rel = path.relative_to(PKG_DIR.parent).with_suffix("")
        parts = list(rel.parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        module = ".".join(parts)
        tree = ast.parse(path.read_text())
        parents = {c: n for n in ast.walk(tree) for c in ast.iter_child_nodes(n)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = parts if is_pkg else parts[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                    targets = [f"{target}.{a.name}" for a in node.names]
                else:
                    targets = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            else:
                continue
            q, local = node, False
            while q in parents:
                q = parents[q]
                if isinstance(q, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    local = True
                    break
            out.extend((module, t, local) for t in targets)
    return out


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _package_graph() -> Dict[str, Set[str]]:
    graph: Dict[str, Set[str]] = defaultdict(set)
    known = {_package(f"megatron_growloop.{p.stem if p.is_file() else p.name}") for p in PKG_DIR.iterdir()}
    for src, dst, _ in _imports():
        if not dst.startswith("megatron_growloop."):
            continue
        a, b = _package(src), _package(dst)
        if b in known and a != b and a:
            graph[a].add(b)
    return graph


def test_no_import_cycle_between_packages():
    graph = _package_graph()
    state: Dict[str, int] = {}
    stack: List[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("package import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_packages_import_only_lower_layers():
    """The layering the architecture guide (docs/architecture.md) describes holds."""
    graph = _package_graph()
    order = {name: i for i, name in enumerate(LAYERS)}
    unknown = sorted((set(graph) | {b for bs in graph.values() for b in bs}) - set(order))
    assert not unknown, f"packages missing from LAYERS (place them in docs/architecture.md too): {unknown}"
    upward = [(a, b) for a, bs in graph.items() for b in bs if order[b] >= order[a]]
    assert not upward, f"imports against the layering: {sorted(upward)}"


def test_function_local_imports_are_optional_dependencies_only():
    local = sorted({(src, dst) for src, dst, is_local in _imports()
                    if is_local and dst.split(".")[0] not in OPTIONAL
                    and not any(dst == w or dst.startswith(w + ".") for w in OPTIONAL_WRAPPERS)})
    assert not local, f"move these imports to module top (no cycle forces them): {local}"


def test_the_cli_entry_points_import_without_the_optional_extras():
    """``pip install .`` (no extras) must run pretraining, fine-tuning, evaluation of the primitives,
    analysis and planning: none of their modules may import an optional dependency at its top."""
    import subprocess
    import sys

    blocked = "; ".join(f"sys.modules[{name!r}] = None" for name in sorted(OPTIONAL))
    code = (f"import sys; {blocked}; import megatron_growloop.pretrain, megatron_growloop.finetune, "
            "megatron_growloop.eval.cli, megatron_growloop.analysis.cli, megatron_growloop.plan.cli, "
            "megatron_growloop.generate, megatron_growloop.convert.cli")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PKG_DIR.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_every_package_directory_is_a_regular_package():
    """``find_packages`` (setup.py) ships only directories with an ``__init__.py``: without one,
    ``pip install .`` leaves the package out and the installed project fails outside the source tree."""
    missing = sorted(str(d.relative_to(PKG_DIR.parent)) for d in PKG_DIR.rglob("*")
                     if d.is_dir() and d.name != "__pycache__" and any(d.glob("*.py"))
                     and not (d / "__init__.py").exists())
    assert not missing, f"add an __init__.py to: {missing}"
