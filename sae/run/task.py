"""The one wrapper every entry point (train.py, evaluate.py, python -m sae.cache) runs its body in.

A UserError (sae/errors.py) is bad input or a run that stopped itself: it is printed in one line, without a
traceback, and the process exits with the error's code. Inside a Hydra sweep the job raises instead of exiting,
so Hydra's launcher marks this job failed and runs the others. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

from sae.errors import exit_code, user_error

log = logging.getLogger("sae")


class JobFailed(Exception):
    """One sweep job's bad input or divergence, in one line."""


def run_task(body: Callable[[], Any], in_sweep: Callable[[], bool] = lambda: False) -> Any:
    """`body()`, with a UserError turned into one log line and its exit code (or JobFailed in a sweep)."""
    try:
        return body()
    except Exception as e:
        if (bad_input := user_error(e)) is None:
            raise
        log.error("%s: %s", type(bad_input).__name__, bad_input)  # one clear line, no traceback
        if in_sweep():
            raise JobFailed(f"{type(bad_input).__name__}: {bad_input}") from None
        sys.exit(exit_code(bad_input))
