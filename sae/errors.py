"""The errors that mean "bad input": train.py and evaluate.py print them in one line, without a traceback."""

from sae.data import ImageSourceError, VectorFileError
from sae.launch import OutputDirError
from sae.model import UnknownLayerError, WeightsError, WeightsUnavailableError
from sae.nn import SAEConfigError

USER_ERRORS: tuple[type[BaseException], ...] = (
    ImageSourceError,
    VectorFileError,
    OutputDirError,
    UnknownLayerError,
    WeightsError,
    WeightsUnavailableError,
    SAEConfigError,
)


def user_error(error: BaseException) -> BaseException | None:
    """The bad-input error behind `error` (Hydra wraps errors raised while instantiating), or None."""
    while error is not None:
        if isinstance(error, USER_ERRORS):
            return error
        error = error.__cause__
    return None
