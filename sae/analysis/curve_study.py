"""The curve-detector section of an evaluation (Cammarata et al. 2020; Gorton 2024), with its nulls.

Every count and orientation gap is reported beside the same figure for units that cannot be curve
detectors but are as sparse (`sae.analysis.curve_nulls`): random directions thresholded to each SAE
feature's (and each neuron's) firing density, and, when the run used real or planted weights, the
neurons of the same network with random weights. A count that is not above its null says so in
``curves.verdict``. Layers whose receptive field cannot hold a curve report "not applicable".
On a planted network (`model.weights=planted`) ``curves.planted`` scores recovery against the truth.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sae.analysis import curves
from sae.analysis.curve_criterion import CurveReport, curve_detectors, natural_scale, orientation_gap
from sae.analysis.curve_nulls import density_matched_directions, null_summary

log = logging.getLogger("sae.evaluate")

REAL_WEIGHTS = ("lucid", "file", "pretrained", "planted")  # model_weights values with a random-weights null


@dataclass
class Probe:
    """The stimuli for one layer and its channels' responses to them (S, C), computed once."""

    layer: str
    stimuli: curves.CurveStimuli
    neuron_responses: Tensor

    @classmethod
    def build(cls, extractor, orientations: int = 64, batch_size: int = 64, jitter: float | None = None) -> Probe:
        """Stimuli filling the layer's receptive field; the thick rendering displaced by ``jitter`` px
        (default half the layer's stride: the farthest a shape can be from the nearest unit's centre)."""
        layer = extractor.layer
        size = curves.stimulus_size(layer)
        jitter = receptive_field_stride(layer) / 2 if jitter is None else float(jitter)
        stimuli = curves.curve_stimuli(size, orientations=orientations, jitter=jitter)
        return cls(layer, stimuli, curves.unit_responses(extractor, None, stimuli, batch_size=batch_size))


def receptive_field_stride(layer: str) -> int:
    from sae.model import receptive_field

    return receptive_field(layer).stride


@dataclass
class Family:
    """One kind of unit put through the criterion: its tuning and report."""

    tuning: curves.Tuning
    report: CurveReport

    @property
    def orientations(self) -> np.ndarray:
        return self.report.preferred_orientation[self.report.is_curve].numpy()


def family(probe: Probe, responses: Tensor, scale: Tensor | None, criterion: dict | None = None) -> Family:
    """(S, U) stimulus responses and (U,) natural scales -> the criterion's verdict on each unit."""
    tuning = curves.radial_tuning(responses, probe.stimuli)
    return Family(tuning, curve_detectors(tuning, natural_scale=scale, **dict(criterion or {})))


def image_maxima(acts: Tensor, encode=None, chunk: int = 8) -> Tensor:
    """(N, C, h, w) held-out activations -> (N, U) each image's maximum of each unit (encode: rows -> units)."""
    out = []
    with torch.inference_mode():
        for part in acts.split(chunk):
            rows = part.permute(0, 2, 3, 1).reshape(-1, part.shape[1]).float()
            units = rows if encode is None else encode(rows)
            out.append(units.reshape(part.shape[0], -1, units.shape[1]).amax(1).float().cpu())
    return torch.cat(out)


def neuron_family(probe: Probe, acts: Tensor, criterion: dict | None = None, scale_k: int = 5) -> Family:
    return family(probe, probe.neuron_responses, natural_scale(image_maxima(acts), scale_k), criterion)


def feature_family(probe: Probe, acts: Tensor | None, sae, criterion: dict | None = None, scale_k: int = 5,
                   image_max: Tensor | None = None) -> Family:
    """SAE features (in raw units: sae reads the layer's activations as they are)."""
    device = next(sae.parameters()).device
    encode = lambda x: sae.encode(x.to(device)).float().cpu()  # noqa: E731
    if image_max is None:
        image_max = image_maxima(acts, encode)
    return family(probe, curves.sae_responses(sae, probe.neuron_responses), natural_scale(image_max, scale_k),
                  criterion)


def direction_family(probe: Probe, acts: Tensor, densities: Tensor, seed: int = 0, criterion: dict | None = None,
                     scale_k: int = 5) -> Family:
    """Random directions thresholded to fire at ``densities`` on the held-out positions (dead units dropped)."""
    null = density_matched_directions(acts, densities, seed=seed, top_k=scale_k)
    return family(probe, null.respond(probe.neuron_responses), null.scale, criterion)


# ------------------------------------------------------------------------------------------ the section
def curve_metrics(families: dict[str, Family], n_units: dict[str, int], alpha: float) -> dict[str, Any]:
    """Counts and gaps of the real families ('neurons', 'features') beside their nulls, and the verdicts."""
    neurons, features = families["neurons"], families["features"]
    metrics: dict[str, Any] = {
        "n_curve_features": features.report.n_curve, "n_curve_neurons": neurons.report.n_curve,
        "gap_neurons_deg": orientation_gap(neurons.orientations),
        "gap_features_deg": orientation_gap(features.orientations),
        "gap_neurons_and_features_deg": orientation_gap(np.concatenate([neurons.orientations, features.orientations])),
    }
    null: dict[str, Any] = {}
    pairs = {"features": ("n_curve_features", "null_features"), "neurons": ("n_curve_neurons", "null_neurons"),
             "random_weights_neurons": ("n_curve_neurons", "random_weights_neurons")}
    for name, (count, key) in pairs.items():
        if key in families:
            real = "features" if name == "features" else "neurons"
            null[name] = null_summary(metrics[count], n_units[real], families[key].report.n_curve,
                                      len(families[key].report.is_curve), alpha)
    if "null_features" in families:
        chance = families["null_features"].orientations
        null["gap_features_deg"] = orientation_gap(chance)
        null["gap_neurons_and_features_deg"] = orientation_gap(np.concatenate([neurons.orientations, chance]))
    if "null_neurons" in families:
        null["gap_neurons_deg"] = orientation_gap(families["null_neurons"].orientations)
    metrics["null"] = null
    metrics["above_null"] = {key: summary["above_null"] for key, summary in null.items() if isinstance(summary, dict)}
    metrics["verdict"] = _verdicts(metrics)
    return metrics


def _verdicts(metrics: dict[str, Any]) -> dict[str, str]:
    """One line per count: the count, its null's expected count, and 'not above null' when it is not."""
    verdicts = {}
    for name, summary in metrics["null"].items():
        if not isinstance(summary, dict):
            continue
        count = metrics["n_curve_features" if name == "features" else "n_curve_neurons"]
        label = {"features": "curve features vs random directions at the features' densities",
                 "neurons": "curve neurons vs random directions at the neurons' densities",
                 "random_weights_neurons": "curve neurons vs the same network with random weights"}[name]
        state = "above null" if summary["above_null"] else "NOT ABOVE NULL"
        verdicts[name] = (f"{count} {label} ({summary['n_curve']} of {summary['n_units']} null units pass: "
                          f"{summary['expected']:.1f} expected, p={summary['p_value']:.2g}): {state}")
    return verdicts


def build_families(extractor, sae, images: Tensor, acts: Tensor, scans: dict | None, cfg: Any,
                   weights: str) -> tuple[Probe, dict]:
    """The probe and every family: neurons, features, their density-matched nulls, random-weights neurons.

    images (N, 3, S, S) uint8 and acts (N, C, h, w): the held-out images and their activations."""
    criterion = dict(cfg.get("criterion") or {})
    null_cfg = cfg.get("nulls") or {}
    k, seed = int(cfg.get("scale_k", 5)), int(null_cfg.get("seed", 0))
    probe = Probe.build(extractor, int(cfg.orientations), int(cfg.batch_size), cfg.get("jitter"))
    scans = scans or {}
    neuron_max = scans["neurons"].image_max if "neurons" in scans else image_maxima(acts)
    feature_max = scans["features"].image_max if "features" in scans else None
    families = {"neurons": family(probe, probe.neuron_responses, natural_scale(neuron_max, k), criterion),
                "features": feature_family(probe, acts, sae, criterion, k, image_max=feature_max)}
    if null_cfg.get("directions", True):
        feature_density = scans["features"].frequency if "features" in scans else _density(feature_max, acts, sae)
        families["null_features"] = direction_family(probe, acts, feature_density, seed, criterion, k)
        families["null_neurons"] = direction_family(probe, acts, (acts > 0).float().mean((0, 2, 3)), seed + 1,
                                                    criterion, k)
    random_weights = null_cfg.get("random_weights", "auto")
    real = weights in REAL_WEIGHTS or getattr(extractor, "pretrained", False)
    if random_weights is True or (random_weights == "auto" and real):
        families["random_weights_neurons"] = _random_weights_neurons(extractor, images, probe, cfg, seed)
    return probe, families


def _density(image_max, acts: Tensor, sae) -> Tensor:
    """Fraction of held-out positions where each SAE feature fires (when no scan gave it)."""
    device = next(sae.parameters()).device
    fired = torch.zeros(sae.d_sae)
    with torch.inference_mode():
        for part in acts.split(8):
            rows = part.permute(0, 2, 3, 1).reshape(-1, part.shape[1]).to(device)
            fired += (sae.encode(rows) > 0).float().sum(0).cpu()
    return fired / (acts.shape[0] * acts.shape[2] * acts.shape[3])


def _random_weights_neurons(extractor, images: Tensor, probe: Probe, cfg: Any, seed: int) -> Family:
    """The same layer of InceptionV1 with random weights, on the same held-out images and stimuli."""
    from sae.analysis.evaluation import extract
    from sae.model import InceptionExtractor

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random_net = InceptionExtractor(extractor.layer, pretrained=False)
    random_net = random_net.to(next(extractor.parameters()).device)
    acts = extract(random_net, images, int(cfg.batch_size))
    random_probe = Probe(probe.layer, probe.stimuli,
                         curves.unit_responses(random_net, None, probe.stimuli, batch_size=int(cfg.batch_size)))
    return neuron_family(random_probe, acts, dict(cfg.get("criterion") or {}), int(cfg.get("scale_k", 5)))


CURVE_COLUMNS = ("is_curve", "preferred_orientation", "half_width", "peak_sharpness", "curve_vs_line",
                 "curve_vs_angle", "peak", "relative_peak", "split_fraction", "split_shift")


def curve_section(extractor, sae, out: Path, cfg: Any, held, scans: dict | None = None, weights: str = "unknown",
                  run_dir: Path | None = None):
    """Tuning of every neuron and SAE feature to curves, lines and angles centred on the centre unit's field,
    the criterion's verdict, the nulls beside every count and gap, and (planted weights) recovery."""
    from sae.analysis.sections import Section

    reason = curves.not_applicable(extractor.layer)
    if reason is not None:
        log.warning("curve detectors not applicable: %s", reason)
        return Section({"applicable": False, "reason": reason})
    probe, families = build_families(extractor, sae, held.images, held.acts, scans, cfg, weights)
    n_units = {kind: len(families[kind].report.is_curve) for kind in ("neurons", "features")}
    metrics: dict[str, Any] = {
        "applicable": True, "n_stimuli": len(probe.stimuli), "orientations": int(cfg.orientations),
        "criterion": {**families["features"].report.criterion,
                      "failures": {name: f.report.failures() for name, f in families.items()}},
        "n_units": n_units,
        **curve_metrics(families, n_units, float((cfg.get("nulls") or {}).get("alpha", 0.05))),
    }
    reports = {kind: families[kind].report for kind in ("neurons", "features")}
    planted = weights == "planted" or getattr(extractor, "weights_source", None) == "planted"
    # The 10 known curve neurons are channels of lucid's trained mixed3b; on a planted network they are nothing.
    known = [] if planted else curves.KNOWN_CURVE_NEURONS.get(extractor.layer, [])
    if known:
        metrics["known_curve_neurons"] = {
            str(n): {"is_curve": bool(reports["neurons"].is_curve[n]),
                     "preferred_orientation": float(reports["neurons"].preferred_orientation[n])} for n in known}
        metrics["gap_known_neurons_deg"] = orientation_gap(reports["neurons"].preferred_orientation[known].numpy())
    overlay = None
    if planted:
        from sae.analysis.curve_planted import load_truth, planted_recovery, wheel_overlay

        truth = load_truth(extractor.layer, run_dir)
        if truth is not None:
            metrics["planted"] = planted_recovery(truth, sae.W_dec, reports["features"], reports["neurons"])
            overlay = wheel_overlay(metrics["planted"])
    section = Section(metrics)
    _write_figures(section, families, metrics, known, overlay, out, int(cfg.n_plot))
    section.files.append(_write_curve_table(reports, out / "curves.csv"))
    for kind, report in reports.items():
        section.units[kind] = {"tuning": families[kind].tuning.curve.numpy(),
                               **{c: getattr(report, c).numpy() for c in CURVE_COLUMNS}}
    return section


def _write_figures(section, families: dict[str, Family], metrics: dict, known: list[int], overlay, out: Path,
                   n_plot: int) -> None:
    from sae.analysis import curve_plots
    from sae.analysis.sections import save_figure

    neurons = families["neurons"].report
    null = metrics["null"]
    wheel = curve_plots.orientation_wheel(
        families["neurons"].orientations, families["features"].orientations,
        known={n: float(neurons.preferred_orientation[n]) for n in known} or None,
        null_features=families["null_features"].orientations if "null_features" in families else None,
        planted=overlay, verdict=curve_plots.wheel_verdict(metrics["n_curve_features"], null.get("features"),
                                                           metrics.get("planted")))
    section.files.append(save_figure(wheel, out / "curves_orientations.png"))
    for kind in ("neurons", "features"):
        units = _strongest_curves(families[kind].report, n_plot, known if kind == "neurons" else [])
        if units:
            figure = curve_plots.tuning_figure(families[kind].tuning, units, [f"{kind[:-1]} {u}" for u in units])
            section.files.append(save_figure(figure, out / f"curves_tuning_{kind}.png"))


def _strongest_curves(report: CurveReport, n: int, first: list[int]) -> list[int]:
    """Up to n units to plot: `first` (e.g. the known curve neurons), then curve units by peak response."""
    detected = torch.nonzero(report.is_curve).flatten()
    order = detected[report.peak[detected].argsort(descending=True)].tolist()
    return list(dict.fromkeys([*first, *order]))[:n]


def _write_curve_table(reports: dict[str, CurveReport], path: Path) -> str:
    import csv
    import io

    from sae.nn.io import atomic_write_bytes

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["kind", "unit", *CURVE_COLUMNS])
    for kind, report in reports.items():
        columns = [getattr(report, c).tolist() for c in CURVE_COLUMNS]
        for unit, values in enumerate(zip(*columns)):
            writer.writerow([kind[:-1], unit, *[int(v) if isinstance(v, bool) else f"{v:.6g}" for v in values]])
    atomic_write_bytes(path, buffer.getvalue().encode())
    return path.name
