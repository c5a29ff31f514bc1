"""Atomic file writes and the exported SAE format: ``sae.safetensors`` + ``sae.json`` in one directory.

The export is in the layer's raw units (the training input scale is folded into the weights, see
``SparseAutoencoder.export_tensors``), so a reader needs only torch or numpy and the formula in
``sae.json["encoder"]``.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import Tensor

from sae.errors import UserError

from .base import SAEConfigError, SparseAutoencoder, build_sae

FORMAT_VERSION = 1
WEIGHTS_NAME = "sae.safetensors"
CONFIG_NAME = "sae.json"
_RESERVED_KEYS = ("format_version", "architecture", "d_in", "d_sae", "hparams", "encoder", "scale_folded", "export_id")


@contextlib.contextmanager
def _atomic_writer(path: str | os.PathLike) -> Iterator[IO[bytes]]:
    """Yield a temp file next to ``path``; on success fsync it and os.replace it onto ``path``.

    The temp file lives in the same directory so the rename never crosses filesystems (where it
    would stop being atomic). Readers see the old file or the new one, never a torn one; if the
    body raises, the temp file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Exclusive create rather than tempfile.mkstemp, whose 0600 mode would survive the rename and
    # hide exports from other users; "xb" honours the umask like a plain open would.
    tmp_name = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    tmp = open(tmp_name, "xb")  # opened before the try: a failed open must not unlink anything
    try:
        with tmp:
            yield tmp
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    """Persist the rename itself (POSIX); platforms that cannot open directories skip it."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same directory, fsync, os.replace)."""
    with _atomic_writer(path) as f:
        f.write(data)


def atomic_save_torch(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` atomically: streamed into a temp file, fsynced, then renamed."""
    with _atomic_writer(path) as f:
        torch.save(obj, f)


def save_sae(
    sae: SparseAutoencoder,
    directory: str | os.PathLike,
    scale: float = 1.0,
    metadata: dict[str, Any] | None = None,
) -> None:
    """Write ``directory/sae.safetensors`` and ``directory/sae.json`` for raw-unit inputs.

    ``scale`` is the factor training multiplied inputs by; it is folded into the weights. The json
    holds format_version, architecture, d_in, d_sae, hparams, encoder (the formula), scale_folded
    and the caller's ``metadata`` (layer, training stats, ...), which may not reuse those keys.
    Both carry one random ``export_id``. The json is renamed into place first and the weights last, so a
    kill between the two renames leaves a pair whose ids differ, which ``load_sae`` refuses, naming the cause.
    """
    metadata = dict(metadata or {})
    clashes = sorted(set(metadata) & set(_RESERVED_KEYS))
    if clashes:
        raise SAEConfigError(f"metadata keys {clashes} are reserved by the sae.json format; rename them")
    tensors = {name: t.detach().cpu().contiguous() for name, t in sae.export_tensors(scale).items()}
    hparams = sae.hparams()
    config = {
        "format_version": FORMAT_VERSION,
        "architecture": hparams.pop("architecture"),
        "d_in": hparams.pop("d_in"),
        "d_sae": hparams.pop("d_sae"),
        "hparams": hparams,
        "encoder": sae.encoder_formula(),
        "scale_folded": float(scale),
        "export_id": secrets.token_hex(8),
        **metadata,
    }
    try:
        config_bytes = json.dumps(config, indent=2, allow_nan=False).encode()
    except (TypeError, ValueError) as err:
        raise SAEConfigError(f"sae.json metadata must be JSON-serialisable with finite numbers: {err}") from err
    directory = Path(directory)
    weights = safetensors_save(tensors, metadata={"format_version": "1", "export_id": config["export_id"]})
    atomic_write_bytes(directory / CONFIG_NAME, config_bytes)
    atomic_write_bytes(directory / WEIGHTS_NAME, weights)


class ExportNotFoundError(UserError, FileNotFoundError):
    """The path holds no exported SAE (sae.safetensors + sae.json)."""


def _resolve_paths(directory_or_file: str | os.PathLike) -> tuple[Path, Path]:
    path = Path(directory_or_file)
    directory = path if path.is_dir() else path.parent
    if not path.is_dir() and path.name not in (WEIGHTS_NAME, CONFIG_NAME):
        raise ExportNotFoundError(f"{path} is neither a directory nor a {WEIGHTS_NAME} / {CONFIG_NAME} file")
    weights, config = directory / WEIGHTS_NAME, directory / CONFIG_NAME
    for required in (weights, config):
        if not required.is_file():
            raise ExportNotFoundError(
                f"{required} is missing; an exported SAE needs both {WEIGHTS_NAME} and {CONFIG_NAME}"
            )
    return weights, config


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise SAEConfigError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(config, dict):
        raise SAEConfigError(f"{path} must hold a JSON object, got {type(config).__name__}")
    if config.get("format_version") != FORMAT_VERSION:
        raise SAEConfigError(f"{path}: format_version={config.get('format_version')!r}, this reader "
                             f"understands {FORMAT_VERSION}")
    missing = [key for key in ("architecture", "d_in", "d_sae", "hparams") if key not in config]
    if missing:
        raise SAEConfigError(f"{path} lacks required key(s) {missing}")
    if not isinstance(config["hparams"], dict):
        raise SAEConfigError(f"{path}: 'hparams' must be an object, got {config['hparams']!r}")
    return config


def _check_tensors(path: Path, tensors: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise SAEConfigError(f"{path}: missing tensors {missing}, unexpected tensors {unexpected}")
    for name, reference in expected.items():
        if tensors[name].shape != reference.shape:
            raise SAEConfigError(f"{path}: tensor {name!r} has shape {tuple(tensors[name].shape)}, "
                                 f"expected {tuple(reference.shape)} from sae.json")
        if not tensors[name].is_floating_point() or not bool(torch.isfinite(tensors[name]).all()):
            raise SAEConfigError(f"{path}: tensor {name!r} must be floating point with only finite values")


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's header (already validated by the loader)."""
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]).get("__metadata__") or {}


def load_sae(directory_or_file: str | os.PathLike) -> tuple[SparseAutoencoder, dict[str, Any]]:
    """Read an export written by ``save_sae``: (SAE in raw units, in eval mode; the sae.json dict).

    Accepts the directory or either of its two files. Raises FileNotFoundError for missing files
    and ValueError for a malformed json, unknown architecture, or tensors with missing / extra
    keys, wrong shapes or non-finite values.
    """
    weights_path, config_path = _resolve_paths(directory_or_file)
    config = _read_config(config_path)
    try:
        sae = build_sae(config["architecture"], config["d_in"], d_sae=config["d_sae"], **config["hparams"])
    except (TypeError, ValueError) as err:
        raise SAEConfigError(f"{config_path} describes an SAE that cannot be built: {err}") from err
    try:
        data = weights_path.read_bytes()
        tensors = safetensors_load(data)
    except SafetensorError as err:
        raise SAEConfigError(f"{weights_path} is not a readable safetensors file: {err}") from err
    weights_id = _safetensors_metadata(data).get("export_id")
    if config.get("export_id") and weights_id and weights_id != config["export_id"]:
        raise SAEConfigError(f"{config_path} and {weights_path} come from two different exports (a write was "
                             "interrupted between them); export again, e.g. by resuming the run with ckpt_path=last.")
    _check_tensors(weights_path, tensors, sae.export_tensors())
    sae.load_exported_(tensors)
    return sae.eval(), config
