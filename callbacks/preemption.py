"""Checkpoint on SIGTERM: a preempted or cancelled job saves `checkpoints/last.ckpt` before it exits.

At the start of training this callback takes over SIGTERM from Lightning's signal connector (which would
leave `fit` at the next step boundary without saving): the handler only sets a flag and forwards the signal
to the DDP processes Lightning launched. At the end of the step in progress every rank agrees, `last.ckpt`
is saved through the trainer (atomically, see `sae.train.guards.SafeCheckpointIO`) and training stops. The
run then resumes exactly with `ckpt_path=last` and the same run directory. On SLURM with auto-requeue,
Lightning also saves and requeues on the requeue signal (SIGUSR1 by default); this callback covers plain
SIGTERM (`scancel`, `kill`, a cloud preemption notice).
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

log = logging.getLogger("sae")


def last_checkpoint_path(trainer: L.Trainer) -> Path:
    """Where ModelCheckpoint keeps `last.ckpt` (or `<default_root_dir>/checkpoints/last.ckpt` without one)."""
    callback = trainer.checkpoint_callback
    if isinstance(callback, ModelCheckpoint) and callback.dirpath:
        return Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
    return Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"


class PreemptionCheckpoint(L.Callback):
    """On SIGTERM: save `last.ckpt` at the next step boundary, then stop training (`.preempted` is set)."""

    def __init__(self) -> None:
        self.preempted = False
        self._received = False
        self._previous_handler = None
        self._launcher = None

    def _on_sigterm(self, signum, frame) -> None:
        if not self._received and self._launcher is not None:
            self._launcher.kill(signum)  # the other local DDP processes stop at the same step
        self._received = True

    def on_train_start(self, trainer, pl_module) -> None:
        if threading.current_thread() is threading.main_thread():
            self._launcher = trainer.strategy.launcher
            self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # A collective (one tiny all-reduce under DDP): the signal may have reached only some ranks so far,
        # and saving is itself collective, so every rank must decide the same.
        if self.preempted or not trainer.strategy.reduce_boolean_decision(self._received, all=False):
            return
        path = last_checkpoint_path(trainer)
        trainer.save_checkpoint(path)
        self.preempted = True
        trainer.should_stop = True
        if trainer.is_global_zero:
            log.warning("SIGTERM: saved %s at step %d; resume with ckpt_path=last and the same run directory "
                        "(hydra.run.dir=%s).", path, trainer.global_step, trainer.default_root_dir)
