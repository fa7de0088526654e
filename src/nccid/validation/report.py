"""The vendor-facing report of a run: one self-contained HTML page (figures as inline SVG drawn by figures.py,
a small inline script for the operating-point view, nothing fetched from anywhere), the JSON of every figure
and of all results, a CSV of the ROC points, and a checksum manifest (SHA256SUMS) of all of them.

It holds aggregate results only (see analysis.py): no pseudonym, no SOP Instance UID, no case identifier, no
per-patient row. It states the model, cohort-manifest and ground-truth hashes, the code version, the run's
times and limits, so that the run can be reproduced.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import re
from pathlib import Path
from typing import Any

import jinja2

from nccid.validation.figures import calibration_figure, forest_figure, roc_figure

FIGURES = ("roc", "calibration", "forest", "operating_point")


def operating_point_data(results: dict) -> dict:
    """What the report's inline operating-point view needs: the threshold, the score histogram, the prevalences
    and the predictive values at the threshold."""
    return {
        "threshold": results["threshold"],
        "histogram": results["histogram"],
        "prevalences": [p["prevalence"] for p in results["operating_point"]["predictive_values"]],
        "at_threshold": results["operating_point"],
    }


def roc_csv(results: dict) -> str:
    """The ROC points as CSV text (fpr, tpr, threshold), for vendors who want to plot or check them."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["fpr", "tpr", "threshold"])
    for point in results["roc"]["points"]:
        writer.writerow([point["fpr"], point["tpr"], point["threshold"]])
    return out.getvalue()


#: the report's names for the keys of results["methods"]
METHOD_TITLES = {
    "auc_ci": "ROC AUC, 95 % CI",
    "roc_band": "ROC curve band",
    "proportion_ci": "sensitivity, specificity: 95 % CI",
    "ppv_npv": "PPV and NPV",
    "calibration": "calibration",
    "suppression": "small cells",
}

_TEMPLATE = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined).from_string(
    """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>Validation report: {{ c.model.name }} {{ c.model.version }}</title>
<style>
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}
th{background:#f3f3f3}.fig{display:inline-block;vertical-align:top;margin:.5em}
.fig svg{max-width:520px;height:auto}.wide svg{max-width:1000px}
.warn{background:#fff3cd;padding:.6em;border:1px solid #e0c36b}.mono{font-family:monospace;font-size:.85em}
#op output{font-weight:bold}
</style></head><body>
<h1>{{ c.kind_title }}: {{ c.model.name }} {{ c.model.version }} ({{ c.model.vendor }})</h1>
<p>Run <span class="mono">{{ c.run }}</span>. {{ c.kind_note }}</p>
<p class="{{ 'warn' if c.sandbox.status != 'completed' else '' }}">Entry command: {{ c.sandbox_text }}.</p>
<h2>Intended use</h2>
<table>
<tr><th>task</th><td>{{ c.task_text }}</td></tr>
<tr><th>input</th><td>{{ c.use.modalities|join(', ') }} radiograph, views {{ c.use.views|join(', ') }}</td></tr>
<tr><th>unit</th><td>{{ c.use.unit }}</td></tr>
<tr><th>population</th><td>{% set lo, hi = c.use.min_age, c.use.max_age -%}
{% if lo is not none and hi is not none %}ages {{ lo }} to {{ hi }}{% elif lo is not none %}ages {{ lo }} and over
{%- elif hi is not none %}ages up to {{ hi }}{% else %}any age{% endif %}
{%- if c.use.window_days is not none %}, image within {{ c.use.window_days }} days of the swab{% endif %}
{%- if c.use.population %}; {{ c.use.population }}{% endif %}</td></tr>
<tr><th>output</th><td>score in [0, 1], vendor's threshold {{ c.use.threshold }}</td></tr>
</table>
<h2>Cohort and predictions</h2>
<table>
<tr><th>cases</th><td>{{ r.cohort.cases }} ({{ r.cohort.positives }} positive,
 {{ r.cohort.negatives }} negative)</td></tr>
<tr><th>valid predictions</th><td>{{ r.predictions.valid }} of {{ r.predictions.expected }}</td></tr>
<tr><th>missing predictions</th><td>{{ r.predictions.missing }}
 ({{ r.predictions.missing_by_class.positives }} positive,
 {{ r.predictions.missing_by_class.negatives }} negative cases)</td></tr>
{% for reason, count in r.predictions.problems.items() %}
<tr><th>rows refused: {{ reason }}</th><td>{{ count }}</td></tr>
{% endfor %}
{% for reason, count in c.excluded.items() %}<tr><th>patients left out: {{ reason }}</th><td>{{ count }}</td></tr>
{% endfor %}
</table>
{% if r.status != 'metrics computed' %}<p class="warn">{{ r.status }}.</p>{% else %}
<h2>Performance</h2>
<table>
<tr><th>ROC AUC (95% CI, DeLong)</th><td>{{ fmt(r.overall.auc) }}</td></tr>
<tr><th>sensitivity at {{ r.threshold }} (Wilson 95% CI)</th><td>{{ fmt(r.operating_point.sensitivity) }}
 ({{ r.operating_point.tp }} of {{ r.operating_point.tp + r.operating_point.fn }})</td></tr>
<tr><th>specificity at {{ r.threshold }} (Wilson 95% CI)</th><td>{{ fmt(r.operating_point.specificity) }}
 ({{ r.operating_point.tn }} of {{ r.operating_point.tn + r.operating_point.fp }})</td></tr>
<tr><th>Brier score</th><td>{{ r.calibration.brier }}</td></tr>
</table>
<table><tr><th>prevalence</th><th>PPV</th><th>NPV</th></tr>
{% for p in r.operating_point.predictive_values %}<tr><td>{{ p.prevalence }}</td><td>{{ fmt(p.ppv) }}</td>
<td>{{ fmt(p.npv) }}</td></tr>{% endfor %}</table>
<div class="fig">{{ svg.roc|safe }}</div><div class="fig">{{ svg.calibration|safe }}</div>
<h2>Operating point</h2>
<div id="op">
<label>threshold <input id="op-t" type="range" min="0" max="100" step="1"> <output id="op-tv"></output></label>
<label>prevalence <input id="op-p" type="number" min="0.001" max="0.999" step="0.01"></label>
<table><tr><th>TP</th><th>FN</th><th>TN</th><th>FP</th><th>sensitivity</th><th>specificity</th>
<th>PPV</th><th>NPV</th></tr><tr><td id="op-tp"></td><td id="op-fn"></td><td id="op-tn"></td><td id="op-fp"></td>
<td id="op-se"></td><td id="op-sp"></td><td id="op-ppv"></td><td id="op-npv"></td></tr></table>
</div>
<script id="op-data" type="application/json">{{ op_json|safe }}</script>
<script>
(function(){
const d=JSON.parse(document.getElementById('op-data').textContent),h=d.histogram,$=id=>document.getElementById(id);
const sum=(a,k)=>a.slice(k).reduce((x,y)=>x+y,0),all=a=>sum(a,0),f=x=>isFinite(x)?x.toFixed(3):'-';
function update(){const k=+$('op-t').value,p=+$('op-p').value;
const tp=sum(h.positives,k),fn=all(h.positives)-tp,fp=sum(h.negatives,k),tn=all(h.negatives)-fp;
const se=tp/(tp+fn),sp=tn/(tn+fp),ppv=se*p/(se*p+(1-sp)*(1-p)),npv=sp*(1-p)/(sp*(1-p)+(1-se)*p);
$('op-tv').textContent=(k/h.steps).toFixed(2);
[['op-tp',tp],['op-fn',fn],['op-tn',tn],['op-fp',fp]].forEach(([i,v])=>$(i).textContent=v);
$('op-se').textContent=f(se);$('op-sp').textContent=f(sp);$('op-ppv').textContent=f(ppv);$('op-npv').textContent=f(npv);}
$('op-t').value=Math.round(d.threshold*h.steps);$('op-p').value=0.1;
$('op-t').addEventListener('input',update);$('op-p').addEventListener('input',update);update();})();
</script>
<h2>Subgroups and robustness</h2>
<p>A level with fewer than {{ r.min_cell }} cases, or with 1 to {{ r.min_cell - 1 }} cases of a class, is
suppressed; where that hides one level of an attribute, the smallest other level is suppressed too, so that no
small count follows from the totals.</p>
<div class="fig wide">{{ svg.forest|safe }}</div>
{% for section in ('subgroups', 'robustness') %}{% for t in r[section] %}
{% set gap = t.largest_gap.get('auc') %}
<h3>{{ t.attribute }}{% if gap %} (largest AUC gap {{ gap.gap }}: {{ gap.lowest }} vs {{ gap.highest }}){% endif %}</h3>
<table><tr><th>level</th><th>n</th><th>positives</th><th>negatives</th><th>AUC</th><th>sensitivity</th>
<th>specificity</th></tr>
{% for l in t.levels %}{% if l.suppressed %}
<tr><td>{{ l.level }}</td><td>{{ l.n }}</td><td colspan="5">suppressed</td></tr>
{% else %}<tr><td>{{ l.level }}</td><td>{{ l.n }}</td><td>{{ l.positives }}</td><td>{{ l.negatives }}</td>
<td>{{ fmt(l.auc) }}</td><td>{{ fmt(l.sensitivity) }}</td><td>{{ fmt(l.specificity) }}</td></tr>{% endif %}
{% endfor %}</table>{% endfor %}{% endfor %}
<h2>Methods</h2><table>{% for k, v in r.methods.items() %}<tr><th>{{ METHOD_TITLES.get(k, k) }}</th><td>{{ v }}</td>
</tr>{% endfor %}</table>
{% endif %}
{% if c.logs %}<h2>Logs of the dry run (synthetic data)</h2>
<h3>standard output</h3><pre>{{ c.logs.stdout }}</pre><h3>standard error</h3><pre>{{ c.logs.stderr }}</pre>{% endif %}
<h2>Reproducibility</h2>
<table>
<tr><th>model (submission) SHA-256</th><td class="mono">{{ c.model_hash }}</td></tr>
<tr><th>cohort manifest SHA-256</th><td class="mono">{{ c.cohort_hash }}</td></tr>
{% if c.get("frozen_cohort") %}<tr><th>frozen cohort</th><td><span class="mono">{{ c.frozen_cohort.id[:12] }}</span>,
frozen {{ c.frozen_cohort.frozen_at }}: every sealed run of this intended use on this validation set reads the same
files</td></tr>{% endif %}
<tr><th>ground truth SHA-256</th><td class="mono">{{ c.truth_hash }}</td></tr>
<tr><th>code version</th><td class="mono">{{ c.code_version }}</td></tr>
<tr><th>started / finished (UTC)</th><td>{{ c.started }} / {{ c.finished }}</td></tr>
<tr><th>times (s)</th><td>
 {% for k, v in c.times.items() %}{{ k }} {{ v }}{% if not loop.last %}, {% endif %}{% endfor %}</td></tr>
<tr><th>limits</th><td>memory {{ c.limits.memory_mb }} MB, {{ c.limits.processes }} processes,
 wall clock {{ c.limits.wall_seconds }} s, largest file {{ c.limits.output_mb }} MB; no network</td></tr>
</table>
<p>Files beside this page: report.json, figures/*.json, roc_points.csv; their SHA-256 in SHA256SUMS.</p>
</body></html>
"""
)


def _fmt(estimate: dict) -> str:
    if not estimate or estimate.get("value") is None:
        return "-"
    return f"{estimate['value']:.3f} ({estimate['low']:.3f}-{estimate['high']:.3f})"


def write_report(
    folder: Path, results: dict[str, Any], context: dict[str, Any], extra: dict[str, bytes] | None = None
) -> dict[str, str]:
    """Write the report files into `folder` (created). Returns file name -> SHA-256, as written to SHA256SUMS.

    `context` holds the run's description (model, intended use, hashes, code version, times, limits, sandbox
    outcome, exclusion counts, and for a dry run the logs); `results` is analysis.analyse's output; `extra`
    are further files (name -> bytes) the reader may see, such as a dry run's raw outputs.
    """
    folder.mkdir(parents=True, exist_ok=False)
    (folder / "figures").mkdir()
    files: dict[str, str | bytes] = dict(extra or {})
    svgs: dict[str, str] = {}
    if results.get("status") == "metrics computed":
        for name, make in (("roc", roc_figure), ("calibration", calibration_figure), ("forest", forest_figure)):
            data, svgs[name] = make(results)
            files[f"figures/{name}.json"] = json.dumps(data, indent=1)
        files["figures/operating_point.json"] = json.dumps(operating_point_data(results), indent=1)
        files["roc_points.csv"] = roc_csv(results)
    op_json = json.dumps(operating_point_data(results)) if svgs else "{}"
    html = _TEMPLATE.render(
        c=context, r=results, svg=svgs, fmt=_fmt, op_json=op_json.replace("</", "<\\/"), METHOD_TITLES=METHOD_TITLES
    )
    files["report.html"] = html
    files["report.json"] = json.dumps({"run": context_for_json(context), "results": results}, indent=1)
    sums = {}
    for name, content in sorted(files.items()):
        data = content.encode() if isinstance(content, str) else content
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
        sums[name] = hashlib.sha256(data).hexdigest()
    (folder / "SHA256SUMS").write_text("".join(f"{digest}  {name}\n" for name, digest in sums.items()))
    return sums


_INLINE_SCRIPT = re.compile(r"<script(?:\s[^>]*)?>(.*?)</script>", re.DOTALL | re.IGNORECASE)


def inline_script_hashes(html: str) -> list[str]:
    """The Content-Security-Policy sources (`'sha256-...'`) of a report page's inline scripts, so that a server
    can allow exactly these scripts (the operating-point view) and no other. Pure."""
    return [
        "'sha256-" + base64.b64encode(hashlib.sha256(body.encode()).digest()).decode() + "'"
        for body in _INLINE_SCRIPT.findall(html)
    ]


def context_for_json(context: dict[str, Any]) -> dict[str, Any]:
    """The run description as JSON (logs included only where the context holds them: the dry run)."""
    return {k: v for k, v in context.items() if k not in ("kind_title", "kind_note")}
