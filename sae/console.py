"""A quiet console by default: our own log lines, one line per warning that matters, no product tips, no
model table, no library deprecation notices. `verbose=true` brings all of it back."""

from __future__ import annotations

import logging
import os
import warnings

# Lightning's informational lines (device lines, product tips) go through this logger at INFO.
LIGHTNING_INFO = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


def configure(verbose: bool = False) -> None:
    """Set the libraries' console output for a run: quiet unless `verbose`."""
    if verbose:
        return
    for name in LIGHTNING_INFO:
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("WANDB_SILENT", "true")  # W&B's banner and sync hints: the run says where its files are
    for category in (DeprecationWarning, FutureWarning, PendingDeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    # Lightning's notes about our deliberate choices (an endless stream, no sanity check, few log steps).
    for message in (".*does not have many workers.*", ".*IterableDataset.*__len__.*", ".*log_every_n_steps.*",
                    ".*is deprecated.*", ".*LeafSpec.*"):
        warnings.filterwarnings("ignore", message=message)
