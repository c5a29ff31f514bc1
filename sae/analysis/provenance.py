"""What an evaluation evaluated, and keeping the earlier ones.

`eval/evaluation.json` records the run (directory or checkpoint, its step, the SHA-256 of its weights), the
InceptionV1 weights, the images (their source, count, size, and each file), the command and the time. A new
evaluation of the same run never replaces an earlier one silently: the earlier `eval/` contents move to
`eval/previous/<its time>/` first, and the log says so.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from sae.nn.io import atomic_write_bytes

log = logging.getLogger("sae.evaluate")
RECORD = "evaluation.json"
PREVIOUS = "previous"


def sha256(path: Path) -> str | None:
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def describe_images(datamodule: Any, n_images: int) -> dict[str, Any]:
    """The held-out images' source, count, size and files (what `held_out_images()` returned, in order)."""
    source = getattr(datamodule, "source", None)
    indices = list(getattr(datamodule, "val_indices", []))[:n_images]
    describe = getattr(source, "describe", None)
    crop = getattr(datamodule, "crop", None)
    return {
        "source": repr(source), "count": n_images, "size": getattr(crop, "size", None),
        "held_out_from_training": bool(getattr(datamodule, "holdout", True)),
        "files": [describe(i) for i in indices] if describe else [],
    }


def archive_previous(out: Path) -> Path | None:
    """Move an earlier evaluation in `out` to out/previous/<time>/ (nothing if `out` holds none)."""
    record = out / RECORD
    if not (out / "metrics.json").is_file():
        return None
    when = json.loads(record.read_text()).get("time", "") if record.is_file() else ""
    stamp = (when or time.strftime("%Y-%m-%dT%H-%M-%S", time.localtime((out / "metrics.json").stat().st_mtime)))
    target = out / PREVIOUS / stamp.replace(":", "-")
    while target.exists():
        target = target.with_name(target.name + "+")
    target.mkdir(parents=True)
    for entry in list(out.iterdir()):
        if entry.name != PREVIOUS:
            shutil.move(str(entry), str(target / entry.name))
    log.warning("%s held an earlier evaluation: moved to %s", out, target)
    return target


def write_record(out: Path, run: Any, images: dict[str, Any], cfg: Any) -> dict[str, Any]:
    """Write eval/evaluation.json; returns its content (its short form goes into metrics.json)."""
    weights = None if run.directory is None else sha256(Path(run.directory) / "sae.safetensors")
    record = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "command": " ".join(sys.argv),
        "run": {"source": run.source, "directory": None if run.directory is None else str(run.directory),
                "global_step": run.meta.get("global_step"), "sae_sha256": weights,
                "model_weights": run.meta.get("model_weights")},
        "images": images,
        "sections": list(cfg.sections),
    }
    atomic_write_bytes(out / RECORD, json.dumps(record, indent=2).encode())
    return record
