"""Compare evaluated runs (a sweep): one row per run, the sparsity–fidelity frontier, written as
compare.csv, compare.json, compare.png and a sortable compare.html.

The frontier is the set of runs no other run beats on both L0 (lower is better) and explained variance
(higher is better); spliced-in KL colours the points, since two SAEs with equal MSE can differ a lot in how
much of the network's behaviour they keep.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig

from sae.analysis.report import Column, relative, render_page, write_page
from sae.errors import UserError
from sae.nn.io import atomic_write_bytes

# (column key, where in metrics.json, label)
FIELDS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("layer", ("run", "layer"), "layer"),
    ("architecture", ("run", "architecture"), "arch"),
    ("d_sae", ("run", "d_sae"), "d_sae"),
    ("l0", ("reconstruction", "l0"), "L0"),
    ("explained_variance", ("reconstruction", "explained_variance"), "EV"),
    ("fvu", ("reconstruction", "fvu"), "FVU"),
    ("dead_fraction", ("reconstruction", "dead_fraction"), "dead"),
    ("kl_sae", ("fidelity", "kl_sae"), "spliced KL"),
    ("top1_sae", ("fidelity", "top1_sae"), "top-1 agree"),
    ("recovered_mean", ("fidelity", "recovered_mean"), "KL recovered (mean abl.)"),
    ("n_curve_features", ("curves", "n_curve_features"), "curve features"),
    ("ii_features_lpips", ("interpretability", "lpips", "features", "median"), "II lpips (median)"),
    ("ii_features_pixel", ("interpretability", "pixel", "features", "median"), "II pixel (median)"),
)
TEXT_FIELDS = ("run", "layer", "architecture")
IGNORED_OVERRIDES = ("ckpt_path", "logger", "callbacks", "debug", "trainer.devices", "trainer.num_nodes")


class NotEvaluatedError(UserError, FileNotFoundError):
    """A run to compare has no eval/metrics.json."""


def _get(metrics: dict, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(metrics, dict) or key not in metrics:
            return None
        metrics = metrics[key]
    return metrics


def swept_values(run_dirs: Sequence[str | os.PathLike]) -> list[dict[str, str]]:
    """Per run, the hyperparameters that differ between the runs: the keys of each run's Hydra overrides
    (`.hydra/overrides.yaml`, e.g. sae.l1_coefficient=3) whose values are not the same in every run."""
    import yaml

    per_run = []
    for run in run_dirs:
        path = Path(run) / ".hydra" / "overrides.yaml"
        items = yaml.safe_load(path.read_text()) if path.is_file() else []
        values = {}
        for item in items or []:
            key, _, value = str(item).lstrip("+~").partition("=")
            if not key.startswith("hydra") and key not in IGNORED_OVERRIDES:
                values[key] = value
        per_run.append(values)
    keys = sorted({k for values in per_run for k in values})
    varying = [k for k in keys if len({values.get(k) for values in per_run}) > 1]
    return [{k: values.get(k, "") for k in varying} for values in per_run]


def comparison_rows(run_dirs: Sequence[str | os.PathLike]) -> list[dict[str, Any]]:
    """One row per run from its eval/metrics.json (and its swept values); raises a clear error for a run
    never evaluated."""
    rows = []
    swept = swept_values(run_dirs) if len(run_dirs) > 1 else [{} for _ in run_dirs]
    for run in run_dirs:
        path = Path(run) / "eval" / "metrics.json"
        if not path.is_file():
            raise NotEvaluatedError(f"{path} is missing: evaluate the run first (python evaluate.py run={run}), "
                                    "or use runs=[...] to evaluate and compare in one go.")
        metrics = json.loads(path.read_text())
        row = {"run": str(run), **swept[len(rows)]}
        row.update({key: _get(metrics, where) for key, where, _ in FIELDS})
        rows.append(row)
    return rows


def pareto_front(rows: Sequence[dict[str, Any]]) -> list[int]:
    """Indices of rows not dominated in (lower l0, higher explained_variance), sorted by l0."""
    points = [(i, r["l0"], r["explained_variance"]) for i, r in enumerate(rows)
              if _finite(r.get("l0")) and _finite(r.get("explained_variance"))]
    front = [i for i, l0, ev in points
             if not any(l0b <= l0 and evb >= ev and (l0b, evb) != (l0, ev) for _, l0b, evb in points)]
    return sorted(front, key=lambda i: rows[i]["l0"])


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def frontier_figure(rows: Sequence[dict[str, Any]]):
    """L0 vs explained variance (colour: spliced-in KL), and L0 vs spliced-in KL; frontier joined by a line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4))
    FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2)
    ok = [r for r in rows if _finite(r.get("l0")) and _finite(r.get("explained_variance"))]
    kl = [r["kl_sae"] if _finite(r.get("kl_sae")) else float("nan") for r in ok]
    points = left.scatter([r["l0"] for r in ok], [r["explained_variance"] for r in ok], c=kl, cmap="viridis_r")
    if any(math.isfinite(v) for v in kl):
        figure.colorbar(points, ax=left, label="spliced-in KL (nats)")
    front = [rows[i] for i in pareto_front(rows)]
    left.plot([r["l0"] for r in front], [r["explained_variance"] for r in front], "k--", lw=1, label="frontier")
    for r in ok:
        left.annotate(r.get("label") or Path(r["run"]).name, (r["l0"], r["explained_variance"]), fontsize=7, xytext=(3, 3),
                      textcoords="offset points")
    left.set(xlabel="L0 (features active per position)", ylabel="explained variance", title="sparsity vs reconstruction")
    left.legend(fontsize=8)
    with_kl = [r for r in ok if _finite(r.get("kl_sae"))]
    right.scatter([r["l0"] for r in with_kl], [r["kl_sae"] for r in with_kl])
    right.set(xlabel="L0", ylabel="spliced-in KL (nats, lower is better)", title="sparsity vs fidelity")
    l0 = [r["l0"] for r in ok if r["l0"] > 0]
    if l0 and max(l0) / min(l0) > 10:  # a sweep over decades of sparsity reads best on a log axis
        left.set_xscale("log")
        right.set_xscale("log")
    figure.tight_layout()
    return figure


def write_comparison(run_dirs: Sequence[str | os.PathLike], out: str | os.PathLike) -> list[dict[str, Any]]:
    """Write compare.csv/.json/.png/.html for already evaluated runs into `out`; returns the rows."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = comparison_rows(run_dirs)
    front = set(pareto_front(rows))
    for i, row in enumerate(rows):
        row["on_frontier"] = "yes" if i in front else "no"
    known = {"run", "on_frontier", *(key for key, _, _ in FIELDS)}
    swept = [key for key in rows[0] if key not in known] if rows else []
    keys = ["run", *swept, *[key for key, _, _ in FIELDS], "on_frontier"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(out / "compare.csv", buffer.getvalue().encode())
    atomic_write_bytes(out / "compare.json", json.dumps(rows, indent=2).encode())
    buffer = io.BytesIO()
    frontier_figure(rows).savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(out / "compare.png", buffer.getvalue())
    columns = [Column("run", "run", kind="text"), Column("link", "browser", kind="link")]
    columns += [Column(key, key, kind="text", title="swept: differs between the runs") for key in swept]
    columns += [Column(key, label, kind="text" if key in TEXT_FIELDS else "number") for key, _, label in FIELDS]
    columns.append(Column("on_frontier", "frontier", kind="text"))
    page_rows = [{**row, "link": relative(Path(row["run"]) / "eval" / "index.html", out)} for row in rows]
    for row in rows:  # the frontier plot names each point by its swept values when there are any
        row["label"] = ",".join(f"{k.split('.')[-1]}={row[k]}" for k in swept) or Path(row["run"]).name
    write_page(out / "compare.html", render_page(f"Comparison of {len(rows)} runs", columns, page_rows,
                                                 figures=["compare.png"], sort="l0:asc"))
    return rows


class CompareSweep(HydraCallback):
    """`python evaluate.py -m run=A,B,...`: after the multirun, compare the runs its jobs evaluated.

    Each finished job appends its run directory to `<sweep dir>/evaluated_runs.txt` (a file, not memory, so
    that it also works when a launcher runs the jobs in other processes or on other machines); at the end of
    the multirun the comparison goes to `compare_out` or `<sweep dir>/compare`.
    """

    LIST = "evaluated_runs.txt"

    def __init__(self) -> None:
        self.sweep_dirs: list[Path] = []  # where this process's jobs recorded themselves
        self.jobs = 0

    @staticmethod
    def job_sweep_dir(hydra_cfg: Any) -> Path:
        """The sweep folder the job really ran in: its output dir less the subdir. (Not hydra.sweep.dir: read
        again after the job, its ${now:} gives another time, hence another folder.)"""
        output = Path(str(hydra_cfg.hydra.runtime.output_dir))
        depth = len(Path(str(hydra_cfg.hydra.sweep.subdir)).parts)
        return output.parents[depth - 1] if depth else output

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        from hydra.core.utils import JobStatus

        hydra_cfg = getattr(job_return, "hydra_cfg", None)
        if hydra_cfg is None or "MULTIRUN" not in str(hydra_cfg.hydra.get("mode")) or not config.get("run"):
            return
        self.jobs += 1
        if job_return.status != JobStatus.COMPLETED:
            return
        sweep_dir = self.job_sweep_dir(hydra_cfg)
        if sweep_dir not in self.sweep_dirs:
            self.sweep_dirs.append(sweep_dir)
        with open(sweep_dir / self.LIST, "a") as f:  # one short line per job: appends do not interleave
            f.write(f"{Path(str(config.run)).resolve()}\n")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dirs = self.sweep_dirs or [Path(config.hydra.sweep.dir)]
        runs: list[str] = []
        for sweep_dir in sweep_dirs:
            listed = sweep_dir / self.LIST
            runs += listed.read_text().split() if listed.is_file() else []
        runs = list(dict.fromkeys(runs))
        jobs = max(self.jobs, sum(1 for d in sweep_dirs[0].glob("*/.hydra") if d.is_dir()))
        if len(runs) < 2:
            if jobs >= 2:  # a sweep over runs that cannot be compared must not end as if it had been
                raise RuntimeError(f"the sweep ran {jobs} evaluation jobs but only {len(runs)} finished "
                                   f"({sweep_dirs[0]}/{self.LIST}); no comparison was written. Compare the "
                                   "evaluated runs with python evaluate.py compare='[RUN_A,RUN_B]'.")
            return
        out = Path(config.get("compare_out") or sweep_dirs[0] / "compare")
        write_comparison(runs, out)
        logging.getLogger("sae").info("compared %d runs: %s", len(runs), out / "compare.html")
