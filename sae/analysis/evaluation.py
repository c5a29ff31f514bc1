"""Evaluate a trained SAE: load the run, extract the held-out activations, run each section, write `eval/`.

    run = load_run("outputs/.../my-run")                 # or load_run(ckpt="…/checkpoints/last.ckpt")
    metrics = evaluate_run(run, extractor, images, out=run.directory / "eval", cfg=cfg.eval)

`eval/` then holds metrics.json, density.png, curves_*.png + curves.csv, interpretability.json + .png,
features/ and neurons/ (visualizations and dataset examples of the browsed units), index.html and
neurons.html. The caller (evaluate.py) builds the extractor and the held-out images from the run's config.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from sae.analysis import examples
from sae.analysis.sections import HeldOut, Section, fidelity, reconstruction, scan, write_json
from sae.checks import BadConfigError
from sae.errors import UserError
from sae.nn import SparseAutoencoder, load_sae
from sae.nn.io import CONFIG_NAME, WEIGHTS_NAME

log = logging.getLogger("sae.evaluate")

RANDOM_WEIGHTS_WARNING = (
    "InceptionV1 has RANDOM weights (model.pretrained=false): the SAE learned directions of a random network. "
    "Reconstruction metrics and the machinery are meaningful; curve detectors, II and visualizations are not."
)


class RunNotFoundError(UserError, FileNotFoundError):
    """The run directory or checkpoint to evaluate does not exist or is incomplete."""


@dataclass
class LoadedRun:
    """A trained SAE in the layer's raw units, with what is known of how it was trained.

    train_config: the run's config_resolved.yaml (None if absent); meta: sae.json's metadata (layer,
    model_weights, input_scale, global_step, ...)."""

    sae: SparseAutoencoder
    meta: dict[str, Any]
    directory: Path | None
    train_config: dict[str, Any] | None
    source: str

    @property
    def layer(self) -> str:
        return str(self.meta.get("layer") or (self.train_config or {}).get("layer", {}).get("name"))


def load_run(run: str | Path | None = None, ckpt: str | Path | None = None) -> LoadedRun:
    """Load `run` (a run directory with sae.safetensors + sae.json) or `ckpt` (an SAEModule checkpoint)."""
    if (run is None) == (ckpt is None):
        raise RunNotFoundError("give exactly one of run=RUN_DIR (a training run's directory) or ckpt=PATH.")
    if run is not None:
        directory = Path(run)
        if not (directory / WEIGHTS_NAME).is_file() or not (directory / CONFIG_NAME).is_file():
            raise RunNotFoundError(
                f"{directory} has no {WEIGHTS_NAME} + {CONFIG_NAME}: not a finished training run. Point run= at the "
                f"directory train.py wrote, or use ckpt={directory}/checkpoints/last.ckpt for an unfinished one."
            )
        sae, meta = load_sae(directory)
        return LoadedRun(sae, meta, directory, _train_config(directory), str(directory))
    path = Path(ckpt)
    if not path.is_file():
        raise RunNotFoundError(f"checkpoint {path} does not exist.")
    from sae.train.guards import load_checkpoint_file
    from sae.train.module import SAEModule

    checkpoint = load_checkpoint_file(path, map_location="cpu", weights_only=True)  # a safe load, checked whole
    if len(checkpoint.get("members") or {}) > 1:
        raise RunNotFoundError(f"{path} is a sae=multi checkpoint of several SAEs ({', '.join(checkpoint['members'])}); "
                               "evaluate one member's export instead: run=RUN_DIR/members/NAME (written when the "
                               "run ends; resume it with ckpt_path=last to finish it).")
    module = SAEModule(**checkpoint["hyper_parameters"])
    module.load_state_dict(checkpoint["state_dict"])
    scale = float(module.input_scale) or 1.0
    sae = copy.deepcopy(module.sae)
    sae.load_exported_(module.sae.export_tensors(scale))  # fold the input scale: raw units, like an export
    meta = {**module.metadata, "input_scale": scale, "global_step": int(checkpoint["global_step"])}
    directory = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    return LoadedRun(sae.eval(), meta, directory, _train_config(directory), str(path))


def _train_config(directory: Path) -> dict[str, Any] | None:
    path = directory / "config_resolved.yaml"
    return yaml.safe_load(path.read_text()) if path.is_file() else None


def extract(extractor, images: Tensor, batch_size: int = 32) -> Tensor:
    """(N, 3, S, S) uint8 -> (N, C, h, w) float32 CPU activations of the extractor's layer."""
    device = next(extractor.parameters()).device
    with torch.inference_mode():
        return torch.cat([extractor(chunk.to(device)).cpu() for chunk in images.split(batch_size)])


@dataclass
class Evaluation:
    """What evaluate_run produced: metrics (as in metrics.json), sections, and the files written."""

    metrics: dict[str, Any]
    sections: dict[str, Section] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)


@dataclass
class Context:
    """What every section may read: the run, the network at its layer, the SAE, the held-out images with their
    activations and the activation scans of features and neurons, and where files go."""

    run: LoadedRun
    extractor: Any
    sae: SparseAutoencoder
    held: HeldOut
    scans: dict[str, examples.ActivationScan]
    out: Path
    batch_size: int
    weights: str
    extra: dict[str, Any] = field(default_factory=dict)  # what a section hands to the page writer


# A section: (context, its own eval.<name> config) -> Section (metrics, files written, per-unit columns).
# Adding one is a function registered here plus an `eval.<name>` block and its name in `eval.sections`.
SECTIONS: dict[str, Callable[[Context, Any], Section]] = {}


def section(name: str):
    def register(fn: Callable[[Context, Any], Section]) -> Callable[[Context, Any], Section]:
        SECTIONS[name] = fn
        return fn
    return register


@section("reconstruction")
def _reconstruction(ctx: Context, cfg: Any) -> Section:
    result, ctx.scans["features"] = reconstruction(ctx.sae, ctx.held, ctx.out)
    ctx.scans["neurons"] = scan(ctx.held)
    return result


@section("fidelity")
def _fidelity(ctx: Context, cfg: Any) -> Section:
    return fidelity(ctx.extractor.net, ctx.sae, ctx.held, ctx.batch_size)


@section("curves")
def _curves(ctx: Context, cfg: Any) -> Section:
    from sae.analysis.curve_study import curve_section

    return curve_section(ctx.extractor, ctx.sae, ctx.out, cfg, ctx.held, ctx.scans, ctx.weights, ctx.run.directory)


@section("interpretability")
def _interpretability(ctx: Context, cfg: Any) -> Section:
    from sae.analysis.studies import interpretability_section

    return interpretability_section(ctx.held, ctx.scans, ctx.out, cfg, ctx.sae)


@section("browser")
def _browser(ctx: Context, cfg: Any) -> Section:
    from sae.analysis.browser import browse

    result, ctx.extra["browsed"] = browse(ctx.extractor, ctx.sae, ctx.held, ctx.scans, ctx.out, cfg)
    return result


def evaluate_run(run: LoadedRun, extractor, images: Tensor, out: Path, cfg: Any) -> Evaluation:
    """Run cfg.sections (reconstruction first: the others read its scans) on the held-out `images`
    (N, 3, S, S) uint8; write everything under `out`."""
    unknown = sorted(set(cfg.sections) - set(SECTIONS))
    if unknown:
        raise BadConfigError(f"eval.sections has unknown {unknown}; choose from {list(SECTIONS)}.")
    if extractor.layer != run.layer:
        raise ValueError(f"the SAE was trained on {run.layer!r} but the extractor is at {extractor.layer!r}.")
    if extractor.d_in != run.sae.d_in:
        raise ValueError(f"the SAE reads d_in={run.sae.d_in} but {extractor.layer!r} has {extractor.d_in} channels.")
    device = next(extractor.parameters()).device
    sae = run.sae.to(device).eval()
    start = time.perf_counter()
    held = HeldOut(images, extract(extractor, images, int(cfg.batch_size)), extractor.layer)
    timings = {"extract": time.perf_counter() - start}
    weights = run.meta.get("model_weights", "unknown")
    result = Evaluation({"run": {
        "source": run.source, "layer": run.layer, "architecture": sae.architecture, "d_in": sae.d_in,
        "d_sae": sae.d_sae, "model_weights": weights, "global_step": run.meta.get("global_step"),
        "image_size": int(images.shape[-1]), "held_out_images": int(images.shape[0]),
    }})
    ctx = Context(run, extractor, sae, held, {}, out, int(cfg.batch_size), weights)
    for name in ["reconstruction", *(n for n in SECTIONS if n in cfg.sections and n != "reconstruction")]:
        log.info("eval: %s ...", name)
        began = time.perf_counter()
        done = SECTIONS[name](ctx, cfg.get(name))
        timings[name] = time.perf_counter() - began
        log.info("eval: %s done in %.1f s", name, timings[name])
        result.sections[name], result.metrics[name] = done, done.metrics
        result.files += done.files
    result.metrics["timings_s"] = {k: round(v, 2) for k, v in timings.items()}
    write_json(out / "metrics.json", _json_safe(result.metrics))
    result.files.append("metrics.json")
    if "browsed" in ctx.extra:
        from sae.analysis.browser import write_pages

        warnings = [RANDOM_WEIGHTS_WARNING] if weights == "random" else []
        title = f"SAE {sae.architecture} on {run.layer} ({sae.d_sae} features)"
        result.files += write_pages(out, title, result.metrics, result.sections, ctx.extra["browsed"], warnings)
    return result


def _json_safe(value: Any) -> Any:
    """NaN/inf -> None, tensors and numpy scalars -> Python numbers, recursively (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value

