"""Stop conditions between steps (issue 14): exit signals are recorded, not acted on mid-step;
the time limit; NaN/Inf loss or gradient norm; one verdict for every rank."""

from __future__ import annotations

import math
import os
import signal

import pytest

from megatron_growloop.errors import UsageError
from megatron_growloop.training.stop_conditions import StopConditions, parse_signals


def test_signal_is_recorded_and_reported_once_checked(dist_1rank):
    stop = StopConditions(parse_signals(["SIGTERM", "USR1"]))
    try:
        assert stop.check(1.0, 1.0).exit_reason is None
        os.kill(os.getpid(), signal.SIGUSR1)
        v = stop.check(1.0, 1.0)
        assert v.signal_name == "SIGUSR1" and v.exit_reason == "received SIGUSR1" and not v.diverged
    finally:
        stop.release()
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL


def test_time_limit(dist_1rank):
    import time

    stop = StopConditions((), exit_duration_in_mins=1.0, start_time=time.time() - 61)
    v = stop.check(1.0, 1.0)
    assert v.time_up_minutes is not None and v.exit_reason.startswith("--exit-duration-in-mins reached")
    assert StopConditions((), exit_duration_in_mins=1.0, start_time=time.time()).check(1.0, 1.0).exit_reason is None


@pytest.mark.parametrize("loss,grad,diverged", [(1.0, 2.0, False), (math.nan, 2.0, True), (1.0, math.inf, True),
                                                (None, math.nan, True), (None, None, False)])
def test_divergence(dist_1rank, loss, grad, diverged):
    assert StopConditions(()).check(loss, grad).diverged is diverged
    assert not StopConditions((), check_divergence=False).check(loss, grad).diverged


def test_unknown_signal_is_one_line():
    with pytest.raises(UsageError, match="'SIGKILL' is not a catchable signal"):
        parse_signals(["SIGKILL"])
    with pytest.raises(UsageError, match="'NOPE'"):
        parse_signals(["NOPE"])


def test_a_device_tensor_is_refused_not_synced(dist_1rank):
    """The check takes host values only, so it never adds a host sync: a loss still on the device
    must be reduced for logging first (the caller passes ``None`` on the other steps)."""
    import torch

    with pytest.raises(TypeError, match="host values"):
        StopConditions(()).check(torch.tensor(1.0), 1.0)
    assert not StopConditions(()).check(None, 1.0).diverged  # a step between log intervals
