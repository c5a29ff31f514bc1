"""StepProgress: the training bar counts optimizer steps out of trainer.max_steps, with an ETA.

Lightning's bar counts batches of an epoch; on an endless activation stream that reads "Epoch 0: 40it" with no
total, and after a resume it starts again from zero. Here it reads "train: 40/5000 [01:10<2:24:00, vec/s=...]",
starts a resumed run at its step (the rate, and so the ETA, counts only the steps this process ran), and shows
no logger version number.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import TQDMProgressBar


class StepProgress(TQDMProgressBar):
    """A TQDMProgressBar over optimizer steps (the trainer's global step) up to `trainer.max_steps`."""

    def init_train_tqdm(self):
        bar = super().init_train_tqdm()
        bar.set_description("train", refresh=False)
        return bar

    def on_train_epoch_start(self, trainer, *_: Any) -> None:  # not Lightning's: it writes an "Epoch 0" bar first
        bar = self.train_progress_bar
        bar.reset(total=trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None)
        bar.n = bar.initial = bar.last_print_n = trainer.global_step  # a resumed run starts where it stopped
        bar.set_description("train", refresh=False)
        bar.refresh()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        bar, step = self.train_progress_bar, trainer.global_step
        if bar is not None and not bar.disable and (step % self.refresh_rate == 0 or step == bar.total):
            bar.update(step - bar.n)
            bar.set_postfix(self.get_metrics(trainer, pl_module))

    def get_metrics(self, trainer, pl_module) -> dict:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items
