"""The errors that mean "bad input" or "the run stopped itself": train.py and evaluate.py print them in one
line, without a traceback, and exit with `exit_code(error)`."""

from sae.checks import BadConfigError
from sae.data import ImageSourceError, VectorFileError
from sae.launch import OutputDirError
from sae.model import UnknownLayerError, WeightsError, WeightsUnavailableError
from sae.nn import SAEConfigError
from sae.train.guards import CheckpointError, DataStatisticsError, NonFiniteLossError, ResumeMismatchError

USER_ERRORS: tuple[type[BaseException], ...] = (
    BadConfigError,
    DataStatisticsError,
    ImageSourceError,
    VectorFileError,
    OutputDirError,
    UnknownLayerError,
    WeightsError,
    WeightsUnavailableError,
    SAEConfigError,
    CheckpointError,
    ResumeMismatchError,
    NonFiniteLossError,
)

EXIT_BAD_INPUT = 2  # fix the command line or the files, then run again
EXIT_NON_FINITE = 3  # training diverged: the last good checkpoint is kept
EXIT_PREEMPTED = 143  # 128 + SIGTERM: last.ckpt was saved; resume with ckpt_path=last
EXIT_INTERRUPTED = 130  # 128 + SIGINT (Ctrl-C): last.ckpt was saved (unless a second Ctrl-C aborted at once)


def user_error(error: BaseException) -> BaseException | None:
    """The bad-input error behind `error` (Hydra wraps errors raised while instantiating), or None."""
    while error is not None:
        if isinstance(error, USER_ERRORS):
            return error
        error = error.__cause__
    return None


def exit_code(error: BaseException) -> int:
    """The process exit status for an error that `user_error` recognised."""
    return EXIT_NON_FINITE if isinstance(error, NonFiniteLossError) else EXIT_BAD_INPUT
