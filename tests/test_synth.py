"""Synthetic data: deterministic, realistic in size and content, and carrying every awkward case."""

from __future__ import annotations

import json

import pydicom

from nccid.store import LocalStore
from nccid.synth.dicom import Subject, ct_slices, encode, xray
from nccid.synth.national import AWKWARD_CASES, SynthSpec, generate
from nccid.warehouse.config import load_config

CLINICAL_FIELDS = {"Pseudonym", "SubmittingCentre", "Hospital", "Age", "Sex", "Ethnicity"}


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    spec = SynthSpec(seed=5, patients=30, scale=0.03, ct_slices=(2, 3), mr_slices=(2, 2))
    runs = []
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        store = LocalStore(tmp_path / name)
        generate(store, SynthSpec(**{**spec.__dict__, "seed": seed}))
        runs.append({i.key: i.checksum for i in store.list()})
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_radiographs_and_ct_have_realistic_geometry():
    import numpy as np

    subject = Subject("Covid1", "Covid1", "M", 70, "1.2.3", "20200401")
    cr = xray(subject, np.random.default_rng(0), series_uid="1.2.3.4", sop_uid="1.2.3.4.5")
    assert 2000 <= cr.Rows <= 2600 and 1900 <= cr.Columns <= 2600
    assert cr.BitsAllocated == 16 and cr.Modality == "CR" and cr.BodyPartExamined == "CHEST"
    assert len(encode(cr)) > 7_000_000
    assert cr.pixel_array.std() > 1000  # a real chest radiograph's contrast, not a flat test pattern
    ct = ct_slices(subject, np.random.default_rng(0), slices=3, series_uid="1.2.3.9", uid_seed="x")
    assert [(d.Rows, d.Columns, d.InstanceNumber) for d in ct] == [
        (512, 512, 1),
        (512, 512, 2),
        (512, 512, 3),
    ]
    assert len({d.SOPInstanceUID for d in ct}) == 3 and {d.StudyInstanceUID for d in ct} == {"1.2.3"}


def test_national_dataset_has_every_awkward_case_and_a_valid_config(tmp_path):
    store = LocalStore(tmp_path / "s")
    result = generate(store, SynthSpec(seed=1, patients=60, scale=0.03, ct_slices=(2, 3), mr_slices=(2, 2)))
    assert set(AWKWARD_CASES) <= set(result.cases), set(AWKWARD_CASES) - set(result.cases)
    config = load_config(store)
    assert "St Elsewhere General" not in config.sites
    assert "raw-elsewhere/" in config.raw_prefixes
    records = [i.key for i in store.list() if i.key.endswith((".json",)) and "/data/" in i.key]
    assert len(records) == result.clinical_records + 2  # + the invalid-JSON and name-mismatch cases
    good = [json.loads(store.read(k)) for k in records if k not in result.cases["invalid_json"]]
    assert all(set(r) >= CLINICAL_FIELDS or "SwabStatus" in r for r in good)
    positives = [r for r in good if "Date of Positive Covid Swab" in r]
    assert positives and all("CXR severity" in r or "CXR severity 3" in r for r in positives)
    negatives = [r for r in good if "SwabStatus" in r]
    assert negatives
    for key in (k for k in store.list() if k.key.endswith(".dcm") and "images/" in k.key):
        if key.key in result.cases["not_dicom"] + result.cases["truncated"]:
            continue
        ds = pydicom.dcmread(store.open(key.key), stop_before_pixels=True)
        assert ds.PatientIdentityRemoved == "YES"
        if "PatientID" in ds:
            assert ds.PatientID.startswith("Covid")
