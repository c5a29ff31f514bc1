"""What train.py and evaluate.py share: loggers (with W&B's offline fallback), callbacks, run-directory checks.

This is the only place under `sae/` that knows Hydra configs and W&B.
"""

from __future__ import annotations

import csv
import logging
import netrc
import os
import secrets
import string
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import hydra
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import DummyExperiment, rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from sae.checks import non_negative, positive
from sae.errors import UserError

log = logging.getLogger("sae")

RANDOM_WEIGHTS_TAG = "random-weights"


_RECORD_DIRS: dict[str, str] = {}


def run_record_dir(output_dir: str) -> str:
    """Where Hydra records this invocation's command (`hydra.output_subdir`): `.hydra` for the run's first
    process, `.hydra/resume-N` for each later one (a resume, a requeued job), so that the original command is
    never overwritten. Decided once per directory and process."""
    if output_dir not in _RECORD_DIRS:
        base = Path(output_dir) / ".hydra"
        n = 1
        while (base / f"resume-{n}").exists():
            n += 1
        _RECORD_DIRS[output_dir] = f".hydra/resume-{n}" if (base / "overrides.yaml").exists() else ".hydra"
    return _RECORD_DIRS[output_dir]


OmegaConf.register_new_resolver("run_record_dir", run_record_dir, replace=True)


class OutputDirError(UserError, OSError):
    """The run directory cannot be written."""


def check_writable(directory: str | Path) -> Path:
    """Create `directory` and prove it is writable before any expensive work starts."""
    path = Path(directory)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"  # per process: DDP ranks probe the same directory
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise OutputDirError(
            f"cannot write to the run directory {str(path)!r} ({e.strerror or e}). "
            "Choose a writable place with hydra.run.dir=DIR (or hydra.sweep.dir=DIR for -m)."
        ) from e
    return path


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

    def __init__(self, *args: Any, init_timeout: float = 90, **kwargs: Any) -> None:
        if "settings" not in kwargs:
            import wandb

            kwargs["settings"] = wandb.Settings(init_timeout=float(init_timeout))
        super().__init__(*args, **kwargs)
        self._wandb_init.pop("anonymous", None)  # deprecated in W&B: passing it at all prints a warning
        self.failure: str | None = None
        self._fallback: CSVLogger | None = None

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        if self.failure is not None:
            return DummyExperiment()
        try:
            return WandbLogger.experiment.fget(self)
        except Exception as e:  # noqa: BLE001 - any failure to start W&B: go offline, never stop training
            import wandb

            if wandb.run is not None or os.environ.get("WANDB_MODE") in ("offline", "dryrun"):
                self._fail(e)
                return DummyExperiment()
            log.warning("W&B could not start (%s: %s); logging offline under %s/wandb instead. Sync it later "
                        "with `wandb sync %s/wandb/offline-run-*`.", type(e).__name__, e, self.save_dir, self.save_dir)
            os.environ["WANDB_MODE"] = "offline"
            wandb.teardown()  # W&B reads its mode once per service: start a fresh one that reads "offline"
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


def sweep_job() -> tuple[str, int] | None:
    """(sweep directory, this job's number) inside a Hydra multirun, else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    hydra_cfg = HydraConfig.get()
    return str(hydra_cfg.sweep.dir), int(hydra_cfg.job.num)


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
            from hydra.core.hydra_config import HydraConfig

            swept = HydraConfig.get().job.override_dirname
            overrides["group"] = cfg.logger.get("group") or f"sweep:{sweep_dir}"[-128:]
            overrides["name"] = f"{cfg.logger.get('name') or cfg.run_name} {swept or f'#{job_num}'}"[:128]
        # One W&B run per run directory: a resumed run continues it (its id is kept in the directory).
        overrides["id"] = wandb_run_id(Path(cfg.paths.output_dir))
        overrides["resume"] = "allow"
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


def build_callbacks(cfg: DictConfig) -> list:
    """Instantiate every entry of the `callbacks` group that has a `_target_`. Without a logger (logger=none)
    the LR monitor, which only writes to a logger, is left out (Lightning refuses it there)."""
    entries: Iterable = (cfg.get("callbacks") or {}).values()
    callbacks = [c for c in entries if isinstance(c, DictConfig) and "_target_" in c]
    if not cfg.get("logger"):  # Lightning refuses a LearningRateMonitor without a logger (logger=none, debug=fast)
        callbacks = [c for c in callbacks if not str(c._target_).endswith("LearningRateMonitor")]
    return [hydra.utils.instantiate(c) for c in callbacks]


class ResumableCSVLogger(CSVLogger):
    """Lightning's CSVLogger, but a resumed run appends to `metrics.csv` instead of deleting it: rows from the
    resumed step on (logged before the interruption, logged again now) are dropped by `resume_at`, so the file
    is one history."""

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


def run_config(cfg: DictConfig) -> dict:
    """The resolved config, plus what a reader must not miss (random weights)."""
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
