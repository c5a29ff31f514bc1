"""The run's loggers: W&B with its offline fallback and one run id per run directory, and a CSV logger that a
resumed run appends to. The only place under `sae/` that knows W&B."""

from __future__ import annotations

import csv
import logging
import netrc
import os
import secrets
import string
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import hydra
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import DummyExperiment, rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from sae.run.job import random_weights, sweep_job

log = logging.getLogger("sae")


RANDOM_WEIGHTS_TAG = "random-weights"


def _job_values() -> str:
    """This sweep job's overrides as `key=value,...`, leaving out the keys Hydra's override_dirname leaves out
    and file paths (data.path=/long/...: rarely what is swept, and they would push the swept values off a
    128-character W&B name)."""
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    excluded = set(hydra_cfg.job.config.override_dirname.exclude_keys)
    kept = []
    for override in hydra_cfg.overrides.task:
        key, _, value = override.partition("=")
        if key.lstrip("+~") not in excluded and "/" not in value:
            kept.append(override)
    return ",".join(sorted(kept))


def wandb_has_credentials() -> bool:
    """True if W&B can authenticate: an API key in the environment or in ~/.netrc (what `wandb login` writes)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


class FallbackWandbLogger(WandbLogger):
    """A WandbLogger that never stops a run and never loses its metrics.

    - At start, if `wandb.init` fails (no network, a server error: it waits up to `init_timeout` seconds), the
      run starts again offline under `save_dir/wandb`, one warning says so, and `wandb sync` uploads it later.
    - During the run, a network outage is handled by W&B itself (its service keeps everything in
      `save_dir/wandb` and retries). If a W&B call raises (its service died, its disk filled), one warning is
      printed, W&B is left alone for the rest of the run, and metrics go on to `save_dir/wandb-fallback/`
      (a CSV file). Training is never interrupted by logging.
    """

    def __init__(self, *args: Any, init_timeout: float = 90, silent: bool = True, offline: bool = False,
                 **kwargs: Any) -> None:
        import wandb

        # This run's settings, not the process's environment: `offline` goes here rather than to WandbLogger,
        # which would set WANDB_MODE for the whole process; `silent` drops W&B's banner and sync hints (the
        # run says where its files are).
        self.settings = kwargs.pop("settings", None) or wandb.Settings(init_timeout=float(init_timeout),
                                                                       silent=bool(silent))
        if offline:
            self.settings.mode = "offline"
        super().__init__(*args, settings=self.settings, **kwargs)
        # WandbLogger's own init arguments (a private dict: it has no public way to leave one out); `anonymous`
        # is deprecated in W&B, and passing it at all prints a warning.
        self._wandb_init.pop("anonymous", None)
        self.failure: str | None = None
        self._fallback: CSVLogger | None = None

    def offline(self) -> bool:
        """Whether this run logs offline: its settings say so, or the environment does (WANDB_MODE)."""
        mode = self.settings.mode if "mode" in self.settings.model_fields_set else os.environ.get("WANDB_MODE", "")
        return str(mode).lower() in ("offline", "dryrun")

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        if self.failure is not None:
            return DummyExperiment()
        try:
            return super().experiment
        except Exception as e:  # noqa: BLE001 - any failure to start W&B: go offline, never stop training
            import wandb

            if wandb.run is not None or self.offline():
                self._fail(e)
                return DummyExperiment()
            log.warning("W&B could not start (%s: %s); logging offline under %s/wandb instead. Sync it later "
                        "with `wandb sync %s/wandb/offline-run-*`.", type(e).__name__, e, self.save_dir, self.save_dir)
            self.settings.mode = "offline"  # the settings object WandbLogger passes to wandb.init
            wandb.teardown()  # a fresh service, not the one the failed start left behind
            return self.experiment

    def _fail(self, error: BaseException) -> None:
        if self.failure is None:
            self.failure = f"{type(error).__name__}: {error}"
            log.warning("W&B failed during the run (%s); training continues, W&B is switched off and metrics go on "
                        "to %s. What W&B already holds is in %s/wandb.", self.failure, self.fallback.log_dir,
                        self.save_dir)

    @property
    def fallback(self) -> CSVLogger:
        """The CSV logger that takes over once W&B has failed."""
        if self._fallback is None:
            self._fallback = CSVLogger(self.save_dir or ".", name="wandb-fallback", version="")
        return self._fallback

    def _guarded(self, method: str, *args: Any, **kwargs: Any) -> bool:
        """Call WandbLogger.`method`; False (and W&B off) if it raised or W&B had already failed."""
        if self.failure is None:
            try:
                getattr(WandbLogger, method)(self, *args, **kwargs)
                return True
            except Exception as e:  # noqa: BLE001 - logging must not end a training run
                self._fail(e)
        return False

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if not self._guarded("log_metrics", metrics, step):
            self.fallback.log_metrics(metrics, step)

    @rank_zero_only
    def log_hyperparams(self, params: Any) -> None:
        if not self._guarded("log_hyperparams", params):
            self.fallback.log_hyperparams(params)

    def log_table(self, *args: Any, **kwargs: Any) -> None:
        self._guarded("log_table", *args, **kwargs)

    def log_text(self, *args: Any, **kwargs: Any) -> None:
        self._guarded("log_text", *args, **kwargs)

    def log_image(self, *args: Any, **kwargs: Any) -> None:
        self._guarded("log_image", *args, **kwargs)

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        self._guarded("after_save_checkpoint", checkpoint_callback)

    @rank_zero_only
    def save(self) -> None:
        if self._fallback is not None:
            self._fallback.save()

    @rank_zero_only
    def finalize(self, status: str) -> None:
        self._guarded("finalize", status)
        if self._fallback is not None:
            self._fallback.finalize(status)


def build_logger(cfg: DictConfig, resumed_step: int | None = None) -> Any:
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
        if (sweep := sweep_job()) is not None:
            # One W&B run per job, all in one group named after the sweep (unless logger.group says otherwise),
            # each named by its swept values (e.g. mixed3b-relu sae.l1_coefficient=3), or its number if none.
            sweep_dir, job_num = sweep
            swept = _job_values()
            overrides["group"] = cfg.logger.get("group") or f"sweep:{sweep_dir}"[-128:]
            overrides["name"] = f"{cfg.logger.get('name') or cfg.run_name} {swept or f'#{job_num}'}"[:128]
        # One W&B run per run directory: a resumed run continues it (its id is kept in the directory).
        overrides["id"] = wandb_run_id(Path(cfg.paths.output_dir))
        overrides["resume"] = "allow"
        if target.endswith("FallbackWandbLogger"):
            overrides["silent"] = not cfg.get("verbose", False)
        mode = os.environ.get("WANDB_MODE", "").lower()
        if mode in ("offline", "dryrun") or (not mode and not cfg.logger.get("offline") and not wandb_has_credentials()):
            overrides["offline"] = True
            if not mode:
                log.warning(
                    "W&B: no credentials (WANDB_API_KEY or `wandb login`): logging offline under %s/wandb; "
                    "sync later with `wandb sync %s/wandb/offline-run-*`.",
                    cfg.paths.output_dir, cfg.paths.output_dir,
                )
    if target.endswith("TensorBoardLogger") and resumed_step is not None:
        overrides["purge_step"] = resumed_step  # TensorBoard drops the interrupted run's events from here on
    logger = hydra.utils.instantiate(cfg.logger, **overrides)
    if resumed_step is not None and isinstance(logger, ResumableCSVLogger):
        logger.resume_at(resumed_step)
    return logger


WANDB_ID_FILE = "wandb_id.txt"


def wandb_run_id(run_dir: Path) -> str:
    """The W&B run id of this run directory: the stored one, or a new one that rank zero stores."""
    path = run_dir / WANDB_ID_FILE
    if path.is_file() and (stored := path.read_text().strip()):
        return stored
    run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))  # W&B's id form
    if rank_zero_only.rank == 0:
        from sae.nn.io import atomic_write_bytes

        atomic_write_bytes(path, f"{run_id}\n".encode())
    return run_id


class ResumableCSVLogger(CSVLogger):
    """Lightning's CSVLogger, but a resumed run appends to `metrics.csv` instead of deleting it: rows from the
    resumed step on (logged before the interruption, logged again now) are dropped by `resume_at`, so the file
    is one history. CSVLogger has no public way to append, so this replaces its private writer (`_experiment`,
    through its private filesystem handle `_fs`) and the writer's `_check_log_dir_exists`, which deletes the file."""

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment

    @rank_zero_only
    def resume_at(self, step: int) -> None:
        self.experiment.drop_from(step)


class _AppendingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:  # Lightning's deletes metrics.csv here
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = list(csv.DictReader(file).fieldnames or [])

    def drop_from(self, step: int) -> None:
        if not self._fs.isfile(self.metrics_file_path):
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            rows = list(csv.DictReader(file))
        kept = [row for row in rows if not row.get("step") or float(row["step"]) < step]
        if len(kept) < len(rows):
            with self._fs.open(self.metrics_file_path, "w", newline="") as file:
                writer = csv.DictWriter(file, fieldnames=self.metrics_keys)
                writer.writeheader()
                writer.writerows(kept)


def close_logger(logger: Any) -> None:
    """Finish the logger's run even when training failed, so W&B does not hang or lose the tail."""
    if not logger:
        return
    try:
        logger.finalize("success")
    finally:
        if isinstance(logger, WandbLogger):
            import wandb

            if wandb.run is not None:
                try:
                    wandb.finish()
                except Exception as e:  # noqa: BLE001 - the run's files are written; W&B's tail is not worth a crash
                    log.warning("W&B did not finish cleanly (%s: %s); its local copy is in %s/wandb.",
                                type(e).__name__, e, logger.save_dir)
