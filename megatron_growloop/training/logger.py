"""Console and tensorboard logging of training metrics (one rank writes)."""

from __future__ import annotations

import datetime
import time
from typing import Dict, Optional

from torch.utils.tensorboard import SummaryWriter


def _fmt(name: str, value) -> str:
    if value is None:
        return f"{name} n/a"
    if isinstance(value, float):
        if name in ("lr",):
            return f"{name} {value:.3e}"
        if abs(value) >= 1e5 or (0 < abs(value) < 1e-3):
            return f"{name} {value:.3e}"
        return f"{name} {value:.4f}" if abs(value) < 100 else f"{name} {value:.1f}"
    return f"{name} {value}"


class MetricsLogger:
    """Writes ``iteration N/M | loss ... | ... | ETA h:mm:ss`` lines and tensorboard scalars."""

    CONSOLE_KEYS = (
        ("lm loss", "loss"),
        ("learning-rate", "lr"),
        ("grad-norm", "grad norm"),
        ("tokens-per-sec", "tokens/s"),
        ("tflops-per-device", "TFLOP/s/device"),
        ("mfu", "MFU"),
        ("effective-depth", "depth"),
        ("loop-repeats", "k"),
        ("step-time-ms", "step ms"),
    )

    def __init__(self, enabled: bool, tensorboard_dir: Optional[str], train_iters: int, start_iteration: int = 0):
        self.enabled = enabled
        self.train_iters = train_iters
        self.writer = None
        self._t0 = time.time()
        self._it0 = start_iteration
        if enabled and tensorboard_dir:

            self.writer = SummaryWriter(log_dir=tensorboard_dir, max_queue=20)

    def eta(self, iteration: int) -> str:
        done = iteration - self._it0
        if done <= 0:
            return "?"
        rate = (time.time() - self._t0) / done
        return str(datetime.timedelta(seconds=int(rate * (self.train_iters - iteration))))

    def log(self, iteration: int, metrics: Dict[str, float], console: bool = True) -> None:
        if not self.enabled:
            return
        if self.writer is not None:
            for k, v in metrics.items():
                if v is not None:
                    self.writer.add_scalar(k, float(v), iteration)
        if console:
            parts = [f"iteration {iteration:>6d}/{self.train_iters}"]
            for key, label in self.CONSOLE_KEYS:
                if key in metrics:
                    parts.append(_fmt(label, metrics[key]))
            parts.append(f"ETA {self.eta(iteration)}")
            print(" | ".join(parts), flush=True)

    def text(self, message: str) -> None:
        if self.enabled:
            print(message, flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
