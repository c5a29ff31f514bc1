"""Throughput: vectors and images per second, measured over each logging interval.

The timer reads the wall clock only; on a GPU it synchronizes once per logging interval (not per step), so
the figure covers all work queued in the interval without stalling the pipeline in between.
"""

from __future__ import annotations

import time

import lightning as L
import torch


class Throughput(L.Callback):
    """Logs `train/vectors_per_second` and `train/images_per_second` every `trainer.log_every_n_steps`."""

    def __init__(self) -> None:
        self._t0: float | None = None
        self._vectors = 0
        self._shown = False  # the bar has a rate: until then, every step offers one

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._t0 is None:  # the first batch is excluded: it includes worker start-up and the first window
            self._t0 = time.perf_counter()
            self._vectors = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._vectors += batch.shape[0] * trainer.world_size
        logging_step = trainer.global_step % max(1, trainer.log_every_n_steps) == 0
        if not logging_step and self._shown:
            return
        if batch.is_cuda:
            torch.cuda.synchronize(batch.device)
        elapsed = time.perf_counter() - self._t0
        if elapsed <= 0 or not self._vectors:
            return
        rate = self._vectors / elapsed
        per_image = getattr(trainer.datamodule, "vectors_per_image", None)
        # The bar shows the rate from the second step on (the first is only start-up), then per logging interval.
        pl_module.log("vec/s", rate, on_step=True, prog_bar=True, logger=False)
        if per_image:
            pl_module.log("img/s", rate / per_image, on_step=True, prog_bar=True, logger=False)
        self._shown = True
        if not logging_step:
            return
        metrics = {"train/vectors_per_second": rate}
        if per_image:
            metrics["train/images_per_second"] = rate / per_image
        pl_module.log_dict(metrics, on_step=True, prog_bar=False)
        self._t0, self._vectors = time.perf_counter(), 0
