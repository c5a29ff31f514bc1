"""The feature browser's index and per-unit pages as headless Chromium shows them, opened from disk: search by
id, sort, filter, paging, and a unit's page with its neighbours. Skips where Chromium is not installed."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from sae.analysis.browser import Browsed, write_pages
from sae.analysis.sections import Section

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
N_FEATURES, N_NEURONS = 120, 8
VISUALIZED = [10, 50, 90]


def dump_dom(page: Path, tmp_path: Path, fragment: str = "") -> str:
    if CHROMIUM is None:
        pytest.skip("headless Chromium is not installed (Debian: apt-get install chromium)")
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom",
         page.resolve().as_uri() + fragment],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def shown_ids(dom: str) -> list[int]:
    return [int(i) for i in re.findall(r'<tr data-id="(\d+)"', dom)]


@pytest.fixture(scope="module")
def browser(tmp_path_factory) -> Path:
    """A browser of 120 features (feature i has density (i + 1) / 1000, every third a curve detector; feature 7
    is dead) and 8 neurons, laid out as an evaluation writes it."""
    out = tmp_path_factory.mktemp("eval")
    density = (np.arange(N_FEATURES) + 1) / 1000
    density[7] = 0.0
    curves = np.arange(N_FEATURES) % 3 == 0
    sections = {
        "reconstruction": Section({"l0": 12.0}, units={"features": {"density": density},
                                                        "neurons": {"density": np.full(N_NEURONS, 0.5)}}),
        "curves": Section({}, units={"features": {"tuning": np.random.default_rng(0).random((N_FEATURES, 16)),
                                                  "is_curve": curves, "preferred_orientation": np.full(N_FEATURES, 90.0),
                                                  "peak_sharpness": np.ones(N_FEATURES),
                                                  "curve_vs_line": np.ones(N_FEATURES)}}),
    }
    alive = [i for i in range(N_FEATURES) if density[i] > 0]
    browsed = {
        "features": Browsed(alive, files={u: {"viz": f"f{u}_viz.png"} for u in VISUALIZED}, extras={u: {"nearest": [(u + 1) % N_FEATURES, (u + 2) % N_FEATURES],
                                               "loads": [3, 5]} for u in alive}),
        "neurons": Browsed(list(range(N_NEURONS)), extras={n: {"nearest": [n, n + 10]} for n in range(N_NEURONS)}),
    }
    for kind in browsed.values():  # (unit, value) pairs, as browse() leaves them
        for extra in kind.extras.values():
            extra["nearest"] = [(u, 0.5) for u in extra["nearest"]]
            if "loads" in extra:
                extra["loads"] = [(u, -0.25) for u in extra["loads"]]
    write_pages(out, "SAE relu on mixed3b", {"reconstruction": {"l0": 12.0}}, sections, browsed, ["RANDOM weights"])
    return out


def test_index__opens_on_the_visualized_units_and_pages_the_rest(browser: Path, tmp_path: Path):
    dom = dump_dom(browser / "index.html", tmp_path)
    assert shown_ids(dom) == VISUALIZED[::-1], "first view: the units with a visualization, densest first"
    assert f"3 of {N_FEATURES} shown" in dom and "RANDOM weights" in dom and 'src="features/f90_viz.png"' in dom
    dom = dump_dom(browser / "index.html", tmp_path, "#sort=density:desc")
    assert shown_ids(dom) == list(range(N_FEATURES - 1, N_FEATURES - 51, -1)), "the 50 densest, one page"
    assert f"of {N_FEATURES} shown, page 1 of 3" in dom


def test_index__searches_by_id_list_and_range(browser: Path, tmp_path: Path):
    assert shown_ids(dump_dom(browser / "index.html", tmp_path, "#q=5")) == [5]
    dom = dump_dom(browser / "index.html", tmp_path, "#q=3,40-42&sort=id:asc")
    assert shown_ids(dom) == [3, 40, 41, 42]


def test_index__sorts_filters_and_pages_from_the_url(browser: Path, tmp_path: Path):
    dom = dump_dom(browser / "index.html", tmp_path, "#sort=density:asc&filter.density=%3E0")
    assert shown_ids(dom)[:3] == [0, 1, 2] and 7 not in shown_ids(dom), "a dead feature fails >0"
    dom = dump_dom(browser / "index.html", tmp_path, "#sort=id:asc&filter.is_curve=yes&filter.density=0.01..0.05")
    assert shown_ids(dom) == [i for i in range(N_FEATURES) if i % 3 == 0 and 0.01 <= (i + 1) / 1000 <= 0.05]
    dom = dump_dom(browser / "index.html", tmp_path, "#sort=id:asc&page=3")
    assert shown_ids(dom) == list(range(100, N_FEATURES))


def test_unit_page__links_its_neighbours_and_neurons_and_back(browser: Path, tmp_path: Path):
    page = browser / "features" / "f5.html"
    dom = dump_dom(page, tmp_path)
    assert "feature 5" in dom and 'href="f6.html"' in dom and 'href="../neurons/n3.html"' in dom
    assert 'href="../index.html"' in dom and "RANDOM weights" in dom
    assert not (browser / "features" / "f7.html").exists(), "no page for a dead feature"
    neuron = dump_dom(browser / "neurons" / "n2.html", tmp_path)
    assert 'href="../features/f12.html"' in neuron and "neuron 2" in neuron
    index = dump_dom(browser / "neurons.html", tmp_path)
    assert shown_ids(index) == list(range(N_NEURONS)) or sorted(shown_ids(index)) == list(range(N_NEURONS))


def test_archive_previous__moves_an_earlier_evaluation_aside_instead_of_replacing_it(tmp_path: Path):
    import json

    from sae.analysis.provenance import archive_previous

    out = tmp_path / "eval"
    assert archive_previous(out) is None, "nothing to keep yet"
    (out / "features").mkdir(parents=True)
    (out / "metrics.json").write_text("{}")
    (out / "features" / "f1.html").write_text("old")
    (out / "evaluation.json").write_text(json.dumps({"time": "2026-11-30T10:00:00"}))
    kept = archive_previous(out)
    assert kept == out / "previous" / "2026-11-30T10-00-00"
    assert (kept / "features" / "f1.html").read_text() == "old" and (kept / "metrics.json").is_file()
    assert sorted(p.name for p in out.iterdir()) == ["previous"]
    (out / "metrics.json").write_text("{}")
    (out / "evaluation.json").write_text(json.dumps({"time": "2026-11-30T10:00:00"}))  # same second: both kept
    assert archive_previous(out).name == "2026-11-30T10-00-00+"
