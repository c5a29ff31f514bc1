"""Figures of feature statistics, for loggers without native histograms."""

from __future__ import annotations

import numpy as np
import torch


def density_histogram_figure(freq, bins: int = 40, title: str = "Feature density"):
    """Histogram of log10 firing frequency, dead features as a separate bar.

    freq: (d_sae,) firing frequencies in [0, 1], a tensor or array. Features
    with freq == 0 have no logarithm; they get their own bar left of the
    histogram, labelled with their count (the layout of Anthropic's
    "Towards Monosemanticity" feature-density plots).

    Returns a ``matplotlib.figure.Figure`` drawn on an Agg canvas. It is built
    without pyplot, so no global backend or figure registry is touched and
    nothing needs closing.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    freq = torch.as_tensor(freq).detach().double().cpu().numpy().ravel()
    alive = freq[freq > 0]
    n_dead = int(freq.size - alive.size)
    log_freq = np.log10(alive)
    lo = min(np.floor(log_freq.min()), -1.0) if alive.size else -6.0
    edges = np.linspace(lo, 0.0, bins + 1)
    width = edges[1] - edges[0]
    dead_x = lo - 2 * width

    fig = Figure(figsize=(6, 3.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.hist(log_freq, bins=edges, color="tab:blue", label=f"alive ({alive.size})")
    ax.bar(dead_x, n_dead, width=width, color="tab:red", label=f"dead ({n_dead})")
    ax.annotate(str(n_dead), (dead_x, n_dead), ha="center", va="bottom")
    ax.set_ylim(top=ax.get_ylim()[1] * 1.1)  # room for the count label
    ax.set_xlabel("log10 firing frequency")
    ax.set_ylabel("features")
    ax.set_title(f"{title} (d_sae={freq.size})")
    ax.legend(loc="upper right")
    return fig
