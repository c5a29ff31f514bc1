"""Checkpoint on SIGTERM or Ctrl-C: a preempted, cancelled or interrupted job saves `checkpoints/last.ckpt`.

At the start of training this callback takes over SIGTERM from Lightning's signal connector (which would
leave `fit` at the next step boundary without saving): the handler only sets a flag and forwards the signal
to the DDP processes Lightning launched. At the end of the step in progress every rank agrees, `last.ckpt`
is saved through the trainer (atomically, see `sae.train.guards.SafeCheckpointIO`) and training stops. The
run then resumes exactly with `ckpt_path=last` and the same run directory. On SLURM with auto-requeue,
Lightning also saves and requeues on the requeue signal (SIGUSR1 by default); this callback covers plain
SIGTERM (`scancel`, `kill`, a cloud preemption notice). A first Ctrl-C (SIGINT) is handled like SIGTERM; a
second one aborts at once (Lightning's KeyboardInterrupt path), without saving.
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
    """On SIGTERM or a first Ctrl-C (SIGINT): save `last.ckpt` at the next step boundary, then stop training
    (`.preempted` is set, `.signal_name` says which). A second Ctrl-C aborts at once, without saving."""

    def __init__(self) -> None:
        self.preempted = False
        self.signal_name: str | None = None
        self.aborted = False
        self._received = False
        self._previous_handlers: dict[int, object] = {}
        self._launcher = None

    def _on_signal(self, signum, frame) -> None:
        if signum == signal.SIGINT and self._received:
            self.aborted = True
            log.warning("second Ctrl-C: stopping at once, without saving.")
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        if not self._received and self._launcher is not None:
            self._launcher.kill(signum)  # the other local DDP processes stop at the same step
        if signum == signal.SIGINT and not self._received:
            log.warning("Ctrl-C: saving last.ckpt at the end of this step, then stopping (Ctrl-C again to abort at "
                        "once, without saving).")
        self._received = True
        self.signal_name = self.signal_name or signal.Signals(signum).name

    def on_train_start(self, trainer, pl_module) -> None:
        if threading.current_thread() is threading.main_thread():
            self._launcher = trainer.strategy.launcher
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous_handlers[signum] = signal.signal(signum, self._on_signal)

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore_handlers()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._restore_handlers()

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # A collective (one tiny all-reduce under DDP): the signal may have reached only some ranks so far,
        # and saving is itself collective, so every rank must decide the same.
        if self.preempted or not trainer.strategy.reduce_boolean_decision(self._received, all=False):
            return
        path = last_checkpoint_path(trainer)
        trainer.save_checkpoint(path, False)  # False: the whole training state (optimizer, loops), as ModelCheckpoint
        self.preempted = True
        trainer.should_stop = True
        if trainer.is_global_zero:
            log.warning("%s: saved %s at step %d; resume with ckpt_path=last and the same run directory "
                        "(hydra.run.dir=%s).", self.signal_name or "SIGTERM", path, trainer.global_step,
                        trainer.default_root_dir)
