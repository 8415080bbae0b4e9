"""Where the project caches what it builds once (tokenizers, default data, fixtures), and whether the
process that owns a leftover file (a temporary dataset, a save lock) is still alive."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$MEGATRON_GROWLOOP_CACHE``, else ``$XDG_CACHE_HOME/megatron_growloop``, else ``~/.cache/...``."""
    env = os.environ.get("MEGATRON_GROWLOOP_CACHE")
    if env:
        path = Path(env)
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        path = Path(base) / "megatron_growloop"
    path.mkdir(parents=True, exist_ok=True)
    return path


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
