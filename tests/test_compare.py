"""Comparing evaluated runs: `evaluate.py -m run=A,B` writes the comparison in the sweep folder whatever its
${now:} gives later, fails loudly when it cannot, and the table shows what was swept and links each browser."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


from sae.analysis.compare import comparison_rows, write_comparison
from tests.helpers import REPO
from tests.helpers import make_run

FAST = ["eval=fast", "logger=none", "eval.sections=[reconstruction]"]


def evaluate(args: list[str], tmp: Path):
    env = {**os.environ, "WANDB_MODE": "offline"}
    return subprocess.run([sys.executable, "evaluate.py", *args, f"hydra.run.dir={tmp}/hydra"], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=env)


def with_overrides(run: Path, *overrides: str) -> Path:
    (run / ".hydra").mkdir(parents=True, exist_ok=True)
    (run / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    return run


def test_evaluate_multirun__compares_in_the_sweep_folder_even_when_its_name_has_the_time(tmp_path: Path, images: Path):
    runs = [with_overrides(make_run(tmp_path / name, images, seed=i), f"sae.l1_coefficient={c}", "layer=mixed3a")
            for i, (name, c) in enumerate((("a", 1), ("b", 3)))]
    # Microseconds: a folder name read again when a job ends would differ, as a ${now:%H-%M-%S} one does
    # whenever a job takes more than a second.
    sweep = tmp_path / "multi" / "${now:%H-%M-%S-%f}"
    result = evaluate(["-m", f"run={runs[0]},{runs[1]}", *FAST, f"hydra.sweep.dir={sweep}"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (folder,) = (tmp_path / "multi").iterdir()
    page = (folder / "compare" / "compare.html").read_text()
    assert "sae.l1_coefficient" in page and "layer" not in (folder / "compare" / "compare.csv").read_text().split(",")[1]
    assert 'href="../../../a/eval/index.html"' in page or "a/eval/index.html" in page


def test_evaluate_multirun__fails_loudly_when_fewer_than_two_runs_could_be_evaluated(tmp_path: Path, images: Path):
    good = make_run(tmp_path / "good", images)
    result = evaluate(["-m", f"run={good},{tmp_path / 'missing'}", *FAST, f"hydra.sweep.dir={tmp_path}/multi"],
                      tmp_path)
    assert result.returncode != 0
    assert not (tmp_path / "multi" / "compare").exists()


def test_comparison__has_a_column_per_swept_value_and_labels_points_by_them(tmp_path: Path):
    import json

    runs = []
    for name, k in (("x", 16), ("y", 64)):
        run = with_overrides(tmp_path / name, f"sae.k={k}", "sae=topk")
        (run / "eval").mkdir(parents=True)
        (run / "eval" / "metrics.json").write_text(json.dumps(
            {"run": {"layer": "mixed3b"}, "reconstruction": {"l0": k, "explained_variance": k / 100}}))
        runs.append(run)
    rows = comparison_rows(runs)
    assert [r["sae.k"] for r in rows] == ["16", "64"] and "sae" not in rows[0], "only what differs"
    write_comparison(runs, tmp_path / "compare")
    header = (tmp_path / "compare" / "compare.csv").read_text().splitlines()[0]
    assert header.startswith("run,sae.k,")
    page = (tmp_path / "compare" / "compare.html").read_text()
    assert '<a href="../x/eval/index.html">' in page
