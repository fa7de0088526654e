"""The validation harness's faster ways of doing things give exactly what the plain ways give: the Wilson interval
as SciPy's binomtest computes it, the vectorised bootstrap ROC band as a replicate-by-replicate loop, the subgroup
AUC as scikit-learn's, the header writer as pydicom's save_as, and the kernel-copied inputs as the stored image
with an opaque header."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pydicom
import pytest
from scipy.stats import binomtest, norm
from sklearn.metrics import roc_auc_score

from nccid.store import LocalStore
from nccid.synth.dicom import Subject, encode, xray
from nccid.validation import cohort as cohort_module
from nccid.validation import metrics
from nccid.validation.cohort import Case, Cohort, input_manifest, opaque_dicom, write_inputs


def _vectors(seed: int, n: int, decimals: int):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    y[:2] = (0, 1)
    s = np.round(np.clip(rng.normal(0.4 + 0.25 * y, 0.25), 0, 1), decimals)  # few decimals: many ties
    return y, s


def test_wilson_bounds_are_scipys_binomtest_bounds_to_the_last_bit():
    assert float(norm.ppf(0.975)) == metrics.Z95
    for trials in range(1, 70):
        for successes in range(trials + 1):
            interval = binomtest(successes, trials).proportion_ci(confidence_level=0.95, method="wilson")
            estimate = metrics.wilson(successes, trials)
            assert (estimate.low, estimate.high) == (float(interval.low), float(interval.high)), (successes, trials)
            assert estimate.value == successes / trials


def _band_one_replicate_at_a_time(y, s, seed: int, replicates: int, grid: int = 101):
    """The band as first written: rng.choice per class, roc_points and np.interp per replicate."""
    y, s = np.asarray(y).astype(int), np.asarray(s, dtype=float)
    fgrid = np.linspace(0, 1, grid)
    rng = np.random.default_rng(seed)
    pos, neg = s[y == 1], s[y == 0]
    both = np.r_[np.ones(len(pos), int), np.zeros(len(neg), int)]
    curves = np.empty((replicates, grid))
    for r in range(replicates):
        sample = np.r_[rng.choice(pos, len(pos)), rng.choice(neg, len(neg))]
        f, t = metrics.roc_points(both, sample)
        curves[r] = np.interp(fgrid, f, t)
    return np.percentile(curves, [2.5, 97.5], axis=0)


@pytest.mark.parametrize("decimals", [1, 2, 6])
def test_vectorised_bootstrap_band_equals_the_replicate_loop(decimals):
    for seed in range(4):
        y, s = _vectors(seed, 40 + 30 * seed, decimals)
        low, high = _band_one_replicate_at_a_time(y, s, seed, 60)
        band = metrics.roc_with_band(y, s, seed=seed, replicates=60)["band"]
        assert band["low"] == [metrics._round(v) for v in low]
        assert band["high"] == [metrics._round(v) for v in high]


def test_bootstrap_points_interpolate_like_each_replicates_roc_points():
    rng = np.random.default_rng(5)
    samples = np.round(rng.random((30, 25)), 1)  # ties within and across classes
    fpr, tpr = metrics.bootstrap_roc_points(samples, 12)
    labels = np.r_[np.ones(12, int), np.zeros(13, int)]
    grid = np.linspace(0, 1, 101)
    for row in range(len(samples)):
        f, t = metrics.roc_points(labels, samples[row])
        assert np.array_equal(np.interp(grid, fpr[row], tpr[row]), np.interp(grid, f, t))


def test_subgroup_auc_is_scikit_learns():
    y, s = _vectors(1, 120, 2)
    levels = np.where(np.arange(120) % 3 == 0, "a", "b")
    table = metrics.subgroups(y, s, levels, 0.5, min_cell=10)
    for row in table["levels"]:
        mask = levels == row["level"]
        assert row["auc"]["value"] == round(roc_auc_score(y[mask], s[mask]), 4)
    unchecked, se = metrics.auc_with_ci(y, s, checked=False)
    assert unchecked.value == pytest.approx(roc_auc_score(y, s), abs=1e-12) and se > 0


def _source(transfer_syntax=None) -> bytes:
    subject = Subject("Covid42", "Covid42", "F", 60, "1.2.826.1", "20200401", accession="ACC9")
    ds = xray(subject, np.random.default_rng(0), scale=0.05, series_uid="1.2.826.2", sop_uid="1.2.826.3")
    if transfer_syntax is None:
        return encode(ds)
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True, implicit_vr=True, little_endian=True)
    return out.getvalue()


@pytest.mark.parametrize("syntax", [None, pydicom.uid.ImplicitVRLittleEndian])
def test_fast_header_writer_gives_pydicoms_save_as_bytes(monkeypatch, syntax):
    data = _source(syntax)
    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    uids = iter(["1.2.3.1", "1.2.3.2", "1.2.3.3"])
    monkeypatch.setattr(cohort_module, "generate_uid", lambda: next(uids))
    header = cohort_module._opaque_header(ds, "case-abc")
    expected = io.BytesIO()
    ds.save_as(expected, enforce_file_format=True)  # the same dataset, now opaque, written by pydicom's own way
    assert header == expected.getvalue()
    assert ds.PatientID == "case-abc" and ds.SOPInstanceUID == "1.2.3.3"


class _RemoteLike(LocalStore):
    """A local store that says it is remote: the materialisation then fetches whole objects, as from S3."""

    remote = True


@pytest.mark.parametrize("store_class", [LocalStore, _RemoteLike])
def test_materialised_file_is_the_stored_image_with_an_opaque_header(tmp_path, store_class):
    store = store_class(tmp_path / "store")
    data = _source()
    store.write("validation/xray/Covid42/1.2.826.1/1.2.826.2/1.2.826.3.dcm", data)
    case = Case("case-0123456789ab", "validation/xray/Covid42/1.2.826.1/1.2.826.2/1.2.826.3.dcm", 1, {})
    write_inputs(store, Cohort([case]), tmp_path / "input")
    manifest = input_manifest(Cohort([case]), tmp_path / "input")
    written = (tmp_path / "input" / case.case / "image-1.dcm").read_bytes()
    _, tail = opaque_dicom(data, case.case)  # its header has other fresh random UIDs (their lengths vary)
    assert written.endswith(bytes(tail)) and written[128:132] == b"DICM"  # a new header, then the pixels as stored
    ds = pydicom.dcmread(io.BytesIO(written))
    assert np.array_equal(ds.pixel_array, pydicom.dcmread(io.BytesIO(data)).pixel_array)
    assert ds.PatientID == case.case and b"Covid42" not in written and b"1.2.826.3" not in written
    assert manifest["cases"] == [{"case": case.case, "key": case.key, "sha256": hashlib.sha256(written).hexdigest()}]
    assert sorted(p.name for p in (tmp_path / "input").iterdir()) == [case.case]
    assert (tmp_path / "input").stat().st_mode & 0o777 == 0o555
