"""The static feature browser: the HTML it writes, and how it renders, sorts and filters in headless Chromium."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from sae.analysis.report import Column, format_number, render_page, sparkline_svg, write_page

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
COLUMNS = [
    Column("index", "feature"),
    Column("density", "density"),
    Column("kind", "kind", kind="text"),
    Column("tuning", "tuning", kind="svg"),
    Column("viz", "viz", kind="image"),
]
ROWS = [
    {"index": 0, "density": 0.5, "kind": "curve", "tuning": sparkline_svg([0, 1, 0]), "viz": "features/0.png"},
    {"index": 1, "density": 0.001, "kind": "edge", "tuning": sparkline_svg([1, 1, 2])},
    {"index": 2, "density": 0.02, "kind": "curve", "tuning": ""},
    {"index": 3, "density": float("nan"), "kind": "dead"},
]


def dump_dom(page: Path, tmp_path: Path, fragment: str = "") -> str:
    """The DOM after scripts ran, as headless Chromium sees the page opened from disk."""
    if CHROMIUM is None:
        pytest.skip("headless Chromium is not installed (Debian: apt-get install chromium)")
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'chromium-profile'}", "--dump-dom", page.resolve().as_uri() + fragment],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def visible_indices(dom: str) -> list[int]:
    """The first cell of every visible body row, in document order."""
    body = dom.split('class="units"', 1)[1].split("<tbody>", 1)[1].split("</tbody>", 1)[0]
    rows = re.findall(r"<tr( hidden=\"\")?>\s*<td data-value=\"([^\"]+)\"", body)
    return [int(float(value)) for hidden, value in rows if not hidden]


@pytest.fixture
def page(tmp_path: Path) -> Path:
    html = render_page("Features of test", COLUMNS, ROWS, summary={"reconstruction": {"l0": 12.5, "fvu": 0.25}},
                       links=[("neurons", "neurons.html")], warnings=["RANDOM weights"])
    return write_page(tmp_path / "index.html", html)


def test_render_page__writes_one_row_per_unit_with_summary_and_relative_images(page: Path):
    text = page.read_text()
    assert visible_indices(text) == [0, 1, 2, 3], "rows are in the HTML itself, not built by script"
    assert "reconstruction" in text and "12.5" in text and "RANDOM weights" in text
    assert 'src="features/0.png"' in text
    assert "<script>" in text and "http" not in text.split("<body>")[1].split("<script>")[0], "no network fetches"


def test_format_number__is_short_and_marks_missing_values():
    assert format_number(0.123456789) == "0.1235"
    assert format_number(float("nan")) == "–"
    assert format_number(True) == "yes"
    assert format_number(42) == "42"


def test_sparkline__draws_one_point_per_value_and_nothing_for_bad_input():
    svg = sparkline_svg(list(range(64)), marker=10)
    assert svg.startswith("<svg") and svg.count(",") == 64 + 0 and "<line" in svg
    assert sparkline_svg([]) == "" and sparkline_svg([float("nan")]) == ""


def test_browser__renders_the_table_in_headless_chromium(page: Path, tmp_path: Path):
    dom = dump_dom(page, tmp_path)
    assert visible_indices(dom) == [0, 1, 2, 3]
    assert "4 of 4 shown" in dom


def test_browser__sorts_by_a_column_from_the_url_hash(page: Path, tmp_path: Path):
    assert visible_indices(dump_dom(page, tmp_path, "#sort=density:desc")) == [0, 2, 1, 3], "NaN sorts last"
    assert visible_indices(dump_dom(page, tmp_path, "#sort=density:asc")) == [1, 2, 0, 3]
    assert visible_indices(dump_dom(page, tmp_path, "#sort=kind:asc"))[:1] == [0]


def test_browser__filters_by_number_and_text(page: Path, tmp_path: Path):
    dom = dump_dom(page, tmp_path, "#filter.density=>0.01&filter.kind=curve")
    assert visible_indices(dom) == [0, 2]
    assert "2 of 4 shown" in dom
    assert visible_indices(dump_dom(page, tmp_path, "#filter.density=0.001..0.02")) == [1, 2]
