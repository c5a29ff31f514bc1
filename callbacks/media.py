"""Images and histograms to the loggers that take them (W&B, TensorBoard), and to files in the run directory.

Scalars go through `pl_module.log`; media need the logger's own API. Files always land in the run directory
(`trainer.default_root_dir`, which train.py sets to the Hydra output directory), so `logger=csv` and
`logger=none` runs keep every picture.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import lightning as L
import numpy as np
from torch import Tensor

from sae.nn.io import atomic_write_bytes

log = logging.getLogger("sae")


def run_dir(trainer: L.Trainer) -> Path:
    return Path(trainer.default_root_dir)


def step_name(prefix: str, step: int, suffix: str = ".png") -> str:
    """e.g. density_step0000200.png: zero-padded so that files sort by step."""
    return f"{prefix}_step{step:07d}{suffix}"


def save_png(image, path: Path) -> Path:
    """Write a PIL image or a matplotlib figure as PNG, atomically."""
    buffer = io.BytesIO()
    if hasattr(image, "savefig"):
        image.savefig(buffer, format="png", dpi=100)
    else:
        image.save(buffer, format="png")
    atomic_write_bytes(path, buffer.getvalue())
    return path


def _kind(logger) -> str:
    """wandb, tensorboard or other. By type, so that subclasses (the project's FallbackWandbLogger) count; a
    W&B logger that has failed and fallen back to CSV counts as other (its pictures go to files)."""
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    if isinstance(logger, WandbLogger):
        return "other" if getattr(logger, "failure", None) is not None else "wandb"
    return "tensorboard" if isinstance(logger, TensorBoardLogger) else "other"


def has_wandb(trainer: L.Trainer) -> bool:
    return any(_kind(logger) == "wandb" for logger in trainer.loggers)


def log_images(trainer: L.Trainer, key: str, images: list, captions: list[str], step: int) -> None:
    """Log PIL images under `key` (one captioned W&B media panel; TensorBoard: key/0, key/1, ...). W&B shows
    the images of one key at one size: give images of different sizes keys of their own."""
    for logger in trainer.loggers:
        kind = _kind(logger)
        if kind == "wandb":
            logger.log_image(key, images, step=step, caption=captions)
        elif kind == "tensorboard":
            for i, image in enumerate(images):
                logger.experiment.add_image(f"{key}/{i}", np.asarray(image), step, dataformats="HWC")


def log_histogram(trainer: L.Trainer, key: str, values: Tensor, step: int) -> bool:
    """Log a histogram of `values` to W&B (wandb.Histogram) and TensorBoard; False if no logger took it."""
    taken = False
    for logger in trainer.loggers:
        kind = _kind(logger)
        if kind == "wandb":
            import wandb

            logger.log_metrics({key: wandb.Histogram(values.detach().double().cpu().numpy())}, step=step)
            taken = True
        elif kind == "tensorboard":
            logger.experiment.add_histogram(key, values.detach().cpu(), step)
            taken = True
    return taken


# -- the W&B feature table: each visual callback adds its final pictures; the last one to finish logs it ----
def add_to_feature_table(trainer: L.Trainer, prefix: str, contributor, column: str, density: dict[int, float],
                         images: dict[int, object], expected: list) -> None:
    """Add `column` (PIL images per feature) from `contributor` to the W&B feature table of the member logged
    under `prefix`; when every callback in `expected` has added its column, log the table as
    `<prefix>features/table` (a wandb.Table that a W&B workspace sorts and filters: feature, density, then one
    image column per callback). The table being filled is held by the first of `expected`."""
    if not has_wandb(trainer):
        return
    holder = expected[0] if expected else contributor
    tables = holder.feature_tables  # PeriodicCallback's: {prefix: the table being filled}
    table = tables.setdefault(prefix, {"density": {}, "columns": {}, "done": set()})
    table["density"].update(density)
    table["columns"][column] = images
    table["done"].add(id(contributor))
    if not {id(c) for c in expected} <= table["done"]:
        return
    import wandb

    tables.pop(prefix, None)
    columns = list(table["columns"])
    features = sorted({f for images in table["columns"].values() for f in images})
    rows = [[f, float(table["density"].get(f, float("nan"))),
             *[wandb.Image(table["columns"][c][f]) if f in table["columns"][c] else None for c in columns]]
            for f in features]
    for logger in trainer.loggers:
        if _kind(logger) == "wandb":
            logger.log_table(f"{prefix}features/table", columns=["feature", "density", *columns], data=rows)
