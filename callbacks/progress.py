"""StepProgress: the training bar counts optimizer steps out of trainer.max_steps, with an ETA.

Lightning's bar counts batches of an epoch; on an endless activation stream that reads "Epoch 0: 40it" with
no total. Here it reads "train: 40/5000 [01:10<2:24:00, vec/s=...]", and shows no logger version number.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import _update_n


class StepProgress(TQDMProgressBar):
    """A TQDMProgressBar over optimizer steps (the trainer's global step) up to `trainer.max_steps`."""

    def init_train_tqdm(self):
        bar = super().init_train_tqdm()
        bar.set_description("train", refresh=False)
        return bar

    def on_train_epoch_start(self, trainer, *args: Any) -> None:
        bar = self.train_progress_bar
        bar.reset(total=trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None)
        bar.initial = trainer.global_step  # a resumed run starts where it stopped
        bar.n = trainer.global_step
        bar.set_description("train", refresh=False)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        bar = self.train_progress_bar
        step = trainer.global_step
        if bar is not None and self._should_update(step, bar.total):
            _update_n(bar, step)
            bar.set_postfix(self.get_metrics(trainer, pl_module))

    def get_metrics(self, trainer, pl_module) -> dict:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items
