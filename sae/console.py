"""A quiet console by default: our own log lines, one line per warning that matters, no product tips, no
model table, no library deprecation notices. `verbose=true` brings all of it back."""

from __future__ import annotations

import logging
import time
import warnings

# Lightning's informational lines (device lines, product tips) go through this logger at INFO.
LIGHTNING_INFO = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                  "lightning.pytorch.trainer.connectors.checkpoint_connector",  # "weights_only was not set" on save
                  "lightning.fabric.utilities.seed")  # "Seed set to 0": the seed is in the run config


def configure(verbose: bool = False) -> None:
    """Set the libraries' console output for a run: quiet unless `verbose` (W&B's own is a setting of its
    logger: `silent` in sae.run.loggers.FallbackWandbLogger)."""
    if verbose:
        return
    for name in LIGHTNING_INFO:
        logging.getLogger(name).setLevel(logging.WARNING)
    for category in (DeprecationWarning, FutureWarning, PendingDeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    # Lightning's notes about our deliberate choices (an endless stream, no sanity check, few log steps).
    for message in (".*does not have many workers.*", ".*IterableDataset.*__len__.*", ".*log_every_n_steps.*",
                    ".*is deprecated.*", ".*LeafSpec.*"):
        warnings.filterwarnings("ignore", message=message)


class Progress:
    """One log line every `every` seconds, and at the end: done/total, elapsed time, and an ETA. For phases
    that take minutes on a CPU (writing a cache, the browser's thousands of pages)."""

    def __init__(self, what: str, total: int, every: float = 10.0, logger: logging.Logger | None = None,
                 unit: str = ""):
        self.what, self.total, self.every, self.unit = what, max(1, int(total)), every, unit
        self.log = logger or logging.getLogger("sae")
        self.start = self.last = time.perf_counter()

    def update(self, done: int, first: int = 0) -> None:
        now = time.perf_counter()
        if now - self.last < self.every and done < self.total:
            return
        self.last = now
        spent = now - self.start
        rate = (done - first) / spent if spent > 0 else 0.0
        eta = (self.total - done) / rate if rate > 0 else float("nan")
        self.log.info("%s: %d/%d%s (%.0f%%), %.0f s, %.0f%s/s, about %.0f s left", self.what, done, self.total,
                      self.unit, 100 * done / self.total, spent, rate, self.unit, eta)
