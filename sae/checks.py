"""Range checks of numeric options, and building objects from a run's saved config without running its code.

`BadConfigError` is a bad value of a config option: train.py and evaluate.py print it in one line and exit 2.
`build_from_config` instantiates a saved config (e.g. a run's `config_resolved.yaml`) only through an allow-list
of this project's own classes: a `_target_` read from a file can never name an arbitrary callable.
"""

from __future__ import annotations

import importlib
import math
import numbers
from typing import Any

from sae.errors import UserError


class BadConfigError(UserError, ValueError):
    """A config option with a value outside its range, or a saved config naming something not allowed."""


def _number(name: str, value: Any, integer: bool) -> float:
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value):
        what = "a whole number" if integer else "a finite number"
        raise BadConfigError(f"{name}={value!r} must be {what}; pass e.g. {name}=1")
    return value


def positive(name: str, value: Any, integer: bool = False) -> Any:
    """`value` if it is a finite number > 0 (an integer if `integer`), else BadConfigError naming the option."""
    if _number(name, value, integer) <= 0:
        raise BadConfigError(f"{name}={value!r} must be > 0.")
    return value


def non_negative(name: str, value: Any, integer: bool = False) -> Any:
    if _number(name, value, integer) < 0:
        raise BadConfigError(f"{name}={value!r} must be >= 0.")
    return value


def fraction(name: str, value: Any, low_open: bool = False, high_open: bool = False) -> float:
    """`value` in [0, 1] (ends excluded as asked), else BadConfigError."""
    v = _number(name, value, False)
    if v < 0 or v > 1 or (low_open and v == 0) or (high_open and v == 1):
        interval = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
        raise BadConfigError(f"{name}={value!r} must be in {interval}.")
    return float(v)


# The classes a saved run config may name. Everything else in a `_target_` read from a file is refused.
ALLOWED_TARGETS = frozenset({
    "sae.model.InceptionExtractor",
    "sae.model.extractor.InceptionExtractor",
    "sae.data.ImageActivationDataModule",
    "sae.data.datamodule.ImageActivationDataModule",
    "sae.data.VectorDataModule",
    "sae.data.datamodule.VectorDataModule",
    "sae.data.SampleImages",
    "sae.data.images.SampleImages",
    "sae.data.ImageFolder",
    "sae.data.images.ImageFolder",
})
PLAIN = (str, int, float, bool, type(None))


def build_from_config(node: Any, where: str = "config", allowed: frozenset[str] = ALLOWED_TARGETS) -> Any:
    """Instantiate a plain (resolved) config tree: dicts with `_target_` in `allowed` become objects, with their
    other entries (plain values, lists, nested nodes) as keyword arguments. Nothing else is called."""
    if isinstance(node, PLAIN):
        return node
    if isinstance(node, (list, tuple)):
        return [build_from_config(v, f"{where}[{i}]", allowed) for i, v in enumerate(node)]
    if not isinstance(node, dict):
        raise BadConfigError(f"{where} holds a {type(node).__name__}; a saved config holds only plain values.")
    target = node.get("_target_")
    if target is None:
        return {k: build_from_config(v, f"{where}.{k}", allowed) for k, v in node.items()}
    if target not in allowed:
        raise BadConfigError(f"{where}._target_={target!r} is not one of this project's data or model classes; "
                             "refusing to build it (a run directory's config must not run code). Pass the data "
                             "explicitly, e.g. data=imagefolder data.root=DIR.")
    special = sorted(k for k in node if str(k).startswith("_") and k != "_target_")
    if special:
        raise BadConfigError(f"{where} has {special}: not allowed in a saved config.")
    module_name, _, name = target.rpartition(".")
    cls = getattr(importlib.import_module(module_name), name)
    kwargs = {str(k): build_from_config(v, f"{where}.{k}", allowed) for k, v in node.items() if k != "_target_"}
    try:
        return cls(**kwargs)
    except TypeError as e:  # an argument this class does not take: the saved config is not this project's
        raise BadConfigError(f"{where} cannot build {target}: {e}") from e
