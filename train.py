"""Train an SAE on an InceptionV1 layer: python train.py layer=mixed3b sae.expansion=8

Outputs, in the run directory: checkpoints/, config_resolved.yaml, sae.safetensors and sae.json.
Returns `optimized_metric` to Hydra sweepers.

Resume: `python train.py ... hydra.run.dir=RUN_DIR ckpt_path=last` continues RUN_DIR/checkpoints/last.ckpt
exactly (weights, optimizer, schedules, dead-feature counters, RNG, position in the data stream). A resumed run
must name the original run directory. Exit status: 0 done, 2 bad input, 3 non-finite loss (the last good
checkpoint is kept), 143 stopped by SIGTERM after saving last.ckpt.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
import lightning as L
import yaml
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from callbacks.preemption import PreemptionCheckpoint, last_checkpoint_path
from sae.console import configure as configure_console
from sae.hostmem import reuse_freed_host_memory
from sae.nn.io import atomic_write_bytes
from sae.run.configs import register_configs
from sae.run.job import build_callbacks, check_numbers, run_config, write_planted_truth
from sae.run.loggers import build_logger, close_logger
from sae.run.rundir import OutputDirError, check_writable, take_ownership
from sae.run.task import run_task
from sae.train.guards import (
    CheckpointError, ResumeMismatchError, SafeCheckpointIO, check_restorable, load_checkpoint_file,
)

log = logging.getLogger("sae")


def resolve_ckpt_path(ckpt_path: str | None, out_dir: Path) -> Path | None:
    """`ckpt_path`: null (fresh run), "last" (this run directory's last.ckpt, which must exist), "auto"
    (last.ckpt if there is one, else a fresh run: for jobs that a scheduler may requeue) or a file."""
    if not ckpt_path:
        return None
    last = out_dir / "checkpoints" / "last.ckpt"
    if str(ckpt_path) == "auto":
        return last if last.is_file() else None
    if str(ckpt_path) == "last":
        if not last.is_file():
            raise CheckpointError(
                f"ckpt_path=last: {last} does not exist. A resumed run must use the directory of the run it "
                "continues: add hydra.run.dir=THAT_RUN_DIR (for example the outputs/DATE/TIME_NAME folder it "
                "wrote), or use ckpt_path=auto to start fresh when there is nothing to resume."
            )
        return last
    return Path(ckpt_path).expanduser()


def check_resume(path: Path, module: L.LightningModule, datamodule: L.LightningDataModule) -> int:
    """Before any training: the checkpoint reads whole and holds this SAE and this data stream. Returns its step."""
    checkpoint = load_checkpoint_file(path)
    module.check_resumable(checkpoint, name=str(path))
    check_restorable(checkpoint, module.state_dict(), path)
    saved_seed = checkpoint.get(type(datamodule).__qualname__, {}).get("seed", datamodule.seed)
    if saved_seed != datamodule.seed:
        raise ResumeMismatchError(f"{path} was trained with seed={saved_seed} but this run has seed={datamodule.seed}; "
                                  "resume with the original seed.")
    log.info("resuming from %s (step %d)", path, checkpoint["global_step"])
    return int(checkpoint["global_step"])


def train(cfg: DictConfig) -> float | None:
    configure_console(bool(cfg.get("verbose", False)))
    check_numbers(cfg)
    out_dir = check_writable(cfg.paths.output_dir)
    ckpt_path = resolve_ckpt_path(cfg.ckpt_path, out_dir)
    lock = take_ownership(out_dir, ckpt_path, overwrite=bool(cfg.get("overwrite", False)))
    try:
        return _train(cfg, out_dir, ckpt_path)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: DictConfig, out_dir: Path, ckpt_path: Path | None) -> float | None:
    L.seed_everything(cfg.seed, workers=True)
    if cfg.get("reuse_host_memory", True):
        reuse_freed_host_memory()  # before the data module: its worker processes inherit the setting
    datamodule = hydra.utils.instantiate(cfg.data)
    config = run_config(cfg)
    metadata = {"layer": getattr(datamodule, "layer", None) or cfg.layer.name, "model_weights": config["model_weights"], "data": cfg.data._target_}
    module = hydra.utils.instantiate(cfg.sae, d_in=datamodule.d_in, metadata=metadata)
    if isinstance(config.get("sae"), dict) and hasattr(getattr(module, "sae", None), "d_sae"):
        config["sae"]["d_sae"] = int(module.sae.d_sae)  # filled in from sae.expansion
    resumed_step = None if ckpt_path is None else check_resume(ckpt_path, module, datamodule)
    module.resuming = resumed_step is not None  # keep the saved input scale and b_dec: no init sample is drawn
    if resumed_step is None or not (out_dir / "config_resolved.yaml").is_file():
        # A resume keeps the original record; its own command is in .hydra/resume-N/.
        atomic_write_bytes(out_dir / "config_resolved.yaml", yaml.safe_dump(config, sort_keys=False).encode())
    write_planted_truth(cfg, out_dir)
    logger = build_logger(cfg, resumed_step)
    preemption = PreemptionCheckpoint()
    try:
        plugins = [SafeCheckpointIO(), *hydra.utils.instantiate(cfg.trainer.get("plugins") or [])]
        trainer = hydra.utils.instantiate(cfg.trainer, logger=logger, callbacks=[*build_callbacks(cfg), preemption],
                                          plugins=plugins)
        if logger:
            logger.log_hyperparams(config)
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=None if ckpt_path is None else str(ckpt_path))
        except SIGTERMException:
            pass  # Lightning's way of leaving fit after SIGTERM; PreemptionCheckpoint has saved last.ckpt
        except SystemExit:
            if trainer.interrupted:  # Lightning exits after a KeyboardInterrupt: a second Ctrl-C, or one in set-up
                raise Aborted(last_checkpoint_path(trainer)) from None
            raise
        if preemption.preempted or trainer.received_sigterm:
            log.warning("stopped by %s at step %d; continue with ckpt_path=last hydra.run.dir=%s",
                        preemption.signal_name or "SIGTERM", trainer.global_step, out_dir)
            raise Preempted(preemption.signal_name or "SIGTERM")
        if not trainer.fast_dev_run and cfg.optimized_metric not in trainer.callback_metrics:
            trainer.validate(module, datamodule=datamodule, verbose=False)  # a sweep always gets its metric
        # The final state, whatever the checkpoint interval: continue it later with a larger trainer.max_steps.
        if not trainer.fast_dev_run:
            # every rank calls it; rank zero writes. False: the whole training state (optimizer, loops)
            trainer.save_checkpoint(out_dir / "checkpoints" / "last.ckpt", False)
        if trainer.is_global_zero:
            try:
                exported = module.export(out_dir)
            except OSError as e:  # a full disk: the checkpoint above is whole, the export is not written
                raise OutputDirError(f"cannot write the export to {out_dir} ({e.strerror or e}); free space, then "
                                     "export again by resuming with ckpt_path=last.") from e
            log.info("exported %s", exported)
        value = trainer.callback_metrics.get(cfg.optimized_metric)
        return None if value is None else float(value)
    finally:
        close_logger(logger)


class Preempted(Exception):
    """Training stopped on SIGTERM or Ctrl-C after saving last.ckpt (no export: the SAE is not finished)."""


class Aborted(Exception):
    """A second Ctrl-C (or one before training began): stopped at once, without saving."""


register_configs()  # the generated groups (layer=...) before Hydra composes


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from sae.errors import EXIT_INTERRUPTED, EXIT_PREEMPTED
    from sae.run.job import sweep_job

    try:
        return run_task(lambda: train(cfg), in_sweep=lambda: sweep_job() is not None)
    except Preempted as stopped:
        sys.exit(EXIT_INTERRUPTED if str(stopped) == "SIGINT" else EXIT_PREEMPTED)
    except (Aborted, KeyboardInterrupt) as aborted:
        last = Path(str(aborted)) if isinstance(aborted, Aborted) else None
        log.error("stopped by Ctrl-C without saving; %s", f"{last} (saved earlier) can be resumed with "
                  "ckpt_path=last" if last and last.is_file() else "no checkpoint was written: run the command again")
        sys.exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    from sae.run.preflight import preflight

    preflight("config")  # an unknown option or group choice: one line and exit 2, before Hydra starts
    main()
