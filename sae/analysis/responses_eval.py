"""Evaluate an SAE trained on recorded responses (`data=responses`): no InceptionV1 involved.

The run's config names the responses file, the stimulus images and the split; they are read here with the
same loaders as in training (never by instantiating a class named in the run's files). On the held-out
stimuli: reconstruction metrics, and the interpretability index (Klindt et al. 2023) of the recorded units
("neurons"), the SAE features, and the directions of each family (cosine k-means, PCA, ICA, NMF, random),
fitted on the training stimuli. `eval.interpretability.truth` (a (K, n_units) array of known directions, e.g.
a simulated recording's truth.npy) adds them as a family and reports how well each family recovers them.

Writes eval/metrics.json, density.png, interpretability.json + .png, and the browser: index.html (features),
neurons.html (units) and one page per family, each unit with its top stimuli.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sae.analysis import ii_protocol
from sae.analysis.directions import Directions
from sae.analysis.sections import HeldOut, Section, reconstruction
from sae.data.responses import ResponseFileError, check_counts, load_responses, load_stimuli, stimulus_paths
from sae.data.vectors import split_holdout

log = logging.getLogger("sae.evaluate")
TARGET = "sae.data.ResponseDataModule"
TILE = 48  # px per stimulus in the browser's pictures


def is_responses_run(train_config: dict | None, data_override: Any = None) -> bool:
    """Whether a run was trained on recorded responses (by the data target's name: a string compare, no import)."""
    data = data_override if data_override else (train_config or {}).get("data") or {}
    return str(data.get("_target_", "")) == TARGET


def evaluate_responses(run, out: Path, cfg: Any, data_override: Any = None) -> dict[str, Any]:
    """Evaluate `run` (an `evaluation.LoadedRun`) on its held-out stimuli; returns the metrics written."""
    from sae.analysis.evaluation import _json_safe
    from sae.analysis.sections import write_json

    data = dict(data_override if data_override else run.train_config["data"])
    responses = load_responses(data["path"])
    paths = stimulus_paths(data["images"])
    check_counts(len(responses), paths, data["path"], data["images"])
    if responses.shape[1] != run.sae.d_in:
        raise ResponseFileError(f"{data['path']} has {responses.shape[1]} units but the SAE reads d_in={run.sae.d_in}.")
    train, held = split_holdout(len(responses), float(data.get("val_fraction", 0.2)), int(data.get("seed", 0)))
    if cfg.max_images:
        held = held[: int(cfg.max_images)]
    images = load_stimuli([paths[i] for i in held.tolist()], int(data.get("image_size", 64)))
    sae = run.sae.cpu().eval()
    x = responses[held]
    metrics: dict[str, Any] = {"run": {"source": run.source, "layer": "responses", "architecture": sae.architecture,
                                       "d_in": sae.d_in, "d_sae": sae.d_sae, "model_weights": "n/a (recorded responses)",
                                       "global_step": run.meta.get("global_step"), "training_stimuli": len(train),
                                       "held_out_stimuli": len(held)}}
    sections: dict[str, Section] = {}
    sections["reconstruction"], _ = reconstruction(sae, HeldOut(images, x[:, :, None, None], "responses"), out)
    icfg = cfg.interpretability
    families = ii_protocol.fit_families(responses[train], list(icfg.families), icfg, sample=icfg.get("fit_sample"))
    truth = _truth(icfg.get("truth"), sae.d_in)
    if truth is not None:
        families["truth"] = Directions("truth", truth, lambda v: v.float() @ truth.T, {"k": truth.shape[0]})
    with torch.inference_mode():
        acts = {"features": sae.encode(x.float()), "neurons": x, **{n: f.encode(x) for n, f in families.items()}}
    values, unavailable = ii_protocol.score_families(acts, {"features", "neurons"}, images, icfg)
    vectors = {"neurons": torch.eye(sae.d_in), "features": sae.W_dec.detach().float().cpu(),
               **{n: f.vectors for n, f in families.items()}}
    extra = {"recovery": ii_protocol.recovery(vectors, truth)} if truth is not None else {}
    protocol = {"position": "response", "inputs": "stimuli", "k": int(icfg.k), "fit_stimuli": len(train),
                "scored_stimuli": len(held), "in_sample": False, "families": {n: f.info for n, f in families.items()}}
    section = Section({name: ii_protocol.summary(per_kind) for name, per_kind in values.items()})
    section.metrics.update({name: {"available": False, "reason": why} for name, why in unavailable.items()})
    section.metrics.update(extra)
    if values:
        section.files += ii_protocol.write_results(out, values, unavailable, protocol, extra)
    sections["interpretability"] = section
    metrics.update({name: s.metrics for name, s in sections.items()})
    write_json(out / "metrics.json", _json_safe(metrics))
    if "browser" in cfg.sections:
        _browser(out, sae, metrics, sections, acts, values, images, int(icfg.k), cfg.browser)
    return metrics


def _truth(path: Any, d: int) -> Tensor | None:
    if not path:
        return None
    truth = load_responses(path)  # the same safe loaders: (K, n_units)
    if truth.shape[1] != d:
        raise ResponseFileError(f"eval.interpretability.truth={path}: {truth.shape[1]} columns, expected {d} units.")
    return truth


def _browser(out: Path, sae, metrics: dict, sections: dict[str, Section], acts: dict[str, Tensor],
             values: dict, images: Tensor, k: int, cfg: Any) -> None:
    """index.html (features), neurons.html (recorded units) and <family>.html: every unit's II and its top
    stimuli (the most frequent features first: at most cfg.n_features features and 64 units per page)."""
    from sae.analysis.browser import summary_tables
    from sae.analysis.report import render_page, write_page

    summary, notes = summary_tables(metrics)
    figures = [n for n in ("density.png", "interpretability.png") if (out / n).is_file()]
    pages = [("features", "index.html"), ("neurons", "neurons.html")] + [(f, f"{f}.html") for f in acts
                                                                         if f not in ("features", "neurons")]
    links = [(kind, page) for kind, page in pages] + [("metrics.json", "metrics.json")]
    for kind, page in pages:
        a = acts[kind]
        shown = int(cfg.n_features) if kind == "features" else 64
        order = (a > 0).float().mean(0).argsort(descending=True)[:shown].tolist()
        paths = _top_stimuli(out / kind, kind[0], a, order, images, k)
        units = {"density": (a > 0).float().mean(0).numpy(),
                 **{f"ii_{d}": per_kind[kind] for d, per_kind in values.items()}}
        html = render_page(f"SAE {sae.architecture} on recorded responses: {kind}", _columns(units, kind),
                           _rows(units, a.shape[1], paths), summary=summary, figures=figures, links=links,
                           warnings=notes, sort="density:desc")
        write_page(out / page, html)


def _columns(units: dict, label: str) -> list:
    from sae.analysis.report import Column

    return [Column("index", label, digits=6),
            Column("density", "density", title="fraction of stimuli on which the unit is positive"),
            *(Column(key, key.replace("ii_", "II "), title="interpretability index (Klindt et al. 2023)")
              for key in sorted(units) if key.startswith("ii_")),
            Column("examples", "top stimuli", kind="image")]


def _rows(units: dict, n_units: int, paths: dict) -> list[dict]:
    """One row per unit: its per-unit values and, for the units shown, its top-stimuli picture."""
    rows = []
    for u in range(n_units):
        row = {"index": u, **{key: float(np.asarray(values)[u]) for key, values in units.items()}}
        row.update(paths.get(u, {}))
        rows.append(row)
    return rows


def _top_stimuli(folder: Path, prefix: str, acts: Tensor, units: list[int], images: Tensor, k: int) -> dict:
    from sae.analysis.examples import image_grid
    from sae.analysis.sections import _write_png

    folder.mkdir(parents=True, exist_ok=True)
    tiles = torch.nn.functional.interpolate(images.float() / 255, size=(TILE, TILE), mode="nearest")
    values, top = acts.float().topk(min(k, acts.shape[0]), dim=0)
    paths = {}
    for u in units:
        captions = [[f"{v:.3g}" for v in values[:, u].tolist()]]
        grid = image_grid(tiles[top[:, u]][None], tile_captions=captions)
        paths[u] = {"examples": f"{folder.name}/" + _write_png(grid, folder / f"{prefix}{u}_top.png")}
    return paths
