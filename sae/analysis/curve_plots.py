"""Figures for the curve-detector analysis (matplotlib, no pyplot state: safe in scripts and threads)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from .curves import Tuning, orientation_gap

NEURON_COLOUR, FEATURE_COLOUR, KNOWN_COLOUR, NULL_COLOUR = "#1f77b4", "#d62728", "#2ca02c", "#999999"


def _degrees(values) -> np.ndarray:
    """Orientations in [0, 360), NaNs (no preferred orientation) kept, for the caller to drop or skip."""
    return np.remainder(np.asarray(values, dtype=np.float64).ravel(), 360.0)


def wheel_verdict(n_curve_features: int, null: Mapping | None, planted: Mapping | None = None) -> str | None:
    """The wheel's subtitle: how many curve features chance gives (the null's expected count), and whether
    the SAE's count is above it; on a planted network first the recovery of the known curves."""
    lines = []
    if planted:
        lines.append(f"planted: features recover {planted['recovered_by_features_not_by_neurons']} of the "
                     f"{planted['n_not_covered_by_neurons']} curves no pure neuron covers")
    if null:
        state = "above null" if null.get("above_null") else "NOT above null"
        lines.append(f"{n_curve_features} curve features; {null['expected']:.1f} expected by chance: {state}")
    return "\n".join(lines) or None


def orientation_wheel(
    neuron_orientations: Sequence[float],
    feature_orientations: Sequence[float],
    known: Mapping[int, float] | Sequence[float] | None = None,
    title: str | None = None,
    null_features: Sequence[float] | None = None,
    planted: Mapping[str, Sequence[float]] | None = None,
    verdict: str | None = None,
) -> Figure:
    """Preferred orientations (degrees) around the circle: curve neurons on the outer ring, SAE curve
    features on the inner ring, and ``known`` neurons (e.g. mixed3b's 10 curve neurons, as {index:
    orientation} or a list of orientations) marked and labelled. ``null_features``: the orientations of
    the null's passing random directions (grey, innermost ring). ``planted``: {"planted", "neurons",
    "features"} orientations of a planted network's curves, those its pure neurons cover and those the
    SAE recovers (drawn outside the rings). The title gives the largest gap left by neurons alone and by
    neurons plus features; ``verdict`` (a line) goes under it."""
    neurons, features = _degrees(neuron_orientations), _degrees(feature_orientations)
    neurons, features = neurons[~np.isnan(neurons)], features[~np.isnan(features)]
    figure = Figure(figsize=(6, 6.4))
    ax = figure.add_subplot(projection="polar")
    ax.set_theta_zero_location("E")
    ax.set_theta_direction(1)  # counter-clockwise, as the orientation convention
    ax.vlines(np.deg2rad(neurons), 0.8, 1.0, color=NEURON_COLOUR, lw=2, label=f"neurons ({len(neurons)})")
    ax.vlines(np.deg2rad(features), 0.45, 0.7, color=FEATURE_COLOUR, lw=1.2, alpha=0.8,
              label=f"SAE features ({len(features)})")
    if null_features is not None:
        chance = _degrees(null_features)
        chance = chance[~np.isnan(chance)]
        ax.vlines(np.deg2rad(chance), 0.15, 0.35, color=NULL_COLOUR, lw=1.0, alpha=0.8,
                  label=f"null: random directions ({len(chance)})")
    if known is not None:
        _mark_known(ax, known)
    if planted is not None:
        _mark_planted(ax, planted)
    ax.set_ylim(0, 1.45 if planted is not None else 1.3)
    ax.set_yticks([])
    gap_neurons = orientation_gap(neurons)
    gap_both = orientation_gap(np.concatenate([neurons, features]))
    heading = title or f"largest orientation gap: neurons {gap_neurons:.0f}°, neurons + features {gap_both:.0f}°"
    ax.set_title(heading + (f"\n{verdict}" if verdict else ""), fontsize=10)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, -0.28), ncol=2, fontsize=8, frameon=False)
    figure.tight_layout()
    return figure


def _mark_known(ax, known: Mapping[int, float] | Sequence[float]) -> None:
    items = known.items() if isinstance(known, Mapping) else enumerate(known)
    pairs = [(str(k), float(v)) for k, v in items if not np.isnan(float(v))]  # silent units cannot be placed
    labels, angles = zip(*pairs) if pairs else ((), ())
    angles = _degrees(angles)
    ax.scatter(np.deg2rad(angles), np.full(len(angles), 1.08), marker="v", s=40, color=KNOWN_COLOUR,
               label=f"known curve neurons ({len(angles)})", zorder=3)
    if isinstance(known, Mapping):
        for label, angle in zip(labels, angles):
            ax.annotate(label, (np.deg2rad(angle), 1.2), ha="center", va="center", fontsize=7, color=KNOWN_COLOUR)


def _mark_planted(ax, planted: Mapping[str, Sequence[float]]) -> None:
    """Planted truth outside the rings: every planted curve (open circle), covered by a pure neuron (blue
    dot), recovered by an SAE feature (red dot)."""
    for key, radius, style in (("planted", 1.38, dict(facecolors="none", edgecolors="k")),
                               ("neurons", 1.3, dict(color=NEURON_COLOUR)),
                               ("features", 1.22, dict(color=FEATURE_COLOUR))):
        angles = _degrees(planted.get(key, []))
        label = {"planted": "planted curves", "neurons": "planted, pure neuron passes",
                 "features": "planted, recovered by a feature"}[key]
        ax.scatter(np.deg2rad(angles), np.full(len(angles), radius), s=18, label=f"{label} ({len(angles)})",
                   zorder=3, **style)


def tuning_figure(tuning: Tuning, units: Sequence[int], labels: Sequence[str] | None = None, columns: int = 4) -> Figure:
    """Small multiples: for each unit, its response to curves, lines and angles against orientation."""
    units = list(units)
    if not units:
        raise ValueError("tuning_figure needs at least one unit to plot.")
    labels = list(labels) if labels is not None else [f"unit {u}" for u in units]
    if len(labels) != len(units):
        raise ValueError(f"{len(units)} units but {len(labels)} labels.")
    columns = min(columns, len(units))
    rows = -(-len(units) // columns)
    figure = Figure(figsize=(3.2 * columns, 2.4 * rows))
    axes = figure.subplots(rows, columns, squeeze=False, sharex=True)
    theta = tuning.orientations.numpy()
    for ax, unit, label in zip(axes.flat, units, labels):
        for name, values, style in (("curve", tuning.curve, "-"), ("line", tuning.line, "--"), ("angle", tuning.angle, ":")):
            ax.plot(theta, values[unit].numpy(), style, lw=1.4, label=name)
        ax.set_title(label, fontsize=9)
        ax.set_xticks([0, 90, 180, 270, 360])
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(units):]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=7, frameon=False)
    for ax in axes[-1]:
        ax.set_xlabel("orientation (°)", fontsize=8)
    figure.tight_layout()
    return figure
