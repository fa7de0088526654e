"""Statistics checked against counts worked out by hand for a small set."""

from __future__ import annotations

import csv
import io
import json

from helpers import TRAINING_SITE, VALIDATION_SITE, configure, image, put_clinical, put_image

from nccid.stats.summary import LATEST_KEY, compute, publish
from nccid.synth.dicom import encode
from nccid.warehouse.loader import load


def build(store, catalog):
    """Covid1 and Covid14 are split (training / validation); Covid20 and Covid149 come from fixed sites."""
    configure(store)
    put_clinical(store, "Covid1", date="2020-04-01", kind="status", SwabStatus=0)
    put_clinical(store, "Covid1", date="2020-04-08", kind="data")  # latest: the data file -> positive
    put_clinical(store, "Covid14", date="2020-04-01", kind="status", SwabStatus=0)
    put_clinical(store, "Covid14", date="2020-04-08", kind="status", SwabStatus=1)  # latest status positive
    put_clinical(store, "Covid20", centre=TRAINING_SITE)
    put_clinical(store, "Covid149", centre=VALIDATION_SITE, kind="status", SwabStatus=0)
    put_image(store, "Covid1", "1.1", "1.1.1", "1.1.1.1", modality="CR")
    for n, ds in enumerate(image("Covid1", "1.2", "1.2.1", "1.2.1.1", modality="CT", slices=2)):
        store.write(f"raw-site/2020-04-01/images/ct{n}.dcm", encode(ds))
    put_image(store, "Covid20", "1.3", "1.3.1", "1.3.1.1", modality="DX")
    put_image(store, "Covid149", "1.4", "1.4.1", "1.4.1.1", modality="MR")
    put_image(store, "Covid77", "1.5", "1.5.1", "1.5.1.1")  # pending: never counted
    load(store, catalog, workers=1)


def test_headline_summary_matches_hand_counts(store, catalog):
    build(store, catalog)
    stats = compute(store, catalog, date="2020-05-01")
    assert stats.summary["training"] == {
        "centres": 2,
        "patients": 2,
        "patients_with_images": 2,
        "positive": 2,
        "negative": 0,
        "xray_studies": 2,
        "ct_studies": 1,
        "mri_studies": 0,
        "xray_images": 2,
        "ct_images": 2,
        "mri_images": 0,
    }
    assert stats.summary["validation"] == {
        "centres": 2,
        "patients": 2,
        "patients_with_images": 1,
        "positive": 1,
        "negative": 1,
        "xray_studies": 0,
        "ct_studies": 0,
        "mri_studies": 1,
        "xray_images": 0,
        "ct_images": 0,
        "mri_images": 1,
    }
    assert stats.summary["all"] == {
        "centres": 3,
        "patients": 4,
        "patients_with_images": 3,
        "positive": 3,
        "negative": 1,
        "xray_studies": 2,
        "ct_studies": 1,
        "mri_studies": 1,
        "xray_images": 2,
        "ct_images": 2,
        "mri_images": 1,
    }


def test_patient_table_uses_the_latest_record(store, catalog):
    build(store, catalog)
    rows = {r["Pseudonym"]: r for r in compute(store, catalog).patients}
    assert set(rows) == {"Covid1", "Covid14", "Covid20", "Covid149"}
    assert rows["Covid1"]["latest_record"] == "training/data/Covid1/data_2020-04-08.json"
    assert (rows["Covid1"]["first_upload"], rows["Covid1"]["last_upload"]) == ("2020-04-01", "2020-04-08")
    assert (rows["Covid1"]["xray_studies"], rows["Covid1"]["ct_studies"]) == (1, 1)
    assert rows["Covid14"]["latest_record"] == "validation/data/Covid14/status_2020-04-08.json"
    assert rows["Covid14"]["covid_status"] == "positive"
    assert rows["Covid149"]["covid_status"] == "negative"
    assert rows["Covid20"]["SubmittingCentre"] == TRAINING_SITE and rows["Covid20"]["group"] == "training"


def test_study_tables_have_one_row_per_study_with_the_dashboard_columns(store, catalog):
    build(store, catalog)
    studies = compute(store, catalog).studies
    assert [(r["Pseudonym"], r["StudyInstanceUID"], r["Modality"]) for r in studies["xray"]] == [
        ("Covid1", "1.1", "CR"),
        ("Covid20", "1.3", "DX"),
    ]
    (ct,) = studies["ct"]
    assert ct == {
        "Pseudonym": "Covid1",
        "group": "training",
        "PatientSex": "F",
        "PatientAge": "061Y",
        "StudyDate": "20200402",
        "StudyInstanceUID": "1.2",
        "BodyPartExamined": "CHEST",
        "Manufacturer": ct["Manufacturer"],
        "ManufacturerModelName": ct["ManufacturerModelName"],
        "Modality": "CT",
        "images": 2,
    }
    assert ct["Manufacturer"]
    assert [r["group"] for r in studies["mri"]] == ["validation"]


def test_storage_and_published_tables(store, catalog):
    build(store, catalog)
    stats = compute(store, catalog, date="2020-05-01")
    storage = {r["prefix"]: r for r in stats.storage}
    for prefix, row in storage.items():
        listed = list(store.list(prefix))
        assert (row["objects"], row["bytes"]) == (len(listed), sum(i.size for i in listed)), prefix
    assert storage["training/data/"]["objects"] == 3 and storage["validation/mri/"]["objects"] == 1
    prefix = publish(store, stats)
    assert prefix == "stats/2020-05-01/"
    assert json.loads(store.read(LATEST_KEY))["prefix"] == prefix
    patients = list(csv.DictReader(io.StringIO(store.read(prefix + "patients.csv").decode())))
    assert len(patients) == 4
    summary = json.loads(store.read(prefix + "summary.json"))
    assert summary["all"]["patients"] == 4
    for name in ("xray", "ct", "mri", "storage", "summary", "patients"):
        assert store.exists(f"{prefix}{name}.csv") and store.exists(f"{prefix}{name}.json")
