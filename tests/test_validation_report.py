"""The vendor-facing report as a reader meets it: its files and checksums, its three figures as SVG (they parse as
XML and draw the ROC band, curve and operating point, one calibration error bar per bin shown, one forest-plot
row per subgroup level not suppressed), labels from data escaped, the same results giving the same bytes, and the
page in a real browser (Debian's chromium driven by Playwright) under the portal's Content-Security-Policy:
figures visible, the operating-point view working, nothing fetched.
"""

from __future__ import annotations

import hashlib
import itertools
import re
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from nccid.validation import figures
from nccid.validation.analysis import analyse
from nccid.validation.predictions import parse_predictions
from nccid.validation.report import inline_script_hashes, write_report

SVG = "{http://www.w3.org/2000/svg}"
HOSTILE_SITE = "<script>alert('site')</script>"
LONG_MODEL = "Scanner & Co. " + "very long model name " * 5
REPORT_FILES = {
    "report.html",
    "report.json",
    "figures/roc.json",
    "figures/calibration.json",
    "figures/forest.json",
    "figures/operating_point.json",
    "roc_points.csv",
    "SHA256SUMS",
}


def _results(seed: int = 7, cases: int = 160) -> dict:
    """analyse's results for a synthetic cohort with a signal, a hostile site name, a long scanner model name
    and two levels too small to show (sites 'tiny' and 'tiny2': with two hidden, no other needs hiding)."""
    rng = np.random.default_rng(seed)
    truth = {}
    for i in range(cases):
        site = "tiny" if i < 4 else "tiny2" if i < 8 else (HOSTILE_SITE if i % 2 else "Northfield")
        truth[f"c{i:03d}"] = {"label": int(i % 3 != 0), "sex": "female" if i % 4 < 2 else "male", "site": site,
                              "scanner model": LONG_MODEL if i % 5 else "CR 85-X"}  # fmt: skip
    scores = {c: float(np.clip(rng.normal(0.35 + 0.3 * t["label"], 0.18), 0, 1)) for c, t in truth.items()}
    text = "case,score\n" + "".join(f"{c},{round(s, 3)}\n" for c, s in scores.items())
    return analyse(truth, parse_predictions(text, set(truth)), 0.5)


def _context() -> dict:
    return {
        "run": "20261130T000000-sealed-abc123", "kind": "sealed_run", "kind_title": "Sealed validation run",
        "kind_note": "The held-out cohort.", "submission": "m-1-abc", "model": {"name": "m", "version": "1",
        "vendor": "Vendor & Sons"}, "use": {"task": "covid19", "modalities": ["CR", "DX"], "views": ["PA", "AP"],
        "unit": "patient", "min_age": 18, "max_age": None, "window_days": 30, "threshold": 0.5,
        "population": "adults"}, "task_text": "COVID-19 positive vs negative",
        "sandbox": {"status": "completed", "exit_code": 0, "seconds": 1.0}, "sandbox_text": "completed in 1.0 s",
        "excluded": {}, "model_hash": "a" * 64, "cohort_hash": "b" * 64, "truth_hash": "c" * 64,
        "code_version": "nccid 0.1.0", "started": "2026-11-30T00:00:00+00:00",
        "finished": "2026-11-30T00:00:02+00:00", "times": {"model run": 1.0}, "limits": {"memory_mb": 2048,
        "processes": 64, "wall_seconds": 600.0, "output_mb": 64}, "logs": None,
    }  # fmt: skip


@pytest.fixture(scope="module")
def results() -> dict:
    return _results()


@pytest.fixture(scope="module")
def report(results, tmp_path_factory):
    folder = tmp_path_factory.mktemp("report") / "report"
    write_report(folder, results, _context())
    return folder


def _svgs(html: str) -> dict[str, ET.Element]:
    """The page's inline SVG figures, parsed as XML, by their data-figure name."""
    parsed = [ET.fromstring(text) for text in re.findall(r"<svg\b.*?</svg>", html, flags=re.DOTALL)]
    return {svg.get("data-figure"): svg for svg in parsed}


def _points(text: str) -> list[tuple[float, float]]:
    return [tuple(float(v) for v in pair.split(",")) for pair in text.split()]


def test_report_files_are_the_contracts_and_checksummed(report):
    files = {str(p.relative_to(report)) for p in report.rglob("*") if p.is_file()}
    assert files == REPORT_FILES
    sums = dict(reversed(line.split("  ")) for line in (report / "SHA256SUMS").read_text().splitlines())
    assert set(sums) == REPORT_FILES - {"SHA256SUMS"}
    for name, digest in sums.items():
        assert hashlib.sha256((report / name).read_bytes()).hexdigest() == digest


def test_the_same_results_give_the_same_bytes(results, report, tmp_path):
    write_report(tmp_path / "again", results, _context())
    for name in REPORT_FILES:
        assert (tmp_path / "again" / name).read_bytes() == (report / name).read_bytes(), name


def test_roc_figure_draws_the_band_curve_and_operating_point(results, report):
    svg = _svgs((report / "report.html").read_text())["roc"]
    auc = results["overall"]["auc"]
    title = f"ROC, AUC {auc['value']:.3f} ({auc['low']:.3f}-{auc['high']:.3f})"
    assert svg.find(f"{SVG}title").text == title and title in [t.text for t in svg.iter(f"{SVG}text")]
    band = _points(svg.find(f".//{SVG}polygon[@class='band']").get("points"))
    assert len(band) == 2 * len(results["roc"]["band"]["fpr"])  # the upper edge out, the lower edge back
    curve = _points(svg.find(f".//{SVG}polyline[@class='roc']").get("points"))
    assert len(curve) == len(results["roc"]["points"])
    frame = svg.find(f"{SVG}rect[@class='frame']")
    left, top = float(frame.get("x")), float(frame.get("y"))
    right, bottom = left + float(frame.get("width")), top + float(frame.get("height"))
    assert curve[0] == (left, bottom) and curve[-1] == (right, top)  # from (0, 0) to (1, 1)
    assert all(x1 <= x2 and y1 >= y2 for (x1, y1), (x2, y2) in itertools.pairwise(curve))  # never turns back
    point = svg.find(f".//{SVG}circle[@class='operating-point']")
    op = results["operating_point"]
    fpr, tpr = 1 - op["specificity"]["value"], op["sensitivity"]["value"]
    assert float(point.get("cx")) == pytest.approx(left + fpr * (right - left), abs=0.06)
    assert float(point.get("cy")) == pytest.approx(bottom - tpr * (bottom - top), abs=0.06)
    legend = [t.text for t in svg.find(f"{SVG}g[@class='legend']").iter(f"{SVG}text")]
    assert legend == ["95% band", "ROC", "threshold 0.5"]


def test_calibration_figure_has_one_error_bar_per_bin_and_the_brier_score(results, report):
    svg = _svgs((report / "report.html").read_text())["calibration"]
    cal = results["calibration"]
    assert cal["bins"] and svg.find(f"{SVG}title").text == f"Calibration, Brier score {cal['brier']}"
    bars = svg.findall(f"{SVG}g[@class='error-bar']")
    assert len(bars) == len(cal["bins"])
    for bar, row in zip(bars, cal["bins"], strict=True):
        whisker = bar.find(f"{SVG}line")
        low, high = float(whisker.get("y1")), float(whisker.get("y2"))
        assert low >= float(bar.find(f"{SVG}circle").get("cy")) >= high  # the dot within its Wilson interval
        assert f"observed {row['observed']} ({row['observed_ci']['low']}-{row['observed_ci']['high']})" in (
            bar.find(f"{SVG}title").text
        )


def test_forest_plot_shows_every_level_not_suppressed_with_escaped_labels(results, report):
    html = (report / "report.html").read_text()
    svg = _svgs(html)["forest"]
    shown = [(t["attribute"], level["level"]) for t in results["subgroups"] + results["robustness"]
             for level in t["levels"] if not level["suppressed"]]  # fmt: skip
    assert ("site", "tiny") not in shown and len(shown) >= 5
    rows = svg.findall(f"{SVG}g[@class='forest-row']")
    assert [r.find(f"{SVG}title").text.split(" (")[0] for r in rows] == [f"{a}: {lv}" for a, lv in shown]
    assert all(len(r.findall(f"{SVG}line")) == 1 and r.find(f"{SVG}circle") is not None for r in rows)
    labels = [r.find(f"{SVG}text").text for r in rows]
    assert f"site: {HOSTILE_SITE} (AUC)" in labels  # drawn as the text it is
    long = next(label for label in labels if label.startswith("scanner model: Scanner & Co."))
    assert long.endswith("\u2026") and len(long) == figures.LABEL_CHARACTERS
    overall = svg.find(f"{SVG}line[@class='overall']")
    assert overall.find(f"{SVG}title").text == f"overall AUC {results['overall']['auc']['value']:.3f}"
    # the hostile site name is escaped everywhere on the page: the page's scripts are its own two
    assert HOSTILE_SITE not in html and html.count("<script") == 2 and len(inline_script_hashes(html)) == 2
    assert "&lt;script&gt;alert(&#39;site&#39;)&lt;/script&gt;" in html


def test_a_level_of_negatives_only_shows_its_specificity_in_the_forest_plot():
    truth = {f"c{i:03d}": {"label": int(i % 3 != 0), "site": "Northfield"} for i in range(60)}
    truth |= {f"n{i:03d}": {"label": 0, "site": "Riverside"} for i in range(12)}  # a site that sent negatives only
    scores = "".join(f"{c},{0.8 if t['label'] else 0.3}\n" for c, t in truth.items())
    results = analyse(truth, parse_predictions("case,score\n" + scores, set(truth)), 0.5)
    rows = {(r["attribute"], r["level"]): r for r in figures.forest_rows(results)}
    assert rows[("site", "Riverside")]["metric"] == "specificity" and rows[("site", "Riverside")]["value"] == 1.0
    assert rows[("site", "Northfield")]["metric"] == "auc"
    _data, svg = figures.forest_figure(results)
    labels = [t.text for t in ET.fromstring(svg).iter(f"{SVG}text")]
    assert "site: Riverside (spec.)" in labels and "specificity (no AUC)" in labels


def test_figures_still_draw_when_every_cell_is_suppressed(tmp_path):
    rng = np.random.default_rng(2)
    truth = {f"c{i}": {"label": i % 2, "site": "Northfield"} for i in range(40)}
    text = "case,score\n" + "".join(f"c{i},{rng.random() * 0.5 + 0.4 * (i % 2):.3f}\n" for i in range(40))
    results = analyse(truth, parse_predictions(text, set(truth)), 0.5, min_cell=50)  # every cell under 50
    assert results["calibration"]["bins"] == [] and figures.forest_rows(results) == []
    write_report(tmp_path / "r", results, _context())
    svgs = _svgs((tmp_path / "r" / "report.html").read_text())
    assert svgs["calibration"].findall(f"{SVG}g[@class='error-bar']") == []
    assert svgs["forest"].findall(f"{SVG}g[@class='forest-row']") == []
    assert svgs["roc"].find(f".//{SVG}polygon[@class='band']") is not None


def test_a_report_without_metrics_has_no_figures(tmp_path):
    truth = {f"c{i}": {"label": 1} for i in range(12)}
    results = analyse(truth, parse_predictions("case,score\n", set(truth)), 0.5)
    write_report(tmp_path / "r", results, _context())
    files = {str(p.relative_to(tmp_path / "r")) for p in (tmp_path / "r").rglob("*") if p.is_file()}
    assert files == {"report.html", "report.json", "SHA256SUMS"}
    html = (tmp_path / "r" / "report.html").read_text()
    assert "<svg" not in html and "no metrics" in html


def test_report_page_in_a_browser_under_its_content_security_policy(report, results):
    """The page as the portal serves it (scripts allowed by their hashes only): every figure has a visible
    size, the operating-point view shows the report's counts and follows the threshold, nothing is fetched
    and nothing is refused."""
    from playwright.sync_api import sync_playwright

    html = (report / "report.html").read_text()
    policy = (
        f"default-src 'none'; script-src {' '.join(inline_script_hashes(html))}; style-src 'unsafe-inline'; "
        "img-src data:; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
    )
    url = "http://report.invalid/report.html"
    point = results["operating_point"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium")
        try:
            page = browser.new_page()
            requests, problems = [], []
            page.on("request", lambda r: requests.append(r.url))
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.route(url, lambda route: route.fulfill(
                status=200, body=html, headers={"Content-Type": "text/html; charset=utf-8",
                                                "Content-Security-Policy": policy}))  # fmt: skip
            page.goto(url)
            boxes = {svg.get_attribute("data-figure"): svg.bounding_box() for svg in page.locator("svg").all()}
            assert set(boxes) == {"roc", "calibration", "forest"}
            assert all(box and box["width"] > 300 and box["height"] > 200 for box in boxes.values()), boxes
            assert page.locator("svg[data-figure=forest] g.forest-row text").first.is_visible()
            band = page.locator("svg[data-figure=roc] polygon.band").bounding_box()
            assert band and band["width"] > 100 and band["height"] > 10
            cells = {k: page.text_content(f"#op-{k}") for k in ("tp", "fn", "tn", "fp")}
            assert cells == {k: str(point[k]) for k in ("tp", "fn", "tn", "fp")}
            page.fill("#op-t", "0")  # everyone called positive
            page.dispatch_event("#op-t", "input")
            assert page.text_content("#op-tv") == "0.00" and page.text_content("#op-fn") == "0"
            assert page.text_content("#op-tn") == "0" and page.text_content("#op-se") == "1.000"
        finally:
            browser.close()
    assert requests == [url] and problems == []
