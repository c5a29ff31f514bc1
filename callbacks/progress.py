"""A progress bar in optimizer steps: `step/max_steps` with the ETA, the same in a fresh and a resumed run.

Lightning's bar counts the batches of the current epoch against the steps left, so after a resume it starts
again from zero (or past its total) and its ETA is wrong. This one starts at the resumed step: the rate, and so
the ETA, counts only the steps this process has run.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import TQDMProgressBar


class StepProgressBar(TQDMProgressBar):
    def on_train_epoch_start(self, trainer, *_: Any) -> None:
        super().on_train_epoch_start(trainer)
        bar = self.train_progress_bar
        if trainer.max_steps and trainer.max_steps > 0:
            bar.total = trainer.max_steps
        bar.n = bar.initial = bar.last_print_n = trainer.global_step
        bar.set_description("step")
        bar.refresh()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        bar, n = self.train_progress_bar, trainer.global_step
        if bar is not None and not bar.disable and (n % self.refresh_rate == 0 or n == bar.total):
            bar.update(n - bar.n)
            bar.set_postfix(self.get_metrics(trainer, pl_module))
