"""Synthetic data for validation: the planted sign of disease, and the synth defects of issue 14 (hospital names
that ignore the centre; `--days 1` writing two upload dates)."""

from __future__ import annotations

import io
import json
import random

import numpy as np
import openpyxl
import pydicom

from nccid.store import LocalStore
from nccid.synth.dicom import Subject, plant_opacities, xray
from nccid.synth.hospital import hospital_patient, hospital_site, pacs_image
from nccid.synth.national import HOSPITALS, SynthSpec, generate

SUBJECT = Subject("Covid1", "Covid1", "F", 60, "1.2.3", "20200401")


def _xray(signal: float, sop: str = "1.2.3.4.5") -> np.ndarray:
    ds = xray(SUBJECT, np.random.default_rng(0), scale=0.2, series_uid="1.2.3.4", sop_uid=sop, signal=signal)
    return ds.pixel_array.astype(np.int64)


def test_the_sign_of_disease_is_patchy_lower_zone_peripheral_and_scales_with_strength():
    plain, faint, strong = _xray(0.0), _xray(0.5), _xray(2.0)
    shadow = plain - strong  # MONOCHROME1: denser is lower
    assert shadow.max() > 1000 and (shadow > -1000).all()  # denser, give or take the shadow's grain
    rows, cols = shadow.shape
    lower = shadow[int(rows * 0.5) : int(rows * 0.78)]
    upper = shadow[: int(rows * 0.45)]
    assert lower.mean() > 20 * max(upper.mean(), 1)
    mirrored = shadow if shadow[:, : cols // 2].sum() else shadow[:, ::-1]  # films are flipped at random
    periphery = (
        mirrored[:, int(cols * 0.15) : int(cols * 0.36)].sum() + mirrored[:, int(cols * 0.64) : int(cols * 0.85)].sum()
    )
    assert periphery > 0.8 * mirrored.sum()  # peripheral, not central
    assert 0 < (plain - faint).sum() < shadow.sum()
    assert np.array_equal(_xray(0.0), plain)  # deterministic
    other = plain - _xray(2.0, sop="1.2.3.4.6")  # another patient: another pattern and extent
    assert not np.array_equal(other > 0, shadow > 0)


def test_plant_opacities_with_no_strength_changes_nothing():
    pixels = np.full((64, 48), 20000, dtype=np.uint16)
    assert plant_opacities(pixels, 0.0, "x") is pixels


def test_national_positives_carry_the_sign_and_negatives_do_not(tmp_path):
    store = LocalStore(tmp_path / "s")
    spec = SynthSpec(seed=2, patients=40, scale=0.05, imaged_fraction=1.0, xray_share=1.0, mr_share=0.0)
    generate(store, SynthSpec(**{**spec.__dict__, "awkward": False, "signal": 2.0}))
    label = {}
    for info in store.list():
        if "/data/" in info.key:
            record = json.loads(store.read(info.key))
            label[record["Pseudonym"]] = info.key.endswith("_data.json")
    lower_zone = {True: [], False: []}
    for info in store.list():
        if info.key.endswith(".dcm"):
            ds = pydicom.dcmread(io.BytesIO(store.read(info.key)))
            pixels = ds.pixel_array.astype(float)
            rows = pixels.shape[0]
            ratio = (
                pixels[int(rows * 0.55) : int(rows * 0.72)].mean() / pixels[int(rows * 0.2) : int(rows * 0.4)].mean()
            )
            lower_zone[label[ds.PatientID]].append(ratio)
    assert len(lower_zone[True]) > 5 and len(lower_zone[False]) > 5
    assert np.mean(lower_zone[True]) < np.mean(lower_zone[False])  # denser (lower values) where the sign is


def test_one_upload_day_writes_one_upload_date(tmp_path):
    store = LocalStore(tmp_path / "s")
    result = generate(store, SynthSpec(seed=1, patients=20, scale=0.03, days=1, ct_slices=(2, 2), mr_slices=(2, 2)))
    dates = {info.key.split("/")[1] for info in store.list() if info.key.startswith("raw-")}
    assert result.upload_dates == ["2020-04-06"] and dates == {"2020-04-06"}
    store3 = LocalStore(tmp_path / "s3")
    three = generate(store3, SynthSpec(seed=1, patients=20, scale=0.03, days=3, ct_slices=(2, 2), mr_slices=(2, 2)))
    assert len(three.upload_dates) == 3


def test_national_clinical_records_name_their_own_hospital(tmp_path):
    store = LocalStore(tmp_path / "s")
    generate(store, SynthSpec(seed=4, patients=40, scale=0.03, ct_slices=(2, 2), mr_slices=(2, 2), awkward=False))
    names = {h.centre: h.name for h in HOSPITALS}
    seen = set()
    for info in store.list():
        if "/data/" in info.key:
            record = json.loads(store.read(info.key))
            assert record["Hospital"] == names[record["SubmittingCentre"]]
            seen.add(record["Hospital"])
    assert len(seen) == 5


def test_a_hospital_sites_sheets_and_images_carry_its_own_name(tmp_path):
    riverside = HOSPITALS[1]
    site = hospital_site(str(tmp_path / riverside.uploader), patients=4, seed=1, template="negative", scale=0.05)
    sheet = openpyxl.load_workbook(site.sheets[0][0]).active
    header = [c.value for c in sheet[1]]
    column = header.index("Hospital")
    assert {row[column] for row in sheet.iter_rows(min_row=2, values_only=True)} == {riverside.name}
    for path in sorted((tmp_path / riverside.uploader / "pacs").glob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert ds.InstitutionName == riverside.name
        assert "NFG" not in ds.StationName and "Northfield" not in str(ds.InstitutionName)
    eastmoor = HOSPITALS[2]
    ds = pacs_image(hospital_patient(random.Random(1)), random.Random(1), hospital=eastmoor, scale=0.05)
    assert ds.InstitutionName == eastmoor.name and ds.StationName == "EDH-CT-01"
