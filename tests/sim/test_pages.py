"""Tests of sim.pages: a run's report as one page, and an index of runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sim import pages


def make_run(folder: Path, *, scenario: str = "crash", ok: tuple[bool, ...] = (True,)) -> Path:
    """A finished run's folder as sim.report leaves it (a plot stands in as bytes)."""
    folder.mkdir(parents=True)
    (folder / "report.md").write_text(
        f"# Scenario `{scenario}` (crash)\n\n3 peers, 20 held-out test images.\n\n"
        "## Results\n\n| rule | accuracy |\n|---|---|\n| robust | 0.9500 |\n"
    )
    targets = [{"target": f"t{i}", "ok": v, "detail": ""} for i, v in enumerate(ok)]
    (folder / "report.json").write_text(json.dumps({"targets": targets}))
    (folder / "timeline.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    return folder


def test_page_has_the_report_and_every_plot(tmp_path: Path) -> None:
    """report.html: the Markdown's headings and tables as HTML, each PNG shown inline,
    and the scenario's name as the title."""
    page = pages.write_page(make_run(tmp_path / "run"))
    assert page == tmp_path / "run" / "report.html"
    text = page.read_text()
    assert "<title>Scenario crash (crash)</title>" in text
    assert "<table>" in text
    assert "<td>0.9500</td>" in text
    assert '<img src="timeline.png" alt="timeline">' in text
    assert "http" not in text.replace("http-equiv", "")  # nothing to fetch from anywhere


def test_raw_html_in_a_report_is_shown_not_run(tmp_path: Path) -> None:
    """A scenario named with markup (it comes from a TOML file) appears as text."""
    page = pages.write_page(make_run(tmp_path / "run", scenario="<script>alert(1)</script>"))
    text = page.read_text()
    assert "<script>" not in text
    assert "&lt;script&gt;" in text


def test_index_links_each_run_with_its_targets(tmp_path: Path) -> None:
    """index.html links every run's page (relative, so the folder can move) and says how
    many targets each met and missed."""
    a = make_run(tmp_path / "runs" / "a", ok=(True, True))
    b = make_run(tmp_path / "runs" / "b", ok=(True, False))
    assert pages.main([str(a), str(b), "--index", str(tmp_path / "runs")]) == 0
    text = (tmp_path / "runs" / "index.html").read_text()
    assert '<a href="a/report.html">a</a>' in text
    assert '<a href="b/report.html">b</a>' in text
    assert "2 met" in text
    assert "1 missed" in text
    assert (b / "report.html").is_file()


def test_a_folder_without_a_report_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A folder that holds no report: exit 1 with one line that says what to pass; the
    other runs still get their pages."""
    good = make_run(tmp_path / "good")
    assert pages.main([str(tmp_path / "nothing"), str(good)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "report.md cannot be read" in err
    assert "pass the folder of a finished run" in err
    assert (good / "report.html").is_file()
