"""Evaluate a trained SAE: python evaluate.py run=RUN_DIR   (or ckpt=PATH, runs='[A,B]', compare='[A,B]')

Writes RUN_DIR/eval/: metrics.json (reconstruction, spliced-in fidelity, curve detectors, interpretability
index), density.png, curves_*.png + curves.csv, interpretability.json + .png, features/ and neurons/ pictures,
and the feature browser index.html + neurons.html. Several runs: each is evaluated, then compare.csv/.png/.html.
Returns the held-out FVU to Hydra sweepers.
"""

from __future__ import annotations

import glob
import logging
import os
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from sae.analysis.evaluation import LoadedRun, RunNotFoundError, evaluate_run, load_run
from sae.analysis.provenance import archive_previous, describe_images, write_record
from sae.analysis.responses_eval import evaluate_responses, is_responses_run
from sae.checks import BadConfigError, build_from_config
from sae.run.loggers import wandb_has_credentials
from sae.run.rundir import check_writable
from sae.run.task import run_task
from sae.run.configs import register_configs
from sae.model.planted import PLANTED_LAYERS, planted_truth

log = logging.getLogger("sae")
WANDB_PROJECT = "inception-sae"


def expand(patterns) -> list[Path]:
    """Run directories from paths and globs, in sorted order; a pattern that matches nothing is an error."""
    runs: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(str(pattern))) if glob.has_magic(str(pattern)) else [str(pattern)]
        matches = [m for m in matches if Path(m, "sae.json").is_file() or not glob.has_magic(str(pattern))]
        if not matches:
            raise RunNotFoundError(f"run pattern {pattern!r} matches no training run (a folder with sae.json).")
        runs += [Path(m) for m in matches]
    return runs


def build_extractor_and_images(cfg: DictConfig, run: LoadedRun):
    """The run's InceptionV1 extractor (model overrides applied) and its held-out images (data= as in training)."""
    train = run.train_config or {}
    check_layer_of(run)
    if not cfg.get("data") and "data" not in train:
        raise RunNotFoundError(f"{run.source} has no config_resolved.yaml: pass the images, e.g. data=imagefolder "
                               "data.root=DIR, and model.pretrained=true|false as in training.")
    model = dict(train.get("model") or {"_target_": "sae.model.InceptionExtractor"})
    model.update({k: v for k, v in cfg.model.items() if v is not None}, layer=run.layer)
    data = OmegaConf.to_container(cfg.data, resolve=False) if cfg.get("data") else dict(train["data"])
    if "extractor" not in data:
        raise RunNotFoundError(f"{run.source} was trained on precomputed vectors ({data.get('_target_')}); evaluation "
                               "needs images: pass data=imagefolder data.root=DIR or data=sample.")
    data["extractor"] = "${model}"
    root = OmegaConf.create({"model": model, "seed": train.get("seed", cfg.seed), "data": data})
    if run.meta.get("model_weights") == "random" and model.get("pretrained", True) and not model.get("weights"):
        log.warning("the SAE was trained on RANDOM InceptionV1 weights but is evaluated on pretrained ones.")
    datamodule = build_from_config(OmegaConf.to_container(root.data, resolve=True), "data")  # allow-listed classes only
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    extractor = datamodule.extractor.to(device)
    images = datamodule.held_out_images()
    if cfg.eval.max_images:
        images = images[: int(cfg.eval.max_images)]
    return extractor, images, describe_images(datamodule, int(images.shape[0]))


def check_layer_of(run: LoadedRun) -> None:
    """The SAE's recorded layer agrees with the run's config and has the SAE's width (one line, exit 2, if not)."""
    from sae.model import check_layer, layer_channels

    trained = ((run.train_config or {}).get("layer") or {}).get("name")
    if trained and run.meta.get("layer") and trained != run.meta["layer"]:
        raise BadConfigError(f"{run.source}: sae.json names layer {run.meta['layer']!r} but the run's "
                             f"config_resolved.yaml was trained on {trained!r}; the export and the run do not belong "
                             "together. Evaluate the directory that train.py wrote for this SAE.")
    channels = layer_channels(check_layer(run.layer))
    if channels != run.sae.d_in:
        raise BadConfigError(f"{run.source}: the SAE reads d_in={run.sae.d_in} but layer {run.layer!r} has "
                             f"{channels} channels; its sae.json names the wrong layer.")


def wandb_run_id(run_dir: Path | None) -> str | None:
    """The id of the newest W&B run logged under RUN_DIR/wandb (offline-run-DATE-ID or run-DATE-ID)."""
    if run_dir is None:
        return None
    found = sorted((p.name.split("run-", 1)[1] for p in (run_dir / "wandb").glob("*run-*-*") if p.is_dir()))
    return found[-1].rsplit("-", 1)[1] if found else None  # DATE_TIME-ID: the newest date wins


def numeric_leaves(metrics: dict, prefix: str = "") -> dict:
    """Nested metrics -> {"section/a/b": number}: every number (booleans as 0/1, e.g. curves/above_null/*),
    leaving out lists and the criterion's settings."""
    flat = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and key not in ("criterion", "per_curve", "known_curve_neurons"):
            flat.update(numeric_leaves(value, name + "/"))
        elif isinstance(value, (int, float)) and prefix:
            flat[name] = int(value) if isinstance(value, bool) else value
    return flat


def log_to_wandb(cfg: DictConfig, run: LoadedRun, out: Path, metrics: dict, files: list[str]) -> None:
    """Log metrics and figures to the run's W&B run (resumed by id), or a new one in wandb_group."""
    run_id = wandb_run_id(run.directory)
    logger = cfg.get("logger")
    explicit = bool(logger) and "Wandb" in str(logger.get("_target_", ""))
    if "logger" in cfg and not explicit or (not explicit and run_id is None):
        return  # logger=none (or csv/tensorboard: the eval folder is the record), or no W&B run to add to
    import wandb

    offline = os.environ.get("WANDB_MODE", "").lower() in ("offline", "dryrun") or not wandb_has_credentials()
    project = logger.get("project", WANDB_PROJECT) if explicit else WANDB_PROJECT
    where = dict(id=run_id, resume="allow") if run_id else dict(group=logger.get("group"), job_type="eval",
                                                                name=f"eval-{run.layer}")
    try:
        wb = wandb.init(project=project, dir=str(run.directory or out), mode="offline" if offline else "online",
                        settings=wandb.Settings(silent=not cfg.get("verbose", False)), **where)
        flat = {f"eval/{key}": value for key, value in numeric_leaves(metrics).items()}
        flat.update({f"eval/{name}": wandb.Image(str(out / name)) for name in files if name.endswith(".png")})
        from sae.analysis.browser import wandb_feature_table

        if (table := wandb_feature_table(out)) is not None:
            flat["eval/features_table"] = table
        wb.log(flat)
        wb.summary.update({k: v for k, v in flat.items() if not hasattr(v, "image")})
    except Exception as e:  # the files are written; a W&B failure must not lose the evaluation
        log.warning("W&B logging failed (%s); everything is in %s", e, out)
    finally:
        if wandb.run is not None:
            wandb.finish()


def evaluate_one(cfg: DictConfig, run_dir: Path | None = None, ckpt: str | None = None) -> dict:
    run = load_run(run_dir, ckpt)
    out = check_writable(cfg.eval.out or (run.directory or Path(str(ckpt)).parent) / "eval")
    torch.manual_seed(int(cfg.seed))
    if is_responses_run(run.train_config, cfg.get("data")):  # recorded responses: no InceptionV1
        archive_previous(out)  # an earlier evaluation is kept in eval/previous/, never replaced
        metrics = evaluate_responses(run, out, cfg.eval, cfg.get("data"))
        log.info("wrote %s; open %s", out / "metrics.json", out / "index.html")
        return metrics
    extractor, images, described = build_extractor_and_images(cfg, run)
    archive_previous(out)  # an earlier evaluation is kept in eval/previous/, never replaced
    write_record(out, run, described, cfg.eval)
    log.info("evaluating %s (%s, %d held-out images) into %s", run.source, run.layer, images.shape[0], out)
    if run.meta.get("model_weights") == "planted" and run.layer in PLANTED_LAYERS:
        planted_truth(run.layer).save(out / "planted_truth.json")  # the known answer, next to the metrics
    result = evaluate_run(run, extractor, images, out, cfg.eval)
    log.info("wrote %s; open %s", out / "metrics.json", out / "index.html")
    log_to_wandb(cfg, run, out, result.metrics, result.files)
    return result.metrics


def main_body(cfg: DictConfig) -> float | None:
    from sae.analysis.compare import write_comparison

    runs = expand(list(cfg.runs) + ([cfg.run] if cfg.run else []))
    if len(runs) == 1 and not cfg.ckpt and not cfg.compare:
        return evaluate_one(cfg, runs[0])["reconstruction"]["fvu"]
    if cfg.ckpt:
        return evaluate_one(cfg, ckpt=cfg.ckpt)["reconstruction"]["fvu"]
    for run_dir in runs:
        if cfg.eval.reuse and (run_dir / "eval" / "metrics.json").is_file():
            continue
        evaluate_one(cfg, run_dir)
    compared = runs + expand(cfg.compare)
    if not compared:
        raise RunNotFoundError("nothing to evaluate: pass run=RUN_DIR, ckpt=PATH, runs='[A,B]' or compare='[A,B]'.")
    out = Path(cfg.compare_out or Path(os.path.commonpath([str(p.resolve()) for p in compared])) / "compare")
    write_comparison(compared, check_writable(out))
    log.info("compared %d runs: %s", len(compared), out / "compare.html")
    return None


register_configs()  # the generated groups (layer=...) before Hydra composes


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> float | None:
    from sae.console import configure

    configure(bool(cfg.get("verbose", False)))
    return run_task(lambda: main_body(cfg))


if __name__ == "__main__":
    from sae.run.preflight import preflight

    preflight("evaluate")  # an unknown option or group choice: one line and exit 2, before Hydra starts
    main()
