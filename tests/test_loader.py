"""The warehouse loader on hand-made raw uploads: exact keys, every outcome, groups that never change."""

from __future__ import annotations

import json

import pydicom
import pytest
from conftest import (
    SPLIT_SITE,
    TRAINING_SITE,
    VALIDATION_SITE,
    configure,
    image,
    listing,
    put_clinical,
    put_image,
)

from nccid.synth.dicom import encode
from nccid.warehouse.loader import load
from nccid.warehouse.rebuild import rebuild_catalog

# Covid1 and Covid20 fall in training at 50 %, Covid14 and Covid149 in validation (the reference rule).
S1, SE1, I1 = "1.2.826.1", "1.2.826.1.1", "1.2.826.1.1.1"
S2, SE2 = "1.2.826.2", "1.2.826.2.1"


def outcomes(report) -> dict[str, str]:
    return {item["key"]: item["outcome"] for item in report.items}


def test_processed_keys_of_a_small_set_exactly(store, catalog):
    configure(store)
    put_clinical(store, "Covid1", kind="data")
    put_clinical(store, "Covid14", kind="status", date="2020-04-02", SwabStatus=0)
    put_image(store, "Covid1", S1, SE1, I1, name="pacs/export/IMG0001.dcm")
    ct = image("Covid14", S2, SE2, "1.2.826.2.1", modality="CT", slices=2)
    for n, ds in enumerate(ct):
        store.write(f"raw-site/2020-04-02/images/ct/{n}.dcm", encode(ds))
    mr = image("Covid14", "1.2.826.3", "1.2.826.3.1", "1.2.826.3.1", modality="MR", slices=1)[0]
    store.write("raw-site/2020-04-02/images/mr.dcm", encode(mr))

    report = load(store, catalog, workers=1)

    processed = sorted(k for k in listing(store) if k.startswith(("training/", "validation/")))
    sops = [ds.SOPInstanceUID for ds in ct]
    assert processed == sorted(
        [
            "training/data/Covid1/data_2020-04-01.json",
            f"training/xray/Covid1/{S1}/{SE1}/{I1}.dcm",
            f"training/xray-metadata/Covid1/{S1}/{SE1}/{I1}.json",
            "validation/data/Covid14/status_2020-04-02.json",
            *[f"validation/ct/Covid14/{S2}/{SE2}/{sop}.dcm" for sop in sops],
            *[f"validation/ct-metadata/Covid14/{S2}/{SE2}/{sop}.json" for sop in sops],
            "validation/mri/Covid14/1.2.826.3/1.2.826.3.1/1.2.826.3.1.dcm",
            "validation/mri-metadata/Covid14/1.2.826.3/1.2.826.3.1/1.2.826.3.1.json",
        ]
    )
    assert report.counts == {"filed": 6}
    # the stored image is the uploaded bytes, unchanged
    assert store.read(f"training/xray/Covid1/{S1}/{SE1}/{I1}.dcm") == store.read(
        "raw-site/2020-04-01/images/pacs/export/IMG0001.dcm"
    )
    # the run report is in the store
    doc = json.loads(store.read(report.report_key))
    assert doc["counts"] == {"filed": 6} and doc["images_filed"] == 4


def test_site_rules_and_the_split_decide_groups(store, catalog):
    configure(store)
    put_clinical(store, "Covid14", centre=TRAINING_SITE)  # split would say validation
    put_clinical(store, "Covid1", centre=VALIDATION_SITE)  # split would say training
    put_clinical(store, "Covid20", centre=SPLIT_SITE)
    put_clinical(store, "Covid149", centre=SPLIT_SITE)
    load(store, catalog, workers=1)
    keys = set(listing(store))
    assert {
        "training/data/Covid14/data_2020-04-01.json",
        "validation/data/Covid1/data_2020-04-01.json",
        "training/data/Covid20/data_2020-04-01.json",
        "validation/data/Covid149/data_2020-04-01.json",
    } <= keys


def test_a_patients_group_never_changes(store, catalog):
    configure(store, pct=50)
    put_clinical(store, "Covid14", date="2020-04-01", kind="status", SwabStatus=0)
    load(store, catalog, workers=1)
    # the rules change so that a new decision would say training; a later record must not move the patient
    configure(store, pct=100)
    put_clinical(store, "Covid14", date="2020-05-01", kind="data")
    put_image(store, "Covid14", S1, SE1, I1, date="2020-05-01")
    report = load(store, catalog, workers=1)
    keys = set(listing(store))
    assert "validation/data/Covid14/data_2020-05-01.json" in keys
    assert f"validation/xray/Covid14/{S1}/{SE1}/{I1}.dcm" in keys
    assert not any(k.startswith("training/") for k in keys)
    assert report.counts["filed"] == 2


def test_records_that_disagree_on_a_new_patients_group_are_held_not_guessed(store, catalog):
    configure(store, uploaders=("a", "b"))
    ka = put_clinical(store, "Covid5", centre=TRAINING_SITE, uploader="a")
    kb = put_clinical(store, "Covid5", centre=VALIDATION_SITE, uploader="b", kind="status")
    report = load(store, catalog, workers=1)
    assert outcomes(report) == {ka: "held", kb: "held"}
    assert "disagree" in report.items[0]["reason"] and "Training Hospital" in report.items[0]["reason"]
    assert not any(k.startswith(("training/", "validation/")) for k in listing(store))
    # the data manager decides by fixing a record: the held records are looked at again
    store.write(kb, json.dumps({"Pseudonym": "Covid5", "SubmittingCentre": TRAINING_SITE}).encode())
    report = load(store, catalog, workers=1)
    assert report.counts["filed"] == 2
    assert {
        "training/data/Covid5/data_2020-04-01.json",
        "training/data/Covid5/status_2020-04-01.json",
    } <= set(listing(store))


def test_images_before_their_clinical_record_are_pending_then_filed(store, catalog):
    configure(store)
    key = put_image(store, "Covid20", S1, SE1, I1, date="2020-04-01")
    report = load(store, catalog, workers=1)
    assert outcomes(report) == {key: "pending"}
    assert "no clinical record for Covid20" in report.items[0]["reason"]
    assert report.outstanding == {"pending": 1}
    put_clinical(store, "Covid20", date="2020-04-08")
    report = load(store, catalog, workers=1)
    assert report.counts == {"filed": 2}
    assert f"training/xray/Covid20/{S1}/{SE1}/{I1}.dcm" in listing(store)
    assert report.outstanding == {}


def test_the_same_image_again_is_a_duplicate_and_changed_bytes_are_a_conflict(store, catalog):
    configure(store)
    put_clinical(store, "Covid1")
    first = put_image(store, "Covid1", S1, SE1, I1, date="2020-04-01")
    load(store, catalog, workers=1)
    filed = f"training/xray/Covid1/{S1}/{SE1}/{I1}.dcm"
    original = store.read(filed)
    again = put_image(store, "Covid1", S1, SE1, I1, date="2020-04-08", name="again.dcm")
    changed = put_image(store, "Covid1", S1, SE1, I1, date="2020-04-08", name="changed.dcm", seed=99)
    report = load(store, catalog, workers=1)
    assert outcomes(report) == {again: "duplicate", changed: "conflict"}
    reasons = {i["key"]: i["reason"] for i in report.items}
    assert first in reasons[again]
    assert I1 in reasons[changed] and "different content" in reasons[changed]
    assert store.read(filed) == original  # never overwritten
    assert report.outstanding == {"conflict": 1}


def test_each_quarantine_reason(store, catalog):
    configure(store)
    put_clinical(store, "Covid1")
    good = image("Covid1", S1, SE1, I1)[0]
    raw = encode(good)
    cases = {}

    def put(name, data):
        key = f"raw-site/2020-04-01/images/{name}"
        store.write(key, data)
        return key

    cases[put("truncated-pixels.dcm", raw[: len(raw) - 100])] = "truncated: Pixel Data (7FE0,0010)"
    cases[put("truncated-header.dcm", raw[:400])] = "truncated"
    cases[put("notes.dcm", b"just some text\n" * 20)] = "not a DICOM Part 10 file"
    cases[put("empty.dcm", b"")] = "not a DICOM Part 10 file"
    for keyword, tag in [
        ("PatientID", "(0010,0020)"),
        ("SOPInstanceUID", "(0008,0018)"),
        ("StudyInstanceUID", "(0020,000D)"),
        ("Modality", "(0008,0060)"),
    ]:
        ds = image("Covid1", S1, SE1, I1 + "9")[0]
        delattr(ds, keyword)
        cases[put(f"no-{keyword}.dcm", encode(ds))] = f"missing {keyword} {tag}"
    for modality in ("SR", "OT", "US"):
        ds = image("Covid1", S1, SE1, I1 + "8")[0]
        ds.Modality = modality
        cases[put(f"{modality}.dcm", encode(ds))] = f"unsupported Modality (0008,0060) '{modality}'"
    ds = image("Covid1", S1, SE1, I1 + "7")[0]
    ds.PatientID = "9434765919"  # an NHS number: de-identification failed at the site
    cases[put("nhs.dcm", encode(ds))] = "PatientID (0010,0020) is not a pseudonym"
    ds = image("Covid1", S1, SE1, I1 + "6")[0]
    ds.SeriesInstanceUID = "../../etc"
    cases[put("bad-uid.dcm", encode(ds))] = "invalid SeriesInstanceUID (0020,000E)"

    report = load(store, catalog, workers=1)
    reasons = {i["key"]: (i["outcome"], i["reason"]) for i in report.items}
    for key, expected in cases.items():
        assert reasons[key][0] == "quarantined", key
        assert expected in reasons[key][1], (key, reasons[key])
    assert report.counts == {"filed": 1, "quarantined": len(cases)}
    assert not any(".." in k for k in listing(store))
    # quarantined files stay where the site put them: nothing is lost
    assert all(store.exists(k) for k in cases)


def test_clinical_records_are_held_with_a_reason(store, catalog):
    configure(store)
    cases = {}
    key = "raw-site/2020-04-01/data/Covid2_data.json"
    store.write(key, b'{"Pseudonym": "Covid2",, }')
    cases[key] = "invalid JSON at line 1 column"
    key = "raw-site/2020-04-01/data/Covid3_data.json"
    store.write(key, json.dumps({"Pseudonym": "Covid4", "SubmittingCentre": SPLIT_SITE}).encode())
    cases[key] = "file name says Covid3 but field 'Pseudonym' is 'Covid4'"
    cases[put_clinical(store, "Covid5", centre="St Elsewhere")] = "SubmittingCentre 'St Elsewhere' is not configured"
    key = "raw-site/2020-04-01/data/Covid6_status.json"
    store.write(key, json.dumps({"SubmittingCentre": SPLIT_SITE}).encode())
    cases[key] = "missing field 'Pseudonym'"
    key = "raw-site/2020-04-01/data/Covid7_status.json"
    store.write(key, json.dumps({"Pseudonym": "Covid7"}).encode())
    cases[key] = "missing field 'SubmittingCentre'"
    key = "raw-site/2020-04-01/data/notes.json"
    store.write(key, b"{}")
    cases[key] = "clinical file names are <Pseudonym>_data.json"
    key = "raw-site/2020-04-01/data/1234567890_data.json"
    store.write(key, b"{}")
    cases[key] = "not a pseudonym"
    key = "raw-site/2020-04-01/data/Covid8_data.json"
    store.write(key, b"[1, 2]")
    cases[key] = "expected a JSON object"
    key = "raw-site/not-a-date/data/Covid9_data.json"
    store.write(key, b"{}")
    cases[key] = "not an upload date"

    report = load(store, catalog, workers=1)
    reasons = {i["key"]: (i["outcome"], i["reason"]) for i in report.items}
    for key, expected in cases.items():
        assert reasons[key][0] == "held", key
        assert expected in reasons[key][1], (key, reasons[key])
    assert not any(k.startswith(("training/", "validation/")) for k in listing(store))


def test_configuring_a_centre_releases_its_held_records_and_pending_images(store, catalog):
    configure(store)
    put_clinical(store, "Covid20", centre="St Elsewhere")
    img = put_image(store, "Covid20", S1, SE1, I1)
    report = load(store, catalog, workers=1)
    assert outcomes(report)[img] == "pending"
    assert "is held: SubmittingCentre 'St Elsewhere' is not configured" in report.items[-1]["reason"]
    configure(store, split=[SPLIT_SITE, "St Elsewhere"])
    report = load(store, catalog, workers=1)
    assert report.counts == {"filed": 2}
    assert f"training/xray/Covid20/{S1}/{SE1}/{I1}.dcm" in listing(store)


def test_a_second_run_is_a_no_op_and_a_dry_run_writes_nothing(store, catalog, tmp_path):
    configure(store)
    put_clinical(store, "Covid1")
    put_image(store, "Covid1", S1, SE1, I1)
    put_image(store, "Covid77", S2, SE2, "1.2.826.2.1.1")  # pending
    dry = load(store, catalog, dry_run=True, workers=1)
    assert dry.counts == {"filed": 2, "pending": 1} and dry.report_key == ""
    assert not any(k.startswith(("training/", "validation/", "reports/")) for k in listing(store))
    assert catalog.outcome_counts() == {}
    load(store, catalog, workers=1)
    before = {k: v for k, v in listing(store).items() if not k.startswith("reports/")}
    again = load(store, catalog, workers=1)
    assert again.counts == {} and again.unchanged == 3 and again.images_filed == 0
    after = {k: v for k, v in listing(store).items() if not k.startswith("reports/")}
    assert after == before


def test_metadata_json_round_trips_to_the_stored_header_without_bulk_data(store, catalog):
    configure(store)
    put_clinical(store, "Covid1")
    ds = image("Covid1", S2, SE2, "1.2.826.2.1", modality="CT", slices=1)[0]
    icon = pydicom.Dataset()
    icon.Rows, icon.Columns, icon.SamplesPerPixel, icon.PhotometricInterpretation = 64, 64, 1, "MONOCHROME2"
    icon.BitsAllocated, icon.BitsStored, icon.HighBit, icon.PixelRepresentation = 8, 8, 7, 0
    icon.PixelData = b"\x00" * 4096
    ds.IconImageSequence = [icon]
    store.write("raw-site/2020-04-01/images/ct.dcm", encode(ds))
    load(store, catalog, workers=1)
    key = f"training/ct/Covid1/{S2}/{SE2}/1.2.826.2.1.dcm"
    meta = pydicom.Dataset.from_json(store.read(f"training/ct-metadata/Covid1/{S2}/{SE2}/1.2.826.2.1.json"))
    stored = pydicom.dcmread(store.open(key), stop_before_pixels=True)
    assert "PixelData" not in meta and "PixelData" not in meta.IconImageSequence[0]
    assert meta.IconImageSequence[0].Rows == 64
    del stored.IconImageSequence
    del meta.IconImageSequence
    assert meta == stored  # every other element, value for value
    assert meta.PatientID == "Covid1" and meta.RescaleIntercept == -1024


def test_rebuild_catalog_from_the_store_alone(store, tmp_path):
    from nccid.warehouse.catalog import Catalog

    configure(store)
    put_clinical(store, "Covid1")
    put_clinical(store, "Covid14", kind="status", SwabStatus=0)
    put_image(store, "Covid1", S1, SE1, I1)
    put_image(store, "Covid1", S1, SE1, I1, name="again.dcm")
    put_image(store, "Covid99", S2, SE2, "1.2.826.2.1.1")
    store.write("raw-site/2020-04-01/images/bad.dcm", b"nope")
    first = Catalog(tmp_path / "a.sqlite")
    load(store, first, workers=1)
    expected = first.outcome_counts()
    patients = first.query("SELECT pseudonym, grp FROM patients ORDER BY 1")
    instances = first.query("SELECT sop, dest, checksum, patient, grp, modality, sex, age FROM instances")
    first.close()

    rebuilt_path = tmp_path / "b.sqlite"
    rebuild_catalog(store, rebuilt_path, workers=1)
    rebuilt = Catalog(rebuilt_path)
    assert rebuilt.outcome_counts() == expected
    assert rebuilt.query("SELECT pseudonym, grp FROM patients ORDER BY 1") == patients
    assert rebuilt.query("SELECT sop, dest, checksum, patient, grp, modality, sex, age FROM instances") == instances
    assert rebuilt.query("SELECT COUNT(*) FROM runs")[0][0] == 1
    before = listing(store)
    report = load(store, rebuilt, workers=1)
    assert report.counts == {} and report.images_filed == 0
    assert {k: v for k, v in listing(store).items() if not k.startswith("reports/")} == {
        k: v for k, v in before.items() if not k.startswith("reports/")
    }
    rebuilt.close()


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_parallel_workers_give_the_same_store_as_one(tmp_path, make_store, backend):
    from nccid.synth.national import SynthSpec, generate
    from nccid.warehouse.catalog import Catalog

    results = []
    for workers in (1, 2):
        store = make_store(backend, f"s{workers}")
        generate(store, SynthSpec(seed=3, patients=40, scale=0.03, ct_slices=(3, 6), mr_slices=(2, 3)))
        cat = Catalog(tmp_path / f"c{workers}.sqlite")
        report = load(store, cat, workers=workers)
        cat.close()
        results.append(({k: v for k, v in listing(store).items() if not k.startswith("reports/")}, dict(report.counts)))
    assert results[0] == results[1]
