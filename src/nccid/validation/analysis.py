"""From ground truth and predictions to the aggregate results of a run: pure, nothing per patient leaves here.

The results dict is what the report renders and what its JSON holds: overall metrics, the ROC curve with its
band, the operating point and predictive values, calibration, subgroups and robustness, and the counts of
missing or malformed predictions. Subgroup cells under `min_cell` are suppressed (see metrics.subgroups).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from nccid.validation import metrics
from nccid.validation.predictions import Predictions

SUBGROUPS = ("sex", "age band", "ethnicity group", "site", "scanner manufacturer", "modality")
ROBUSTNESS_PREFIX = "comorbidity: "
ROBUSTNESS = ("scanner model",)
DEFAULT_MIN_CELL = 10


def analyse(
    truth: dict[str, dict[str, Any]],
    predictions: Predictions,
    threshold: float,
    *,
    min_cell: int = DEFAULT_MIN_CELL,
    prevalences: Sequence[float] = metrics.DEFAULT_PREVALENCES,
    seed: int = 20200406,
) -> dict[str, Any]:
    """Every aggregate result of a run. `truth` is case -> {"label": 0/1, attribute: level, ...}.

    Cases without a valid prediction are left out of the metrics and counted (overall and by class), never
    dropped silently. Returns {"status": "no valid predictions"} plus the counts when nothing can be computed.
    """
    cases = sorted(c for c in truth if c in predictions.scores)
    y = [int(truth[c]["label"]) for c in cases]
    s = [predictions.scores[c] for c in cases]
    missing_by_class = {
        "positives": sum(1 for c, t in truth.items() if t["label"] == 1 and c not in predictions.scores),
        "negatives": sum(1 for c, t in truth.items() if t["label"] == 0 and c not in predictions.scores),
    }
    base: dict[str, Any] = {
        "cohort": {
            "cases": len(truth),
            "positives": sum(1 for t in truth.values() if t["label"] == 1),
            "negatives": sum(1 for t in truth.values() if t["label"] == 0),
        },
        "predictions": {**predictions.to_json(), "missing_by_class": missing_by_class},
        "threshold": threshold,
        "min_cell": min_cell,
    }
    if not cases or len(set(y)) < 2:
        return {**base, "status": "no valid predictions for both classes: no metrics"}
    point = metrics.operating_point(y, s, threshold)
    attributes = sorted({k for t in truth.values() for k in t if k != "label"})

    def table(attribute: str) -> dict:
        levels = [str(truth[c].get(attribute, "unknown")) for c in cases]
        return {"attribute": attribute, **metrics.subgroups(y, s, levels, threshold, min_cell=min_cell)}

    return {
        **base,
        "status": "metrics computed",
        "overall": metrics.summarise(y, s, threshold),
        "operating_point": {
            "threshold": threshold,
            "tp": point.tp,
            "fp": point.fp,
            "tn": point.tn,
            "fn": point.fn,
            "sensitivity": point.sensitivity.to_json(),
            "specificity": point.specificity.to_json(),
            "predictive_values": metrics.predictive_values(point, prevalences),
        },
        "roc": metrics.roc_with_band(y, s, seed=seed),
        "calibration": metrics.calibration(y, s, min_cell=min_cell),
        "histogram": metrics.score_histogram(y, s),
        "subgroups": [table(a) for a in SUBGROUPS if a in attributes],
        "robustness": [table(a) for a in attributes if a.startswith(ROBUSTNESS_PREFIX)]
        + [table(a) for a in ROBUSTNESS if a in attributes],
        "methods": {
            "auc_ci": "DeLong (fast midrank form), 95 %, normal interval clipped to [0, 1]",
            "roc_band": "stratified bootstrap, 500 replicates, fixed seed",
            "proportion_ci": "Wilson score interval, 95 % (the bounds of scipy.stats.binomtest, tested equal)",
            "ppv_npv": "Bayes' rule at each stated prevalence; bounds from the Wilson bounds of sens./spec.",
            "calibration": "Brier score; 10 equal-width bins (sklearn.calibration.calibration_curve)",
            "suppression": (
                f"a subgroup level with fewer than {min_cell} cases, or with 1 to {min_cell - 1} cases of a class, is "
                "not shown; where that hides one level of an attribute, the smallest other level is hidden too"
            ),
        },
    }
