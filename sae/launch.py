"""What train.py and evaluate.py share: loggers (with W&B's offline fallback), callbacks, run-directory checks.

This is the only place under `sae/` that knows Hydra configs and W&B.
"""

from __future__ import annotations

import logging
import netrc
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import hydra
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("sae")

RANDOM_WEIGHTS_TAG = "random-weights"


class OutputDirError(OSError):
    """The run directory cannot be written."""


def check_writable(directory: str | Path) -> Path:
    """Create `directory` and prove it is writable before any expensive work starts."""
    path = Path(directory)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise OutputDirError(
            f"cannot write to the run directory {str(path)!r} ({e.strerror or e}). "
            "Choose a writable place with hydra.run.dir=DIR (or hydra.sweep.dir=DIR for -m)."
        ) from e
    return path


def uses_inceptionv1(cfg: DictConfig) -> bool:
    """Whether this run extracts activations (image data) rather than reading precomputed vectors."""
    return "extractor" in cfg.data


def random_weights(cfg: DictConfig) -> bool:
    return uses_inceptionv1(cfg) and not cfg.model.pretrained and not cfg.model.weights


def wandb_has_credentials() -> bool:
    """True if W&B can authenticate: an API key in the environment or in ~/.netrc (what `wandb login` writes)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def build_logger(cfg: DictConfig) -> Any:
    """The configured Lightning logger, or False for logger=none.

    W&B with no credentials (and no explicit WANDB_MODE) logs offline, says so in one line, and the run
    can be synced later with `wandb sync`.
    """
    if not cfg.get("logger"):
        return False
    target = str(cfg.logger.get("_target_", ""))
    overrides: dict[str, Any] = {}
    if target.endswith("WandbLogger"):
        tags = list(cfg.logger.get("tags") or [])
        if random_weights(cfg):
            tags.append(RANDOM_WEIGHTS_TAG)
        overrides["tags"] = sorted(set(tags))
        mode = os.environ.get("WANDB_MODE", "").lower()
        if mode in ("offline", "dryrun") or (not mode and not cfg.logger.get("offline") and not wandb_has_credentials()):
            overrides["offline"] = True
            if not mode:
                log.warning(
                    "W&B: no credentials (WANDB_API_KEY or `wandb login`): logging offline under %s/wandb; "
                    "sync later with `wandb sync %s/wandb/offline-run-*`.",
                    cfg.paths.output_dir, cfg.paths.output_dir,
                )
    return hydra.utils.instantiate(cfg.logger, **overrides)


def build_callbacks(cfg: DictConfig) -> list:
    """Instantiate every entry of the `callbacks` group that has a `_target_`."""
    entries: Iterable = (cfg.get("callbacks") or {}).values()
    return [hydra.utils.instantiate(c) for c in entries if isinstance(c, DictConfig) and "_target_" in c]


def run_config(cfg: DictConfig) -> dict:
    """The resolved config, plus what a reader must not miss (random weights)."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved["model_weights"] = (
        "random" if random_weights(cfg) else ("file" if uses_inceptionv1(cfg) and cfg.model.weights else "lucid")
    ) if uses_inceptionv1(cfg) else "n/a (precomputed vectors)"
    return resolved


def close_logger(logger: Any) -> None:
    """Finish the logger's run even when training failed, so W&B does not hang or lose the tail."""
    if not logger:
        return
    try:
        logger.finalize("success")
    finally:
        if type(logger).__name__ == "WandbLogger":
            import wandb

            if wandb.run is not None:
                wandb.finish()
