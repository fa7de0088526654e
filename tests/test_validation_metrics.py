"""Validation metrics, predictions, manifest and cohort rules as pure functions: against scikit-learn's own
results, against the O(m n) definition of DeLong's method, and against worked examples."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.stats import rankdata
from sklearn.calibration import calibration_curve
from sklearn.metrics import brier_score_loss, roc_auc_score, roc_curve

from nccid.errors import SubmissionError
from nccid.validation import metrics
from nccid.validation.analysis import analyse
from nccid.validation.cohort import (
    ImageInfo,
    age_band,
    comorbidities,
    ethnicity_group,
    ground_truth,
    image_eligible,
    pick_images,
    sex_of,
)
from nccid.validation.manifest import load_manifest, parse_manifest
from nccid.validation.predictions import parse_predictions

EXAMPLE = {
    "name": "m",
    "version": "1",
    "vendor": "v",
    "intended_use": {
        "task": "covid19",
        "input": {"modalities": ["CR", "DX"], "views": ["PA", "AP"]},
        "unit": "patient",
        "population": {"min_age": 18, "max_age": None, "window_days": 30},
        "output": {"score": "probability in [0, 1]", "threshold": 0.5},
    },
    "entry": ["python3", "predict.py"],
}


def _vectors(seed: int = 0, n: int = 200):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    s = np.round(np.clip(rng.normal(0.4 + 0.25 * y, 0.2), 0, 1), 2)  # rounded: ties, as real scores have
    return y, s


# -- AUC and DeLong --------------------------------------------------------------------------------------
def test_auc_equals_scikit_learn_with_ties():
    for seed in range(5):
        y, s = _vectors(seed)
        auc, _ = metrics.auc_with_ci(y, s)
        assert auc.value == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        assert auc.low < auc.value < auc.high


def test_delong_components_match_their_definition():
    y, s = _vectors(7, 80)
    pos, neg = s[y == 1], s[y == 0]
    psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])  # the O(m n) definition
    auc, v10, v01 = metrics.delong_components(y, s)
    np.testing.assert_allclose(v10, psi.mean(axis=1))
    np.testing.assert_allclose(v01, psi.mean(axis=0))
    assert auc == pytest.approx(psi.mean())


@pytest.mark.parametrize("decimals", [1, 2, 8])
def test_delong_components_are_the_midrank_forms_floats(decimals):
    for seed in range(20):
        y, s = _vectors(seed, 30 + 11 * seed)
        s = np.round(s, decimals)  # one decimal: ties within and across the classes
        pos, neg = s[y == 1], s[y == 0]
        ranks = rankdata(np.r_[pos, neg])
        _, v10, v01 = metrics.delong_components(y, s)
        assert np.array_equal(v10, (ranks[: len(pos)] - rankdata(pos)) / len(neg))
        assert np.array_equal(v01, 1.0 - (ranks[len(pos) :] - rankdata(neg)) / len(pos))


def test_delong_interval_worked_example():
    # positives 0.9, 0.8, 0.4; negatives 0.7, 0.3. Placements V10 = (1, 1, 0.5), V01 = (2/3, 1).
    # AUC = 5/6; S10 = var(V10) = 1/12, S01 = var(V01) = 1/18; Var = S10/3 + S01/2 = 1/36 + 1/36 = 1/18;
    # SE = 0.2357; 95% CI = 0.8333 -/+ 1.95996 * 0.2357 = (0.3713, 1.2953) -> clipped to (0.3713, 1).
    auc, se = metrics.auc_with_ci([1, 1, 1, 0, 0], [0.9, 0.8, 0.4, 0.7, 0.3])
    assert auc.value == pytest.approx(5 / 6)
    assert se == pytest.approx(math.sqrt(1 / 18))
    assert auc.low == pytest.approx(5 / 6 - 1.959964 * math.sqrt(1 / 18), abs=1e-5)
    assert auc.low == pytest.approx(0.3713, abs=1e-4) and auc.high == 1.0


def test_auc_needs_both_classes():
    assert metrics.auc_with_ci([1, 1, 1], [0.2, 0.5, 0.9]) == (metrics.NONE, None)


def test_roc_points_are_scikit_learns_and_the_band_brackets_them():
    y, s = _vectors(3)
    roc = metrics.roc_with_band(y, s, replicates=200)
    fpr, tpr, _ = roc_curve(y, s)
    assert [p["fpr"] for p in roc["points"]] == [round(float(v), 4) for v in fpr]
    assert [p["tpr"] for p in roc["points"]] == [round(float(v), 4) for v in tpr]
    band = roc["band"]
    interpolated = np.interp(band["fpr"], fpr, tpr)
    inside = np.mean((np.array(band["low"]) <= interpolated + 1e-9) & (interpolated <= np.array(band["high"]) + 1e-9))
    assert inside > 0.95
    assert metrics.roc_with_band(y, s, replicates=200) == roc  # seeded: reproducible


def test_fast_roc_points_equal_scikit_learns():
    for seed in range(5):
        y, s = _vectors(seed, 120)
        fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
        mine = metrics.roc_points(np.asarray(y), np.asarray(s, dtype=float))
        np.testing.assert_allclose(mine[0], fpr)
        np.testing.assert_allclose(mine[1], tpr)


def test_roc_points_from_counts_interpolate_like_roc_points():
    rng = np.random.default_rng(3)
    distinct = 12  # scores 11/11 ... 0/11, highest first; some unused by a row, some shared by both classes
    positives, negatives = rng.integers(0, 3, (40, distinct)), rng.integers(0, 3, (40, distinct))
    positives[:, 0] += 1
    negatives[:, -1] += 1
    fpr, tpr = metrics.roc_points_from_counts(positives, negatives)
    grid = np.linspace(0, 1, 101)
    scores = np.arange(distinct - 1, -1, -1) / (distinct - 1)
    for row in range(len(positives)):
        labels = np.r_[np.ones(positives[row].sum(), int), np.zeros(negatives[row].sum(), int)]
        sample = np.r_[np.repeat(scores, positives[row]), np.repeat(scores, negatives[row])]
        f, t = metrics.roc_points(labels, sample)
        assert np.array_equal(np.interp(grid, fpr[row], tpr[row]), np.interp(grid, f, t))


# -- proportions, operating point, predictive values ---------------------------------------------------
def test_wilson_worked_examples():
    # 8/10: the textbook example (0.490, 0.943); 81/263: Newcombe (1998), Stat Med 17:857, method 3.
    eight = metrics.wilson(8, 10)
    assert (round(eight.low, 3), round(eight.high, 3)) == (0.490, 0.943)
    newcombe = metrics.wilson(81, 263)
    assert (round(newcombe.low, 4), round(newcombe.high, 4)) == (0.2553, 0.3662)
    zero = metrics.wilson(0, 10)
    assert zero.value == 0 and zero.low == pytest.approx(0, abs=1e-12) and zero.high == pytest.approx(0.2775, abs=1e-4)
    assert metrics.wilson(0, 0) == metrics.NONE


def test_operating_point_counts_and_predictive_values():
    point = metrics.operating_point([1, 1, 1, 0, 0, 0], [0.9, 0.5, 0.2, 0.6, 0.1, 0.5], 0.5)
    assert (point.tp, point.fn, point.tn, point.fp) == (2, 1, 1, 2)  # a score equal to the threshold is positive
    assert point.sensitivity.value == pytest.approx(2 / 3) and point.specificity.value == pytest.approx(1 / 3)
    ppv, npv = metrics.ppv_npv(0.9, 0.8, 0.1)  # 0.09 / (0.09 + 0.18); 0.72 / (0.72 + 0.01)
    assert ppv == pytest.approx(1 / 3) and npv == pytest.approx(0.72 / 0.73)
    rows = metrics.predictive_values(point, [0.1, 0.5])
    assert rows[1]["ppv"]["value"] == pytest.approx(0.5, abs=1e-4)
    assert all(r["ppv"]["low"] <= r["ppv"]["value"] <= r["ppv"]["high"] for r in rows)


@pytest.mark.parametrize("decimals", [2, 1])  # one decimal: every score on a bin edge
def test_calibration_matches_scikit_learn_and_suppresses_small_bins(decimals):
    y, s = _vectors(4, 400)
    s = np.round(s, decimals)
    cal = metrics.calibration(y, s, min_cell=10)
    assert cal["brier"] == round(brier_score_loss(y, s), 4)
    observed, predicted = calibration_curve(y, s, n_bins=10)
    counts = np.bincount(np.searchsorted(np.linspace(0, 1, 11)[1:-1], s), minlength=10)
    shown = [round(float(o), 4) for o, c in zip(observed, counts[counts > 0], strict=True) if c >= 10]
    assert [b["observed"] for b in cal["bins"]] == shown
    assert all(b["n"] >= 10 for b in cal["bins"])
    assert cal["suppressed_bins"] == int(np.sum((counts > 0) & (counts < 10)))
    assert len(predicted) == len(shown) + cal["suppressed_bins"]


def test_subgroups_suppress_small_cells_and_report_the_largest_gap():
    y, s = _vectors(5, 300)
    levels = np.where(np.arange(300) < 5, "tiny", np.where(np.arange(300) % 3 == 0, "third", "rest"))
    levels[5:40] = "mid"
    table = metrics.subgroups(y, s, levels.tolist(), 0.5, min_cell=10)
    rows = {r["level"]: r for r in table["levels"]}
    assert rows["tiny"] == {"level": "tiny", "suppressed": True, "n": "<10"}
    # tiny alone hidden would follow from the totals: the smallest other level (mid) is hidden with it
    assert rows["mid"] == {"level": "mid", "suppressed": True, "n": "suppressed"}
    for name in ("third", "rest"):
        mask = levels == name
        assert rows[name]["auc"]["value"] == round(roc_auc_score(y[mask], s[mask]), 4)
        assert rows[name]["positives"] + rows[name]["negatives"] == rows[name]["n"] == int(mask.sum())
    gap = table["largest_gap"]["auc"]
    assert gap["gap"] == pytest.approx(abs(rows["third"]["auc"]["value"] - rows["rest"]["auc"]["value"]), abs=2e-4)


def test_a_level_with_a_small_class_shows_nothing_that_gives_that_count_away():
    y = [1] * 24 + [0] * 6 + [1] * 30 + [0] * 30 + [1] * 20 + [0] * 20
    s = [0.9] * 30 + [0.6] * 60 + [0.4] * 40
    levels = ["60-79"] * 30 + ["40-59"] * 60 + ["18-39"] * 40
    rows = {r["level"]: r for r in metrics.subgroups(y, s, levels, 0.5, min_cell=10)["levels"]}
    # 6 negatives: n (30) less the positives, or the sensitivity's interval, would give them away
    assert rows["60-79"] == {"level": "60-79", "suppressed": True, "n": "suppressed"}
    assert rows["18-39"]["suppressed"] and not rows["40-59"]["suppressed"]  # secondary: the smallest other level
    shown = [r for r in rows.values() if not r["suppressed"]]
    assert all(r["positives"] in (0,) or r["positives"] >= 10 for r in shown)
    assert all(r["negatives"] in (0,) or r["negatives"] >= 10 for r in shown)


def test_a_level_of_one_class_shows_its_rate_and_no_auc():
    y, s = [1] * 23 + [0] * 40, [0.9] * 23 + [0.2] * 40
    rows = {r["level"]: r for r in metrics.subgroups(y, s, ["a"] * 23 + ["b"] * 40, 0.5, min_cell=10)["levels"]}
    assert (rows["a"]["n"], rows["a"]["positives"], rows["a"]["negatives"]) == (23, 23, 0)
    assert rows["a"]["sensitivity"]["value"] == 1.0 and rows["a"]["auc"]["value"] is None
    assert rows["a"]["specificity"]["value"] is None and rows["b"]["specificity"]["value"] == 1.0


# -- predictions ---------------------------------------------------------------------------------------
def test_malformed_and_partial_predictions_are_counted_not_dropped():
    cases = {f"case-{i}" for i in range(6)}
    text = "case,score\ncase-0,0.5\ncase-1,abc\ncase-2,1.5\ncase-9,0.3\ncase-0,0.7\ncase-3,nan\ncase-4\n\ncase-5,1\n"
    got = parse_predictions(text, cases)
    assert got.scores == {"case-0": 0.5, "case-5": 1.0}
    assert got.missing == 4
    assert dict(got.problems) == {
        "score not a number": 1,
        "score outside [0, 1]": 2,
        "unknown case": 1,
        "duplicate case (first score kept)": 1,
        "row without a score": 1,
    }
    no_header = parse_predictions("case-0,0.5\n", cases)
    assert no_header.missing == 6 and no_header.problems == {"no 'case,score' header": 1}


def test_analysis_counts_missing_predictions_by_class():
    truth = {f"c{i}": {"label": i % 2, "sex": "male"} for i in range(40)}
    predictions = parse_predictions("case,score\n" + "".join(f"c{i},{(i % 2) * 0.8}\n" for i in range(30)), set(truth))
    results = analyse(truth, predictions, 0.5)
    assert results["predictions"]["missing"] == 10
    assert results["predictions"]["missing_by_class"] == {"positives": 5, "negatives": 5}
    assert results["overall"]["n"] == 30 and results["overall"]["auc"]["value"] == 1.0


# -- manifest ------------------------------------------------------------------------------------------
def test_the_example_manifests_are_valid():
    for name in ("baseline", "coin-flip"):
        manifest = load_manifest(__import__("pathlib").Path(__file__).parents[1] / "examples" / "models" / name)
        assert manifest.intended_use.task == "covid19" and manifest.intended_use.modalities == ("CR", "DX")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"name": ""}, "field 'name' must be a non-empty string"),
        ({"name": "a/b"}, "field 'name' = 'a/b'"),
        ({"intended_use": {**EXAMPLE["intended_use"], "task": "cancer"}}, "'intended_use.task' = 'cancer'"),
        ({"intended_use": {**EXAMPLE["intended_use"], "unit": "image"}}, "'intended_use.unit' = 'image'"),
        (
            {"intended_use": {**EXAMPLE["intended_use"], "input": {"modalities": ["XA"]}}},
            "'intended_use.input.modalities': 'XA'",
        ),
        (
            {"intended_use": {**EXAMPLE["intended_use"], "output": {"score": "probability in [0, 1]", "threshold": 2}}},
            "'intended_use.output.threshold' = 2: must be in [0, 1]",
        ),
        (
            {"intended_use": {**EXAMPLE["intended_use"], "population": {"min_age": 80, "max_age": 18}}},
            "min_age is above max_age",
        ),
        ({"entry": []}, "field 'entry' must be a command"),
    ],
)
def test_manifest_errors_are_one_line_naming_the_field(change, message):
    with pytest.raises(SubmissionError) as caught:
        parse_manifest({**EXAMPLE, **change}, "sub/nccid-model.json")
    text = str(caught.value)
    assert text.startswith("sub/nccid-model.json: ") and message in text and "\n" not in text


def test_manifest_file_problems_name_the_file(tmp_path):
    with pytest.raises(SubmissionError, match=r"nccid-model\.json: missing"):
        load_manifest(tmp_path)
    (tmp_path / "nccid-model.json").write_text('{"name": "m",,}')
    with pytest.raises(SubmissionError, match=r"nccid-model.json: not valid JSON \(line 1"):
        load_manifest(tmp_path)
    (tmp_path / "nccid-model.json").write_text(json.dumps(EXAMPLE))
    assert load_manifest(tmp_path).entry == ("python3", "predict.py")


# -- cohort rules --------------------------------------------------------------------------------------
def test_ground_truth_rules():
    assert ground_truth("covid19", {"1st RT-PCR result": 1}, None) == (1, "")
    assert ground_truth("covid19", {"Final COVID Status": "RNA DETECTED (SARS-CoV-2)"}, None) == (1, "")
    assert ground_truth("covid19", {"Final COVID Status": "NOT DETECTED"}, None)[0] is None
    assert ground_truth("covid19", None, {"SwabStatus": 0}) == (0, "")
    assert ground_truth("covid19", {"1st RT-PCR result": 1}, {"SwabStatus": 0}) == (1, "")  # data_ wins
    assert ground_truth("covid19", None, {"SwabStatus": 1})[0] is None
    assert ground_truth("death", {"Death": 1}, None) == (1, "")
    assert ground_truth("itu_admission", {"ITU admission": 0}, None) == (0, "")
    assert ground_truth("death", None, {"SwabStatus": 0})[0] is None


def test_attribute_rules():
    assert [sex_of({"Sex": v}) for v in (1, 0, "F", "M", 2, None)] == [
        "male", "female", "female", "male", "unknown", "unknown",
    ]  # fmt: skip
    assert [ethnicity_group({"Ethnicity": v}) for v in ("A", "H", "N", "White British", "99", 3)] == [
        "White", "Asian", "Black", "White", "unknown", "unknown",
    ]  # fmt: skip
    bands = ["under 18", "18-39", "40-59", "60-79", "80+", "unknown"]
    assert [age_band(a) for a in (17, 18, 45, 79, 80, None)] == bands
    got = comorbidities({"PMH hypertension": 1, "PMH CKD": 2, "PMH Lung disease": 6, "PMH CVS disease": 0})
    assert got == {
        "hypertension": "yes",
        "diabetes": "unknown",
        "chronic kidney disease": "unknown",
        "cardiovascular disease": "no",
        "lung disease": "unknown",
    }
    assert set(comorbidities(None).values()) == {"not recorded (no positive test record)"}  # kept from 'unknown'


def test_opaque_dicom_keeps_the_pixels_and_replaces_every_identifier():
    import io

    import pydicom

    from nccid.synth.dicom import Subject, encode, xray
    from nccid.validation.cohort import opaque_dicom

    subject = Subject("Covid42", "Covid42", "F", 60, "1.2.826.1", "20200401", accession="ACC9")
    source = xray(subject, np.random.default_rng(0), scale=0.05, series_uid="1.2.826.2", sop_uid="1.2.826.3")
    header, tail = opaque_dicom(encode(source), "case-abc")
    ds = pydicom.dcmread(io.BytesIO(header + bytes(tail)))
    assert np.array_equal(ds.pixel_array, source.pixel_array)
    assert ds.PatientID == "case-abc" and str(ds.PatientName) == "case-abc" and "AccessionNumber" not in ds
    uids = {ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID}
    assert len(uids) == 3 and not uids & {"1.2.826.1", "1.2.826.2", "1.2.826.3"}
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert b"Covid42" not in header + bytes(tail) and b"1.2.826.3" not in header + bytes(tail)
    assert ds.Modality == "CR" and ds.ViewPosition == source.ViewPosition


def test_image_selection_first_frontal_in_window():
    use = parse_manifest(EXAMPLE).intended_use
    import datetime as dt

    swab = dt.date(2020, 4, 10)

    def image(key, view="PA", modality="CR", date="20200411", study="1.1"):
        return ImageInfo(key, "Covid1", study, modality, view, date, "X", "Y")

    assert image_eligible(image("a", view="LL"), use, swab) == "view outside the intended use"
    assert image_eligible(image("a", modality="CT"), use, swab) == "modality outside the intended use"
    late = image("a", date="20200601")
    assert image_eligible(late, use, swab) == "study date outside the window around the swab date"
    assert image_eligible(image("a"), use, None) == "no swab date to compare with the study date"
    assert image_eligible(image("a"), use, swab) == ""
    images = [image("b", date="20200412", study="1.2"), image("a", study="1.1"), image("c", study="1.1")]
    assert [i.key for i in pick_images(images, "patient")] == ["a"]
    assert [i.key for i in pick_images(images, "study")] == ["a", "b"]
