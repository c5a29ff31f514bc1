"""One training job as Hydra composed it: the callbacks, the record of its config, its place in a sweep, and the
value ranges checked before any work."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from sae.checks import non_negative, positive

log = logging.getLogger("sae")


def check_numbers(cfg: DictConfig) -> None:
    """Value ranges of the trainer's and the checkpoints' numeric options, before any work (exit 2 if not)."""
    positive("trainer.max_steps", cfg.trainer.get("max_steps"), integer=True)
    interval = cfg.trainer.get("val_check_interval")
    if interval is not None:
        positive("trainer.val_check_interval", interval, integer=isinstance(interval, int))
    positive("trainer.log_every_n_steps", cfg.trainer.get("log_every_n_steps", 50), integer=True)
    every = OmegaConf.select(cfg, "callbacks.model_checkpoint.every_n_train_steps")
    if every is not None:
        non_negative("callbacks.model_checkpoint.every_n_train_steps", every, integer=True)


def uses_inceptionv1(cfg: DictConfig) -> bool:
    """Whether this run extracts activations (image data) rather than reading precomputed vectors."""
    return "extractor" in cfg.data


def random_weights(cfg: DictConfig) -> bool:
    return uses_inceptionv1(cfg) and not cfg.model.pretrained and not cfg.model.weights


def sweep_job() -> tuple[str, int] | None:
    """(sweep directory, this job's number) inside a Hydra multirun, else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    hydra_cfg = HydraConfig.get()
    return str(hydra_cfg.sweep.dir), int(hydra_cfg.job.num)


def build_callbacks(cfg: DictConfig) -> list:
    """Instantiate every entry of the `callbacks` group that has a `_target_`. Without a logger (logger=none)
    the LR monitor, which only writes to a logger, is left out (Lightning refuses it there)."""
    entries: Iterable = (cfg.get("callbacks") or {}).values()
    callbacks = [c for c in entries if isinstance(c, DictConfig) and "_target_" in c]
    if not cfg.get("logger"):  # Lightning refuses a LearningRateMonitor without a logger (logger=none, debug=fast)
        callbacks = [c for c in callbacks if not str(c._target_).endswith("LearningRateMonitor")]
    return [hydra.utils.instantiate(c) for c in callbacks]


def run_config(cfg: DictConfig) -> dict:
    """The resolved config, plus what a reader must not miss (random or planted weights)."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    if not uses_inceptionv1(cfg):
        resolved["model_weights"] = "n/a (precomputed vectors)"
    elif random_weights(cfg) or planted_weights(cfg):
        resolved["model_weights"] = "random" if random_weights(cfg) else "planted"
    else:
        resolved["model_weights"] = "file" if cfg.model.weights else "lucid"
    return resolved


def planted_weights(cfg: DictConfig) -> bool:
    """Whether the run extracts from the known-answer network (model=planted, model.weights=planted)."""
    return uses_inceptionv1(cfg) and str(cfg.model.get("weights")) == "planted"


def write_planted_truth(cfg: DictConfig, directory: Path) -> Path | None:
    """directory/planted_truth.json: the planted features of the run's layer (planted weights only)."""
    from sae.model.planted import PLANTED_LAYERS, planted_truth

    if not planted_weights(cfg) or cfg.layer.name not in PLANTED_LAYERS:
        return None
    return planted_truth(cfg.layer.name).save(Path(directory) / "planted_truth.json")
