"""One base for the errors that mean "bad input" or "the run stopped itself".

Entry points (train.py, evaluate.py, python -m sae.cache) print such an error in one line, without a traceback,
and exit with its `exit_code`. Every room raises its own subclass (which also derives from the builtin it
replaces, e.g. ValueError, so callers that catch those still do); this module imports nothing of the project,
so `sae/nn` can use it and stay torch-only.
"""

from __future__ import annotations

EXIT_BAD_INPUT = 2  # fix the command line or the files, then run again
EXIT_NON_FINITE = 3  # training diverged: the last good checkpoint is kept
EXIT_PREEMPTED = 143  # 128 + SIGTERM: last.ckpt was saved; resume with ckpt_path=last
EXIT_INTERRUPTED = 130  # 128 + SIGINT (Ctrl-C): last.ckpt was saved (unless a second Ctrl-C aborted at once)


class UserError(Exception):
    """Bad input, named with its fix in the message: exit status 2 (a subclass may say otherwise)."""

    exit_code: int = EXIT_BAD_INPUT


def user_error(error: BaseException | None) -> UserError | None:
    """The UserError behind `error` (Hydra and Lightning wrap errors raised inside them), or None."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, UserError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def exit_code(error: BaseException) -> int:
    """The process exit status for an error that `user_error` recognised."""
    return getattr(error, "exit_code", EXIT_BAD_INPUT)
