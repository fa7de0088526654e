"""Performance of a binary score against ground truth: pure functions of arrays, no I/O.

Methods (stated in every report):
- ROC AUC: scikit-learn's `roc_auc_score` for the whole cohort; its 95 % CI by DeLong's method (DeLong,
  DeLong & Clarke-Pearson 1988, in the fast midrank form of Sun & Xu 2014): AUC +/- 1.96 SE, clipped to
  [0, 1]. Neither scikit-learn nor SciPy provides DeLong, so the structural components are computed here
  (placement values, by binary search: the same floats as from SciPy's midranks); tests check them against
  the O(m n) definition, SciPy's `rankdata` and a worked example. Subgroup AUCs are the mean of those
  components (the Mann-Whitney form of the same AUC; tests hold it to `roc_auc_score`), which saves
  scikit-learn's input checks on every one of dozens of small cells.
- ROC curve: scikit-learn's `roc_curve`; its 95 % band by a stratified bootstrap (positives and negatives
  resampled separately, a fixed seed) of the true positive rate on a fixed grid of false positive rates,
  the replicates' ROC points computed all at once (a test holds the band equal, to the last digit, to the
  replicate-by-replicate loop).
- Sensitivity, specificity (and any proportion): the Wilson score interval (Newcombe 1998, the formula and
  arithmetic of SciPy's `binomtest(...).proportion_ci(method="wilson")`, which tests compare it with; SciPy's
  own call also computes an exact p-value nobody reads, ten times the cost).
- PPV / NPV at a stated prevalence: Bayes' rule from sensitivity and specificity (their CIs carried through
  the monotone formula from the Wilson bounds).
- Calibration: scikit-learn's `brier_score_loss` and `calibration_curve` (ten equal-width bins).
"""

from __future__ import annotations

import importlib
import math
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

# scikit-learn is imported where used: it takes about a second to import, which a validation run spends while
# the model runs (`warm_up`) rather than before it starts.

#: the 97.5 % point of the standard normal, as SciPy computes it (`norm.ppf(0.975)`; a test holds them equal)
Z95 = 1.959963984540054
DEFAULT_PREVALENCES = (0.01, 0.05, 0.1, 0.2, 0.5)


@dataclass(frozen=True)
class Estimate:
    """A value with its 95 % confidence interval (None where it cannot be computed)."""

    value: float | None
    low: float | None
    high: float | None

    def to_json(self) -> dict:
        return {"value": _round(self.value), "low": _round(self.low), "high": _round(self.high)}


NONE = Estimate(None, None, None)


def _round(value: float | None, places: int = 4) -> float | None:
    return None if value is None or not math.isfinite(value) else round(float(value), places)


_IMPORTING = threading.Lock()
_warm = False


def warm_up() -> None:
    """Import what the metrics use (scikit-learn's metrics and calibration) and call each
    once on four cases (their first call looks up plug-ins and fills caches: tens of milliseconds), one thread
    at a time: two threads importing scikit-learn at once can see it half initialised. A validation run calls
    this on a helper thread while the model runs; every function here calls it before its first import of
    them (then it costs microseconds). Returns nothing."""
    global _warm
    if _warm:
        return
    with _IMPORTING:
        if _warm:
            return
        for module in ("sklearn.calibration", "sklearn.metrics"):
            importlib.import_module(module)
        from sklearn.calibration import calibration_curve
        from sklearn.metrics import brier_score_loss, roc_auc_score, roc_curve

        y, s = np.array([0, 1, 0, 1]), np.array([0.1, 0.4, 0.35, 0.8])
        roc_auc_score(y, s), roc_curve(y, s), brier_score_loss(y, s), calibration_curve(y, s)
        _warm = True


def wilson(successes: int, trials: int) -> Estimate:
    """The proportion successes/trials with its 95 % Wilson score interval; NONE for no trials.

    Newcombe's (1998) form, operation for operation as SciPy's `binomtest(k, n).proportion_ci(method="wilson")`
    computes it (so the bounds are the same floats; a test compares them), without the exact test's p-value."""
    if trials <= 0:
        return NONE
    k, n = int(successes), int(trials)
    p = k / n
    z = Z95  # SciPy's ndtri(0.5 + 0.5 * 0.95), the same float
    denom = 2 * (n + z**2)
    center = (2 * n * p + z**2) / denom
    delta = z / denom * math.sqrt(4 * n * p * (1 - p) + z**2)
    return Estimate(p, 0.0 if k == 0 else center - delta, 1.0 if k == n else center + delta)


def delong_components(y_true: np.ndarray, scores: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """AUC and the structural components (placement values) V10 of each positive and V01 of each negative.

    V10[i] = P(score of a negative < score of positive i) + 1/2 P(equal); V01[j] likewise for negative j. Each
    is counted by binary search in the other class's sorted scores (below plus below-or-equal, halved): the
    same floats as the midrank form (overall midrank minus midrank within the class; a test holds them equal
    to SciPy's `rankdata`), a tenth of the cost, which matters in dozens of subgroup cells.
    """
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(scores, dtype=float)
    pos, neg = s[y], s[~y]
    m, n = len(pos), len(neg)
    pos_sorted, neg_sorted = np.sort(pos), np.sort(neg)
    negatives_below = np.searchsorted(neg_sorted, pos, "left") + np.searchsorted(neg_sorted, pos, "right")
    positives_below = np.searchsorted(pos_sorted, neg, "left") + np.searchsorted(pos_sorted, neg, "right")
    v10 = negatives_below / (2 * n)  # twice the count, ties counted once: exact integers, one rounding
    v01 = 1.0 - positives_below / (2 * m)
    return float(v10.mean()), v10, v01


def auc_with_ci(
    y_true: Sequence[int], scores: Sequence[float], *, checked: bool = True
) -> tuple[Estimate, float | None]:
    """ROC AUC (scikit-learn's `roc_auc_score`, or with `checked` False the mean of the DeLong components, the
    same AUC without scikit-learn's input checks) and its 95 % DeLong interval; also returns the standard error.

    Needs at least one positive and one negative; else (NONE, None).
    """
    y = np.asarray(y_true).astype(int)
    s = np.asarray(scores, dtype=float)
    if y.sum() == 0 or y.sum() == len(y):
        return NONE, None
    mann_whitney, v10, v01 = delong_components(y, s)
    if checked:
        warm_up()
        from sklearn.metrics import roc_auc_score

        auc = float(roc_auc_score(y, s))
    else:
        auc = mann_whitney
    m, n = len(v10), len(v01)
    variance = (v10.var(ddof=1) if m > 1 else 0.0) / m + (v01.var(ddof=1) if n > 1 else 0.0) / n
    se = math.sqrt(max(variance, 0.0))
    return Estimate(auc, max(0.0, auc - Z95 * se), min(1.0, auc + Z95 * se)), se


def roc_points(y_true: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) at every distinct score, from (0, 0): scikit-learn's `roc_curve(..., drop_intermediate=False)`
    without its input checks (a test holds the two equal)."""
    order = np.argsort(-scores, kind="mergesort")
    ranked, labels = scores[order], y_true[order]
    last = np.r_[np.flatnonzero(np.diff(ranked)), len(ranked) - 1]  # the last case at each distinct score
    tps = np.cumsum(labels)[last]
    fps = last + 1 - tps
    return np.r_[0.0, fps / fps[-1]], np.r_[0.0, tps / tps[-1]]


def roc_points_from_counts(positives: np.ndarray, negatives: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`roc_points` of many samples at once, each row of `positives` and `negatives` (shape (rows, scores)) the
    number of that sample's positive and negative cases at each distinct score, highest score first (every row
    needs a case of each class): returns (fpr, tpr), each of shape (rows, scores + 1), from (0, 0).

    A row's points are those of `roc_points`, with a score none of the row's cases has giving the previous point
    again. Repeated points change nothing `np.interp` reads (a test holds the interpolated curves equal to those
    of `roc_points`), and keep every row the same length. Two cumulative sums: no sort per sample."""
    rates = []
    for counts in (negatives, positives):
        rate = np.zeros((counts.shape[0], counts.shape[1] + 1))
        np.cumsum(counts, axis=1, out=rate[:, 1:])  # counts summed as floats: exact, as integers would be
        rate /= rate[:, -1:].copy()
        rates.append(rate)
    return rates[0], rates[1]


def _counts_per_score(ranks: np.ndarray, scores: int) -> np.ndarray:
    """How many entries of each row of `ranks` (indices of distinct scores, < `scores`) fall on each score: shape
    (rows, scores)."""
    rows = len(ranks)
    flat = (np.arange(rows)[:, None] * scores + ranks).ravel()
    return np.bincount(flat, minlength=rows * scores).reshape(rows, scores)


def bootstrap_roc_points(samples: np.ndarray, positives: int) -> tuple[np.ndarray, np.ndarray]:
    """`roc_points` of every row of `samples` (one bootstrap replicate per row, its first `positives` scores
    those of positives), computed for all rows at once: returns (fpr, tpr), each of shape (rows, distinct
    scores in `samples` + 1), the points of `roc_points_from_counts`."""
    distinct, inverse = np.unique(-samples, return_inverse=True)  # highest score first
    ranks = inverse.reshape(samples.shape)
    return roc_points_from_counts(
        _counts_per_score(ranks[:, :positives], len(distinct)), _counts_per_score(ranks[:, positives:], len(distinct))
    )


def _stratified_draws(rng: np.random.Generator, m: int, n: int, replicates: int) -> np.ndarray:
    """The indices a stratified bootstrap draws: row r holds `rng.integers(0, m, m)` then `rng.integers(0, n, n)`
    of replicate r (the draws of rng.choice(pos, m), then rng.choice(neg, n)), replicate after replicate; shape
    (replicates, m + n). Two calls of NumPy's own generator per replicate, a few milliseconds in all."""
    picks = np.empty((replicates, m + n), dtype=np.int64)
    for r in range(replicates):
        picks[r, :m] = rng.integers(0, m, m)
        picks[r, m:] = rng.integers(0, n, n)
    return picks


def roc_with_band(
    y_true: Sequence[int], scores: Sequence[float], *, seed: int = 20200406, replicates: int = 500, grid: int = 101
) -> dict:
    """The ROC curve (scikit-learn's points) and a 95 % stratified-bootstrap band of TPR on an FPR grid.

    Returns {"points": [{"fpr", "tpr", "threshold"}...], "band": {"fpr": [...], "low": [...], "high": [...]},
    "method": ...}.
    """
    warm_up()
    from sklearn.metrics import roc_curve

    y = np.asarray(y_true).astype(int)
    s = np.asarray(scores, dtype=float)
    fpr, tpr, thresholds = roc_curve(y, s)
    fgrid = np.linspace(0, 1, grid)
    pos, neg = s[y == 1], s[y == 0]
    m, n = len(pos), len(neg)
    distinct = np.unique(s)
    rank_of = len(distinct) - 1 - np.searchsorted(distinct, np.r_[pos, neg])  # each case's score, highest first
    picks = _stratified_draws(np.random.default_rng(seed), m, n, replicates)
    boot_fpr, boot_tpr = roc_points_from_counts(
        _counts_per_score(rank_of[picks[:, :m]], len(distinct)),
        _counts_per_score(rank_of[m + picks[:, m:]], len(distinct)),
    )
    curves = np.array([np.interp(fgrid, boot_fpr[r], boot_tpr[r]) for r in range(replicates)])
    low, high = np.percentile(curves, [2.5, 97.5], axis=0)
    return {
        "points": [
            {"fpr": _round(f), "tpr": _round(t), "threshold": _round(min(th, 1.0))}
            for f, t, th in zip(fpr, tpr, thresholds, strict=True)
        ],
        "band": {"fpr": [_round(v) for v in fgrid], "low": [_round(v) for v in low], "high": [_round(v) for v in high]},
        "method": f"stratified bootstrap of TPR on a fixed FPR grid, {replicates} replicates, seed {seed}",
    }


@dataclass(frozen=True)
class OperatingPoint:
    """The confusion counts at one threshold, with sensitivity and specificity and their Wilson 95% intervals."""

    threshold: float
    tp: int
    fp: int
    tn: int
    fn: int
    sensitivity: Estimate
    specificity: Estimate


def operating_point(y_true: Sequence[int], scores: Sequence[float], threshold: float) -> OperatingPoint:
    """Counts and sensitivity / specificity (Wilson CIs) when a score >= threshold is called positive."""
    y = np.asarray(y_true).astype(int)
    called = np.asarray(scores, dtype=float) >= threshold
    tp = int(np.sum(called & (y == 1)))
    fn = int(np.sum(~called & (y == 1)))
    tn = int(np.sum(~called & (y == 0)))
    fp = int(np.sum(called & (y == 0)))
    return OperatingPoint(threshold, tp, fp, tn, fn, wilson(tp, tp + fn), wilson(tn, tn + fp))


def ppv_npv(sensitivity: float, specificity: float, prevalence: float) -> tuple[float | None, float | None]:
    """Positive and negative predictive values at `prevalence` (Bayes' rule); None where undefined."""
    tp = sensitivity * prevalence
    fp = (1 - specificity) * (1 - prevalence)
    tn = specificity * (1 - prevalence)
    fn = (1 - sensitivity) * prevalence
    return (tp / (tp + fp) if tp + fp > 0 else None, tn / (tn + fn) if tn + fn > 0 else None)


def predictive_values(point: OperatingPoint, prevalences: Iterable[float] = DEFAULT_PREVALENCES) -> list[dict]:
    """PPV and NPV at each prevalence, with intervals from the Wilson bounds of sensitivity and specificity
    (PPV rises with both; NPV too), so the interval is conservative rather than exact."""
    se, sp = point.sensitivity, point.specificity
    out = []
    for prevalence in prevalences:
        if se.value is None or sp.value is None:
            out.append({"prevalence": prevalence, "ppv": NONE.to_json(), "npv": NONE.to_json()})
            continue
        ppv, npv = ppv_npv(se.value, sp.value, prevalence)
        ppv_low, npv_low = ppv_npv(se.low, sp.low, prevalence)
        ppv_high, npv_high = ppv_npv(se.high, sp.high, prevalence)
        out.append(
            {
                "prevalence": prevalence,
                "ppv": Estimate(ppv, ppv_low, ppv_high).to_json(),
                "npv": Estimate(npv, npv_low, npv_high).to_json(),
            }
        )
    return out


def calibration(y_true: Sequence[int], scores: Sequence[float], *, bins: int = 10, min_cell: int = 10) -> dict:
    """Brier score and the calibration curve (scikit-learn), bins with fewer than `min_cell` cases suppressed.

    Returns {"brier", "bins": [{"low", "high", "n", "mean_score", "observed"}...], "suppressed_bins"}.
    """
    warm_up()
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import brier_score_loss

    y = np.asarray(y_true).astype(int)
    s = np.asarray(scores, dtype=float)
    edges = np.linspace(0, 1, bins + 1)
    which = np.searchsorted(edges[1:-1], s)  # as calibration_curve bins them: (low, high], the first [0, high]
    observed, predicted = calibration_curve(y, s, n_bins=bins, strategy="uniform")
    counts = np.bincount(which, minlength=bins)
    filled = [b for b in range(bins) if counts[b] > 0]  # calibration_curve returns non-empty bins only
    rows, suppressed = [], 0
    for b, obs, pred in zip(filled, observed, predicted, strict=True):
        if counts[b] < min_cell:
            suppressed += 1
            continue
        rows.append(
            {
                "low": _round(edges[b]),
                "high": _round(edges[b + 1]),
                "n": int(counts[b]),
                "mean_score": _round(pred),
                "observed": _round(obs),
                "observed_ci": wilson(round(obs * counts[b]), int(counts[b])).to_json(),
            }
        )
    return {"brier": _round(float(brier_score_loss(y, s))), "bins": rows, "suppressed_bins": suppressed}


def score_histogram(y_true: Sequence[int], scores: Sequence[float], steps: int = 100) -> dict:
    """Counts of positives and negatives per score step of 1/steps (the operating-point view's data: the
    counts at any threshold on that grid follow from it, with no case's score given)."""
    y = np.asarray(y_true).astype(int)
    index = np.clip(np.floor(np.asarray(scores, dtype=float) * steps + 1e-9).astype(int), 0, steps)
    return {
        "steps": steps,
        "positives": np.bincount(index[y == 1], minlength=steps + 1).tolist(),
        "negatives": np.bincount(index[y == 0], minlength=steps + 1).tolist(),
    }


def summarise(y_true: Sequence[int], scores: Sequence[float], threshold: float) -> dict:
    """AUC (DeLong CI), and sensitivity / specificity at `threshold` (Wilson CIs), with counts."""
    auc, se = auc_with_ci(y_true, scores)
    point = operating_point(y_true, scores, threshold)
    return {
        "n": len(y_true),
        "positives": point.tp + point.fn,
        "negatives": point.tn + point.fp,
        "auc": auc.to_json(),
        "auc_se": _round(se),
        "sensitivity": point.sensitivity.to_json(),
        "specificity": point.specificity.to_json(),
    }


def subgroups(
    y_true: Sequence[int], scores: Sequence[float], levels: Sequence[str], threshold: float, *, min_cell: int = 10
) -> dict:
    """Performance per level of one attribute, with small cells suppressed, and the largest gap.

    Suppression, so that no count under `min_cell` can be read or worked out from the report:
    - a level with fewer than `min_cell` cases, or with from 1 to `min_cell` - 1 cases of a class, shows only
      that it was suppressed (its other counts and its rates would give the small count away: n minus the
      other class, or a rate's confidence interval);
    - when that hides exactly one level of the attribute, the smallest other level is hidden too: the cohort's
      totals minus the levels shown would otherwise give the hidden one's counts.
    A shown level gives n, both class counts (each 0 or at least `min_cell`), sensitivity where it has positives,
    specificity where it has negatives, and the AUC where it has both. The largest gap is the difference
    between the highest and lowest shown AUC (and sensitivity, and specificity).
    """
    y = np.asarray(y_true).astype(int)
    s = np.asarray(scores, dtype=float)
    lv = np.asarray(levels, dtype=object)
    rows = []
    for level in sorted(set(lv.tolist())):
        mask = lv == level
        n = int(mask.sum())
        if n < min_cell:
            rows.append({"level": level, "suppressed": True, "n": f"<{min_cell}"})
            continue
        yl, sl = y[mask], s[mask]
        positives, negatives = int(yl.sum()), int(n - yl.sum())
        if 0 < positives < min_cell or 0 < negatives < min_cell:
            rows.append({"level": level, "suppressed": True, "n": "suppressed"})
            continue
        point = operating_point(yl, sl, threshold)
        auc = auc_with_ci(yl, sl, checked=False)[0] if positives and negatives else NONE
        rows.append(
            {
                "level": level,
                "suppressed": False,
                "n": n,
                "positives": positives,
                "negatives": negatives,
                "auc": auc.to_json(),
                "sensitivity": (point.sensitivity if positives else NONE).to_json(),
                "specificity": (point.specificity if negatives else NONE).to_json(),
            }
        )
    hidden, shown_rows = [r for r in rows if r["suppressed"]], [r for r in rows if not r["suppressed"]]
    if len(hidden) == 1 and shown_rows:  # secondary suppression: see the docstring
        smallest = min(shown_rows, key=lambda r: (r["n"], r["level"]))
        rows[rows.index(smallest)] = {"level": smallest["level"], "suppressed": True, "n": "suppressed"}
    gaps = {}
    for metric in ("auc", "sensitivity", "specificity"):
        shown = [
            (r[metric]["value"], r["level"]) for r in rows if not r["suppressed"] and r[metric]["value"] is not None
        ]
        if len(shown) >= 2:
            (low, low_level), (high, high_level) = min(shown), max(shown)
            gaps[metric] = {"gap": _round(high - low), "lowest": low_level, "highest": high_level}
    return {"levels": rows, "largest_gap": gaps}
