"""The report's three figures, drawn as inline SVG by small pure functions and Jinja2 templates: the ROC curve
with its 95 % band, the operating point and the AUC; calibration with Wilson error bars and the Brier score; a
forest plot of every subgroup and robustness level not suppressed, with its 95 % CI, against the overall AUC.

Why not a plotting library: the figures are a few lines, dots and bars on the unit square, with ticks at fixed
steps; laying out text and ticks through matplotlib cost ten times more than the rest of a report, and its
output carried per-process ids and fonts to pin down. Here the same results give the same bytes, every label
(subgroup levels come from data: site names, scanner models) is escaped by Jinja2's autoescape, and nothing is
fetched: the text is drawn in the page's own fonts. Each function returns (the figure's data, for its JSON
file; the SVG text).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import jinja2

BLUE, ORANGE, GREEN, RED, GREY = "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#808080"
TICKS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
#: forest-plot labels longer than this are cut (with an ellipsis) in the drawing; the row's tooltip holds all of it
LABEL_CHARACTERS = 60


def _px(value: float) -> str:
    """A pixel coordinate as SVG text: one decimal place, so the same value always gives the same text."""
    return f"{value:.1f}"


@dataclass(frozen=True)
class Plot:
    """Where the unit square of the data lands in a figure: the plot area's left, top, width and height in px."""

    left: float
    top: float
    width: float
    height: float

    @property
    def right(self) -> float:
        return self.left + self.width

    @property
    def bottom(self) -> float:
        return self.top + self.height

    def x(self, value: float) -> str:
        """The SVG x of data value `value` (0 at the left edge, 1 at the right)."""
        return _px(self.left + value * self.width)

    def y(self, value: float) -> str:
        """The SVG y of data value `value` (0 at the bottom edge, 1 at the top)."""
        return _px(self.top + (1 - value) * self.height)

    def points(self, pairs: Iterable[tuple[float, float]]) -> str:
        """An SVG `points` list of the (x, y) data pairs."""
        return " ".join(f"{self.x(a)},{self.y(b)}" for a, b in pairs)


#: the plot area of the ROC and calibration figures (500 x 440 px)
SQUARE = Plot(left=58, top=34, width=420, height=330)


@dataclass(frozen=True)
class LegendEntry:
    """One entry of a legend: its mark ("band", "line", "dotted", "dot" or "line-dot"), colour and label."""

    mark: str
    colour: str
    label: str


#: what a forest row shows where a level's AUC cannot be computed (one class only), in order of preference
FOREST_METRICS = {"auc": ("AUC", BLUE), "sensitivity": ("sens.", ORANGE), "specificity": ("spec.", GREEN)}
FOREST_LEGEND = [LegendEntry("line-dot", BLUE, "AUC"), LegendEntry("line-dot", ORANGE, "sensitivity (no AUC)"),
                 LegendEntry("line-dot", GREEN, "specificity (no AUC)"),
                 LegendEntry("dotted", GREY, "overall AUC")]  # fmt: skip


_BASE = """\
<svg xmlns="http://www.w3.org/2000/svg" class="figure" data-figure="{{ name }}" viewBox="0 0 {{ width }} {{ height }}"
 width="{{ width }}" height="{{ height }}" role="img" font-family="system-ui,sans-serif" font-size="12" fill="#222">
<title>{{ title }}</title>
<rect width="{{ width }}" height="{{ height }}" fill="#fff"/>
<g class="grid" stroke="#e8e8e8">
{% for t in ticks %}<line x1="{{ p.x(t) }}" y1="{{ p.top }}" x2="{{ p.x(t) }}" y2="{{ p.bottom }}"/>
{% if y_ticks %}<line x1="{{ p.left }}" y1="{{ p.y(t) }}" x2="{{ p.right }}" y2="{{ p.y(t) }}"/>
{% endif %}{% endfor %}</g>
<rect class="frame" x="{{ p.left }}" y="{{ p.top }}" width="{{ p.width }}" height="{{ p.height }}" fill="none"
 stroke="#444"/>
<g class="ticks" font-size="11">
{% for t in ticks %}<text x="{{ p.x(t) }}" y="{{ p.bottom + 16 }}" text-anchor="middle">{{ '%.1f' % t }}</text>
{% if y_ticks %}<text x="{{ p.left - 6 }}" y="{{ p.y(t) }}" dy=".35em" text-anchor="end">{{ '%.1f' % t }}</text>
{% endif %}{% endfor %}</g>
<text class="xlabel" x="{{ p.x(0.5) }}" y="{{ p.bottom + 36 }}" text-anchor="middle">{{ xlabel }}</text>
{% if ylabel %}<text class="ylabel" transform="translate(16 {{ p.y(0.5) }}) rotate(-90)" text-anchor="middle">
{{- ylabel }}</text>
{% endif %}
<text class="title" x="{{ title_x }}" y="22" font-size="13" text-anchor="{{ title_anchor }}">{{ title }}</text>
{% block content %}{% endblock %}
{% if legend %}
<g class="legend" font-size="11">
{% for e in legend %}{% if e.mark == 'band' %}<rect x="{{ e.x }}" y="{{ legend_y - 5 }}" width="22" height="10"
 fill="{{ e.colour }}" fill-opacity="0.2"/>
{% elif e.mark in ('line', 'line-dot', 'dotted') %}<line x1="{{ e.x }}" y1="{{ legend_y }}" x2="{{ e.x2 }}"
 y2="{{ legend_y }}" stroke="{{ e.colour }}" stroke-width="1.5"{% if e.mark == 'dotted' %} stroke-dasharray="2 3"
{%- endif %}/>
{% endif %}{% if e.mark in ('dot', 'line-dot') %}<circle cx="{{ e.cx }}" cy="{{ legend_y }}" r="3.5"
 fill="{{ e.colour }}"/>
{% endif %}<text x="{{ e.tx }}" y="{{ legend_y }}" dy=".35em">{{ e.label }}</text>
{% endfor %}</g>
{% endif %}
</svg>
"""

_ROC = """{% extends "base" %}{% block content %}
<polygon class="band" points="{{ band }}" fill="#1f77b4" fill-opacity="0.2"/>
<line class="chance" x1="{{ p.x(0) }}" y1="{{ p.y(0) }}" x2="{{ p.x(1) }}" y2="{{ p.y(1) }}" stroke="#808080"
 stroke-dasharray="2 3"/>
<polyline class="roc" points="{{ curve }}" fill="none" stroke="#1f77b4" stroke-width="1.5"/>
{% if point %}<circle class="operating-point" cx="{{ p.x(point.fpr) }}" cy="{{ p.y(point.tpr) }}" r="4.5"
 fill="#d62728"><title>{{ point.text }}</title></circle>
{% endif %}{% endblock %}
"""

_CALIBRATION = """{% extends "base" %}{% block content %}
<line class="perfect" x1="{{ p.x(0) }}" y1="{{ p.y(0) }}" x2="{{ p.x(1) }}" y2="{{ p.y(1) }}" stroke="#808080"
 stroke-dasharray="2 3"/>
{% if bins %}<polyline class="observed" points="{{ curve }}" fill="none" stroke="#2ca02c" stroke-width="1.5"/>
{% endif %}
{% for b in bins %}<g class="error-bar" stroke="#2ca02c" fill="#2ca02c"><title>{{ b.text }}</title>
<line x1="{{ b.x }}" y1="{{ b.low }}" x2="{{ b.x }}" y2="{{ b.high }}"/>
<line x1="{{ b.cap_left }}" y1="{{ b.low }}" x2="{{ b.cap_right }}" y2="{{ b.low }}"/>
<line x1="{{ b.cap_left }}" y1="{{ b.high }}" x2="{{ b.cap_right }}" y2="{{ b.high }}"/>
<circle cx="{{ b.x }}" cy="{{ b.y }}" r="3.5"/></g>
{% endfor %}{% endblock %}
"""

_FOREST = """{% extends "base" %}{% block content %}
<line class="overall" x1="{{ p.x(overall) }}" y1="{{ p.top }}" x2="{{ p.x(overall) }}" y2="{{ p.bottom }}"
 stroke="#808080" stroke-dasharray="2 3"><title>overall AUC {{ '%.3f' % overall }}</title></line>
{% for r in rows %}<g class="forest-row" stroke="{{ r.colour }}" fill="{{ r.colour }}"><title>{{ r.text }}</title>
<text x="{{ p.left - 8 }}" y="{{ r.y }}" dy=".35em" text-anchor="end" font-size="11" fill="#222" stroke="none">
{{- r.label }}</text>
<line x1="{{ r.low }}" y1="{{ r.y }}" x2="{{ r.high }}" y2="{{ r.y }}" stroke-width="1.5"/>
<circle cx="{{ r.x }}" cy="{{ r.y }}" r="3.5" stroke="none"/></g>
{% endfor %}{% endblock %}
"""

_TEMPLATES = jinja2.Environment(
    loader=jinja2.DictLoader({"base": _BASE, "roc": _ROC, "calibration": _CALIBRATION, "forest": _FOREST}),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    keep_trailing_newline=True,
)
_COMPILED = {name: _TEMPLATES.get_template(name) for name in ("base", "roc", "calibration", "forest")}


def _render(name: str, **values: Any) -> str:
    """The SVG text of figure template `name` (which extends "base") with `values`; labels are escaped."""
    return _COMPILED[name].render(name=name, ticks=TICKS, **values)


def _legend(plot: Plot, entries: list[LegendEntry]) -> list[dict[str, str]]:
    """The legend's entries laid out in one row, centred under the plot (never over the data; a legend wider than
    the plot reaches left of it, never past the figure's left edge): each entry's mark, colour and label with
    the x of its mark's start, middle and end and of its label."""
    widths = [46 + 6.2 * len(e.label) for e in entries]  # the mark, a gap, the label at ~6.2 px a character
    x = max(8.0, plot.left + (plot.width - sum(widths)) / 2)
    laid_out = []
    for entry, width in zip(entries, widths, strict=True):
        laid_out.append({"mark": entry.mark, "colour": entry.colour, "label": entry.label, "x": _px(x),
                         "cx": _px(x + 11), "x2": _px(x + 22), "tx": _px(x + 28)})  # fmt: skip
        x += width
    return laid_out


def _square_figure(name: str, title: str, xlabel: str, ylabel: str, legend: list[LegendEntry], **content: Any) -> str:
    """A 500 x 440 px figure on the unit square, ticks every 0.2 on both axes, with its title, axis labels and
    legend; `content` goes to the figure's own template."""
    return _render(
        name, width=500, height=440, p=SQUARE, y_ticks=True, title=title, title_x=SQUARE.x(0.5),
        title_anchor="middle", xlabel=xlabel, ylabel=ylabel, legend=_legend(SQUARE, legend),
        legend_y=SQUARE.bottom + 60, **content,
    )  # fmt: skip


def roc_figure(results: dict) -> tuple[dict, str]:
    """The ROC curve with its 95% band, the chosen operating point and the AUC: returns the figure's data (for
    its JSON file) and the SVG. Raises KeyError if `results` lacks roc, overall or operating_point."""
    roc, auc = results["roc"], results["overall"]["auc"]
    band = roc["band"]
    shown = [(f, lo, hi) for f, lo, hi in zip(band["fpr"], band["low"], band["high"], strict=True)
             if lo is not None and hi is not None]  # fmt: skip
    plot = SQUARE
    outline = [(f, hi) for f, _, hi in shown] + [(f, lo) for f, lo, _ in reversed(shown)]
    point = results["operating_point"]
    se, sp = point["sensitivity"]["value"], point["specificity"]["value"]
    legend = [LegendEntry("band", BLUE, "95% band"), LegendEntry("line", BLUE, "ROC")]
    marker = None
    if se is not None and sp is not None:
        legend.append(LegendEntry("dot", RED, f"threshold {point['threshold']}"))
        marker = {"fpr": 1 - sp, "tpr": se,
                  "text": f"threshold {point['threshold']}: sensitivity {se:.3f}, specificity {sp:.3f}"}  # fmt: skip
    svg = _square_figure(
        "roc", f"ROC, AUC {auc['value']:.3f} ({auc['low']:.3f}-{auc['high']:.3f})", "1 - specificity",
        "sensitivity", legend, band=plot.points(outline),
        curve=plot.points((q["fpr"], q["tpr"]) for q in roc["points"]), point=marker,
    )  # fmt: skip
    return {"points": roc["points"], "band": band, "method": roc["method"], "auc": auc}, svg


def calibration_figure(results: dict) -> tuple[dict, str]:
    """Observed fraction positive against mean score per bin (Wilson 95% error bars) and the Brier score:
    returns the figure's data and the SVG."""
    cal = results["calibration"]
    plot = SQUARE
    bins = []
    for b in cal["bins"]:
        x, ci = plot.left + b["mean_score"] * plot.width, b["observed_ci"]
        bins.append({
            "x": _px(x), "y": plot.y(b["observed"]), "low": plot.y(ci["low"]), "high": plot.y(ci["high"]),
            "cap_left": _px(x - 4), "cap_right": _px(x + 4),
            "text": f"scores {b['low']}-{b['high']}: {b['n']} cases, mean score {b['mean_score']}, "
                    f"observed {b['observed']} ({ci['low']}-{ci['high']})",
        })  # fmt: skip
    legend = [LegendEntry("dotted", GREY, "perfect"), LegendEntry("line-dot", GREEN, "observed (Wilson 95%)")]
    svg = _square_figure(
        "calibration", f"Calibration, Brier score {cal['brier']}", "mean score in bin", "observed fraction positive",
        legend, bins=bins, curve=plot.points((b["mean_score"], b["observed"]) for b in cal["bins"]),
    )  # fmt: skip
    return cal, svg


def forest_rows(results: dict) -> list[dict]:
    """Every subgroup and robustness level not suppressed, with its AUC (or, where the AUC is not shown, its
    sensitivity, or for a level of negatives only its specificity) and 95% CI, in the report's order."""
    rows = []
    for section in ("subgroups", "robustness"):
        for table in results[section]:
            for level in table["levels"]:
                if level["suppressed"]:
                    continue
                metric = next((m for m in FOREST_METRICS if level[m]["value"] is not None), None)
                if metric is None:
                    continue
                rows.append({"section": section, "attribute": table["attribute"], "level": level["level"],
                             "metric": metric, **level[metric]})  # fmt: skip
    return rows


def _cut(label: str) -> str:
    """`label`, or its first LABEL_CHARACTERS - 1 characters and an ellipsis if it is longer."""
    return label if len(label) <= LABEL_CHARACTERS else label[: LABEL_CHARACTERS - 1] + "\u2026"


def forest_figure(results: dict) -> tuple[dict, str]:
    """AUC (or sensitivity or specificity, where AUC cannot be computed) with 95% CI for every subgroup and
    robustness level not suppressed as too small, against the overall AUC: returns the figure's data and the SVG."""
    rows = forest_rows(results)
    row_height, top = 22, 38
    plot = Plot(left=360, top=top, width=510, height=row_height * max(len(rows), 1))
    drawn = []
    for i, row in enumerate(rows):
        name, colour = FOREST_METRICS[row["metric"]]
        value = row["value"]
        low = value if row["low"] is None else row["low"]
        high = value if row["high"] is None else row["high"]
        label = f"{row['attribute']}: {row['level']} ({name})"
        drawn.append({
            "y": _px(top + row_height * (i + 0.5)), "x": plot.x(value), "low": plot.x(low), "high": plot.x(high),
            "colour": colour, "label": _cut(label),
            "text": f"{label}: {value:.3f} ({low:.3f}-{high:.3f})",
        })  # fmt: skip
    overall = results["overall"]["auc"]["value"]
    svg = _render(
        "forest", width=900, height=int(plot.bottom + 76), p=plot, y_ticks=False,
        title="Subgroups and robustness, 95% CI (small cells not shown)", title_x=plot.left, title_anchor="start",
        xlabel="95% confidence interval", ylabel="", legend=_legend(plot, FOREST_LEGEND),
        legend_y=plot.bottom + 60, rows=drawn, overall=overall,
    )  # fmt: skip
    return {"rows": rows, "overall_auc": overall}, svg
