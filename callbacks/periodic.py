"""The schedule shared by the expensive callbacks: every N steps and at the end, on rank zero, within a budget."""

from __future__ import annotations

import logging
import time

import lightning as L

log = logging.getLogger("sae")


class PeriodicCallback(L.Callback):
    """Calls `self.run(trainer, pl_module)` on rank zero every `every_n_steps` optimizer steps and at the end.

    Args:
        every_n_steps: steps between runs; None: no periodic runs (the callback is off unless `at_end`).
        at_end: run once when training ends; None: whenever `every_n_steps` is set.
        max_overhead: a periodic run is postponed (to the next due step) while the time this callback has
            spent, plus its last run's duration, would exceed this fraction of the training time so far.
            This bounds the slowdown on any hardware; None disables the budget. The final run ignores it.

    Subclasses override `run` (the work) and may set `self.disabled` to a reason, said once, to stop.
    Other ranks do nothing and wait at their next collective.
    """

    name = "callback"

    def __init__(self, every_n_steps: int | None = None, at_end: bool | None = None,
                 max_overhead: float | None = 0.05) -> None:
        if every_n_steps is not None and int(every_n_steps) < 1:
            raise ValueError(f"{self.name}.every_n_steps={every_n_steps} must be >= 1, or null for no periodic runs")
        if max_overhead is not None and not 0 < float(max_overhead):
            raise ValueError(f"{self.name}.max_overhead={max_overhead} must be > 0 (a fraction), or null")
        self.every_n_steps = None if every_n_steps is None else int(every_n_steps)
        self.at_end = self.every_n_steps is not None if at_end is None else bool(at_end)
        self.max_overhead = None if max_overhead is None else float(max_overhead)
        self.disabled: str | None = None
        self.spent = 0.0  # seconds inside run()
        self.last_cost = 0.0
        self.last_step: int | None = None
        self.postponed = 0
        self._t0: float | None = None
        self.feature_tables: dict[str, dict] = {}  # the W&B feature tables being filled (callbacks.media)

    @property
    def active(self) -> bool:
        return self.every_n_steps is not None or self.at_end

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        raise NotImplementedError

    # -- hooks ------------------------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        self._t0 = time.perf_counter()
        self.spent = 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps is None or step == 0 or step % self.every_n_steps or not trainer.is_global_zero:
            return
        if self._over_budget():
            self.postponed += 1
            if self.postponed == 1:
                log.info("%s: postponed at step %d to keep within %.0f%% of the training time (%.1f s spent); "
                         "raise %s.max_overhead or every_n_steps to change this", self.name, step,
                         100 * self.max_overhead, self.spent, self.name)
            return
        self._timed_run(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.at_end and trainer.is_global_zero and self.last_step != trainer.global_step:
            self._timed_run(trainer, pl_module)

    # -- helpers ----------------------------------------------------------------------------------------
    def _over_budget(self) -> bool:
        if self.max_overhead is None or self._t0 is None:
            return False
        training = time.perf_counter() - self._t0 - self.spent
        return self.spent + self.last_cost > self.max_overhead * training

    def _timed_run(self, trainer, pl_module) -> None:
        if self.disabled:
            return
        start = time.perf_counter()
        self.run(trainer, pl_module)
        self.last_cost = time.perf_counter() - start
        self.spent += self.last_cost
        self.last_step = trainer.global_step
        if self.disabled is None:
            log.info("%s at step %d: %.1f s", self.name, trainer.global_step, self.last_cost)

    def disable(self, reason: str) -> None:
        """Stop for the rest of the run, saying why once."""
        if self.disabled is None:
            log.warning("%s: %s; it does nothing in this run.", self.name, reason)
        self.disabled = reason
