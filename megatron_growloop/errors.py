"""User-facing errors.

Every mistake a user can make on the command line or in a config raises
:class:`UsageError` with a single-line message that names the bad value and
what is allowed.  The CLIs catch it, print ``error: <message>`` and exit with
status 2 without a traceback and without writing anything.
"""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import contextmanager


class UsageError(ValueError):
    """Bad input from the user; the message is one line and says what is allowed.

    Subclasses may set ``exit_code`` (default 2) for stops that are not bad input, e.g. a
    diverged run."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class ArgumentParser(argparse.ArgumentParser):
    """``argparse`` whose errors are one line and exit 2, like every other usage error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


@contextmanager
def cli_errors(prog: str):
    """Turn :class:`UsageError` into ``prog: error: ...`` on stderr and exit 2.

    Under ``torchrun`` every rank raises the same error; only rank 0 prints it.
    """
    try:
        yield
    except UsageError as exc:
        if os.environ.get("RANK", "0") == "0":
            print(f"{prog}: error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(getattr(exc, "exit_code", 2))
