"""Reading files that others may have written, without ever running code from them.

`torch.load` always gets `weights_only=True` explicitly (an explicit value also wins over
`TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1` in the environment), and `np.load` always `allow_pickle=False`. A file that
a safe load refuses is reported with `load_error_text`, which says what is wrong without passing on the
libraries' advice to load it unsafely.
"""

from __future__ import annotations

import os
import pickle
from typing import Any

import numpy as np
import torch

UNSAFE_HINTS = ("weights_only", "allow_pickle", "pickle_module", "add_safe_globals", "safe_globals")


def torch_load(path: str | os.PathLike | Any, map_location: Any = "cpu") -> Any:
    """`torch.load(path, weights_only=True)`: tensors, numbers, strings and plain containers only."""
    return torch.load(path, map_location=map_location, weights_only=True)


def np_load(path: str | os.PathLike, mmap_mode: str | None = None) -> np.ndarray:
    """`np.load(path, allow_pickle=False)`: a plain array, never a pickled object array."""
    return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)


def refused_by_safe_load(error: BaseException) -> bool:
    """Whether `error` is a safe load refusing Python objects (rather than a torn or foreign file)."""
    text = str(error).lower()
    return (isinstance(error, pickle.UnpicklingError) and "weights only" in text) or (
        isinstance(error, ValueError) and ("object arrays" in text or "python objects in dtype" in text))


def load_error_text(error: BaseException) -> str:
    """One short line describing why a file could not be read; never advice to load it unsafely."""
    if refused_by_safe_load(error):
        return ("it holds Python objects, not only tensors and plain values; such files are never loaded, because "
                "unpickling them can run code")
    if isinstance(error, ValueError) and "pickled" in str(error):  # numpy: not the .npy format at all
        return ("it is not a .npy array (numpy would read any other file as a pickle, which is never loaded "
                "because it can run code)")
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    lines = [line for line in lines if not any(hint in line for hint in UNSAFE_HINTS)]
    text = (lines[0] if lines else "").split(". ")[0][:200]  # the first sentence: the cause, not the library's advice
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
