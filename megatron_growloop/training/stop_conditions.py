"""When a training run stops early: exit signals, a time limit, divergence.

Checked between training steps, with one small all-reduce so every rank decides alike.  The
all-reduce is of *host* values over a CPU (gloo) group: the check never waits for the device
(no host sync of its own), so it may run every step.  What it is given:

* the **gradient norm**, every step: megatron-core's optimizer returns it as a Python float (its
  ``get_grad_norm_fp32`` ``.item()``-s the norm to clip with), so it costs nothing more; a NaN/Inf
  loss makes the gradients, hence the norm, non-finite in the same step (``--clip-grad 0``: no
  norm is computed, ``None``);
* the **loss** only when a host value already exists -- the value reduced for logging at a log
  interval (the mean over the window: a NaN at any of its steps makes it NaN), ``None`` on the
  other steps.  A device tensor is refused (``TypeError``) rather than silently ``.item()``-ed.
  A NaN that only the loss would show is therefore caught at the next log interval, and
  :func:`~.checkpointing.save_checkpoint` independently refuses to save a non-finite model.

The conditions:


* **signals** (Megatron-LM ``--exit-signal-handler``: ``megatron/training/dist_signal_handler.py``
  records the signal in a handler, ``training.py`` ``checkpoint_and_decide_exit`` all-gathers the
  flags after every step, saves and exits).  Here SIGTERM and SIGUSR1 (what SLURM sends before
  preemption or the time limit) are handled by default: the running step finishes, a checkpoint
  is saved and the process exits 0 with a message.
* **time limit** (``--exit-duration-in-mins``, as Megatron-LM: minutes since the program started,
  all-reduced with MAX, then save and exit 0).
* **divergence**: a NaN/Inf loss or gradient norm stops the run with one line naming the
  iteration and the last good checkpoint, *without saving* (megatron-core's
  ``check_for_nan_in_loss_and_grad`` validates the loss in ``loss_func`` and the gradients in
  DDP's ``check_grads`` and is likewise fatal).  As in Megatron-LM, this check is off with fp16
  dynamic loss scaling, where an Inf gradient is the loss scaler's signal to skip the step.
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import torch
import torch.distributed as dist

from ..errors import UsageError

DEFAULT_EXIT_SIGNALS = ("SIGTERM", "SIGUSR1")
PROGRAM_START = time.time()  # Megatron-LM's _TRAIN_START_TIME: when the entry point was imported


class TrainingDiverged(UsageError):
    """The loss or gradient norm became NaN/Inf; nothing was saved after it did."""

    exit_code = 3


def parse_signals(names: Sequence[str]) -> tuple:
    """``["SIGTERM", "USR1"]`` -> signal numbers (one line for an unknown name)."""
    out = []
    for name in names:
        n = name.strip().upper()
        n = n if n.startswith("SIG") else "SIG" + n
        sig = getattr(signal, n, None)
        if not isinstance(sig, signal.Signals) or n in ("SIGKILL", "SIGSTOP"):
            raise UsageError(f"--exit-signals: {name!r} is not a catchable signal (e.g. SIGTERM, SIGUSR1)")
        out.append(sig)
    return tuple(out)


class SignalFlag:
    """Records exit signals (the handler only sets a flag; the loop acts between steps)."""

    def __init__(self, signals: Sequence[signal.Signals]):
        self.signals = tuple(signals)
        self.received: Optional[signal.Signals] = None
        self._previous: Dict[signal.Signals, object] = {}

    def install(self) -> "SignalFlag":
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def _handler(self, signum, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum)

    def release(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()


@dataclass(frozen=True)
class StepVerdict:
    """What the per-step check decided, the same on every rank."""

    signal_name: Optional[str] = None
    time_up_minutes: Optional[float] = None
    loss_finite: bool = True
    grad_norm_finite: bool = True

    @property
    def diverged(self) -> bool:
        return not (self.loss_finite and self.grad_norm_finite)

    @property
    def exit_reason(self) -> Optional[str]:
        if self.signal_name:
            return f"received {self.signal_name}"
        if self.time_up_minutes is not None:
            return f"--exit-duration-in-mins reached ({self.time_up_minutes:.1f} minutes)"
        return None


def _finite(x) -> bool:
    if x is None:
        return True
    if isinstance(x, torch.Tensor):
        raise TypeError("StopConditions.check takes host values (a float or None), not a tensor: "
                        "pass the loss once it has been reduced for logging")
    return math.isfinite(float(x))


def _host_group():
    """A CPU group over all ranks for the verdict (the default group when it is gloo already)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return None
    if dist.get_backend() == "gloo":
        return None
    return dist.new_group(backend="gloo")  # collective: every rank builds its StopConditions alike


class StopConditions:
    """Signals, time limit and divergence, checked after every step with one all-reduce."""

    def __init__(self, signals: Sequence[signal.Signals] = (), exit_duration_in_mins: Optional[float] = None,
                 check_divergence: bool = True, start_time: float = PROGRAM_START):
        self.flag = SignalFlag(signals).install() if signals else None
        self.exit_duration_in_mins = exit_duration_in_mins
        self.check_divergence = check_divergence
        self.start_time = start_time
        self.group = _host_group()

    def release(self) -> None:
        if self.flag is not None:
            self.flag.release()

    def check(self, loss: Optional[float] = None, grad_norm: Optional[float] = None) -> StepVerdict:
        """Collective (host values, CPU group): every rank passes its view -- the loss where a
        host value exists (the last pipeline stage, at a log interval; ``None`` elsewhere), the
        gradient norm -- and gets the same verdict."""
        minutes = (time.time() - self.start_time) / 60.0
        sig = self.flag.received if self.flag is not None else None
        flags = torch.tensor(
            [
                float(sig.value) if sig is not None else 0.0,
                1.0 if self.exit_duration_in_mins is not None and minutes > self.exit_duration_in_mins else 0.0,
                0.0 if (not self.check_divergence or _finite(loss)) else 1.0,
                0.0 if (not self.check_divergence or _finite(grad_norm)) else 1.0,
            ],
            dtype=torch.float64,
        )
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
        f = flags.tolist()
        return StepVerdict(
            signal_name=signal.Signals(int(f[0])).name if f[0] else None,
            time_up_minutes=minutes if f[1] else None,
            loss_finite=not f[2],
            grad_norm_finite=not f[3],
        )


def divergence_message(iteration: int, loss, grad_norm, verdict: StepVerdict, last_good: Optional[str]) -> str:
    what = []
    if not verdict.loss_finite:
        what.append(f"the loss is {'non-finite' if loss is None else loss}")
    if not verdict.grad_norm_finite:
        what.append(f"the gradient norm is {'non-finite' if grad_norm is None else float(grad_norm)}")
    where = f"last good checkpoint: {last_good}" if last_good else "no checkpoint was saved"
    return (f"training diverged at iteration {iteration}: {' and '.join(what)}; stopped without saving "
            f"({where}; lower --lr or resume from it with different settings)")
