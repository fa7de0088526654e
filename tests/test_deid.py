"""DICOM de-identification and the gate that checks it: identifiers everywhere go, what the statistics need
stays, UIDs and dates stay consistent across a re-send, and a planted identifier is caught."""

from __future__ import annotations

import copy
import datetime as dt
import io
import random
import re

import pydicom
import pytest
from helpers import run_cli

from nccid.site.deid import EXACT_ACTIONS, PROFILE_EDITION, DeidHeld, DeidKeys, deidentify, profile_action
from nccid.site.gate import scan
from nccid.site.vault import PseudonymKey
from nccid.synth.dicom import encode
from nccid.synth.hospital import hospital_patient, nhs_number, pacs_image

KEY = PseudonymKey.generate()
KEYS = DeidKeys.derive(KEY.key)


@pytest.fixture
def person():
    return hospital_patient(random.Random(4))


def _roundtrip(ds):
    """Through bytes, as a file on the site node would go."""
    return pydicom.dcmread(io.BytesIO(encode(ds)))


def test_the_profile_table_comes_from_the_standard_not_a_short_hand_list():
    assert PROFILE_EDITION.startswith("dicomfields_")
    assert len(EXACT_ACTIONS) > 600
    assert profile_action(0x00100010) == "Z" and profile_action(0x00080018) == "U"
    assert profile_action(0x60003000) == "X"  # overlay data, through the repeating-group masks
    assert profile_action(0x00080070) is None  # Manufacturer: kept by the profile itself


def test_identifiers_everywhere_are_removed_and_the_gate_finds_none(person):
    raw = _roundtrip(pacs_image(person, random.Random(1)))
    assert scan(raw, person.known, "pacs.dcm")  # the gate sees the identifiers before
    out = _roundtrip(deidentify(raw, pseudonym="Covid123456", person=KEY.encrypt(person.nhs), keys=KEYS))
    assert scan(out, person.known, "out.dcm") == []
    assert (out.PatientID, str(out.PatientName)) == ("Covid123456", "Covid123456")
    assert "OtherPatientIDsSequence" not in out and "PatientAddress" not in out and "ImageComments" not in out
    assert not any(elem.tag.is_private for elem in out.iterall())
    assert "RequestAttributesSequence" not in out and out.AccessionNumber == ""
    assert out.PatientIdentityRemoved == "YES" and all(len(v) <= 64 for v in out.DeidentificationMethod)
    assert "Basic Application Confidentiality Profile" in out.DeidentificationMethod[0]
    assert [c.CodeValue for c in out.DeidentificationMethodCodeSequence] == ["113100", "113107", "113108", "113109"]


def test_what_the_statistics_need_is_kept_and_dates_follow_the_nccid_policy(person):
    raw = _roundtrip(pacs_image(person, random.Random(1)))
    out = deidentify(copy.deepcopy(raw), pseudonym="Covid1", person=KEY.encrypt(person.nhs), keys=KEYS)
    kept = (
        "PatientSex",
        "PatientAge",
        "PatientSize",
        "PatientWeight",
        "Manufacturer",
        "ManufacturerModelName",
        "DeviceSerialNumber",
        "StudyDate",
        "Modality",
        "BodyPartExamined",
    )
    for keyword in kept:
        assert out.get(keyword) == raw.get(keyword), keyword
    assert out.PatientBirthDate == f"{person.birth_date.year}0101"
    offset = KEYS.day_offset(KEY.encrypt(person.nhs))
    day = dt.timedelta(days=offset)
    assert out.SeriesDate == (dt.date(2020, 4, 2) - day).strftime("%Y%m%d")
    assert out.ContentDate == (dt.date(2020, 4, 3) - day).strftime("%Y%m%d")  # the interval survives
    assert "StationName" not in out and "InstitutionName" not in out


def test_a_resend_gets_the_same_uids_and_references_stay_consistent(person):
    first = deidentify(
        _roundtrip(pacs_image(person, random.Random(1))), pseudonym="Covid1", person=KEY.encrypt(person.nhs), keys=KEYS
    )
    again = deidentify(
        _roundtrip(pacs_image(person, random.Random(1))),
        pseudonym="Covid1",
        person=KEY.encrypt(f"{person.nhs[:3]} {person.nhs[3:6]} {person.nhs[6:]}"),
        keys=KEYS,
    )
    assert encode(first) == encode(again)
    original = _roundtrip(pacs_image(person, random.Random(1)))
    assert first.SOPInstanceUID == KEYS.uid(original.SOPInstanceUID) != original.SOPInstanceUID
    assert (
        first.StudyInstanceUID.startswith("2.25.")
        and first.file_meta.MediaStorageSOPInstanceUID == first.SOPInstanceUID
    )
    ref = first.ReferencedImageSequence[0].ReferencedSOPInstanceUID
    assert ref == KEYS.uid(original.ReferencedImageSequence[0].ReferencedSOPInstanceUID)
    assert first.SOPClassUID == original.SOPClassUID  # standard UIDs are not identifiers


def test_the_gate_catches_a_planted_identifier_and_names_file_and_tag(person):
    out = deidentify(
        _roundtrip(pacs_image(person, random.Random(1))), pseudonym="Covid1", person=KEY.encrypt(person.nhs), keys=KEYS
    )
    out.DeidentificationMethodCodeSequence[0].CodeMeaning = f"reviewed for {person.family.title()}"
    block = out.private_block(0x0011, "SNEAKY", create=True)
    block.add_new(0x10, "LO", person.nhs[:3] + " " + person.nhs[3:6] + " " + person.nhs[6:])
    findings = scan(out, person.known, "batch/0001.dcm")
    assert {(f.tag_path, f.kind) for f in findings} == {
        ("(0012,0064)[0]>(0008,0104)", "name"),
        ("(0011,1010)", "number"),
    }
    assert all(str(f).startswith("batch/0001.dcm: ") for f in findings)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda ds: setattr(ds, "BurnedInAnnotation", "YES"), "BurnedInAnnotation (0028,0301) is YES"),
        (lambda ds: setattr(ds, "SOPClassUID", "1.2.840.10008.5.1.4.1.1.7"), "secondary capture"),
        (lambda ds: setattr(ds, "SOPClassUID", "1.2.840.10008.5.1.4.1.1.6.1"), "unsupported SOP class Ultrasound"),
    ],
)
def test_objects_that_may_carry_burned_in_identifiers_are_held(person, change, reason):
    ds = _roundtrip(pacs_image(person, random.Random(1)))
    change(ds)
    with pytest.raises(DeidHeld, match=re.escape(reason)):
        deidentify(ds, pseudonym="Covid1", person=KEY.encrypt(person.nhs), keys=KEYS)


def test_synthetic_nhs_numbers_are_valid_or_deliberately_not():
    from nccid.site.identifiers import IdentifierError, validate_nhs

    rng = random.Random(0)
    assert all(validate_nhs(nhs_number(rng)) for _ in range(50))
    with pytest.raises(IdentifierError):
        validate_nhs(nhs_number(rng, valid=False))


def test_a_folder_is_deidentified_through_the_vault_and_the_gate(tmp_path):
    rng = random.Random(9)
    people = [hospital_patient(rng) for _ in range(3)]
    src = tmp_path / "pacs"
    for n, who in enumerate(people):
        for k in range(2):
            target = src / f"export{n}" / f"IMG{k}.dcm"
            target.parent.mkdir(parents=True, exist_ok=True)
            pacs_image(who, rng, seed=f"{n}-{k}", modality="CT" if k else "CR").save_as(
                target, enforce_file_format=True
            )
    nameless = pacs_image(people[0], rng, seed="x")
    nameless.PatientID = "UNKNOWN"
    del nameless.OtherPatientIDsSequence
    nameless.save_as(src / "nameless.dcm", enforce_file_format=True)
    (src / "notes.txt").write_text("not dicom")
    key_file = KEY.save(tmp_path / "k.key")
    args = [
        "site",
        "deid",
        src,
        tmp_path / "out",
        "--key-file",
        key_file,
        "--vault",
        tmp_path / "vault.sqlite",
        "--as",
        "site-a",
    ]
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    # no clinical record yet: every image waits in held/, as the node would hold it
    assert "de-identified 6 of 8 input file(s)" in proc.stdout and "0 ready in images/, 6 held in held/" in proc.stdout
    assert "2 not sent" in proc.stdout and re.search(r"not sent: input #\d+: no valid NHS/CHI number", proc.stdout)
    assert "nameless" not in proc.stdout and "export0" not in proc.stdout  # inputs are named by number
    assert "gate: no identifiers found" in proc.stdout
    folders = sorted(p.name for p in (tmp_path / "out" / "held").iterdir())
    assert len(folders) == 3 and all(f.startswith("Covid") for f in folders)  # one pseudonym per person
    for who in people:
        for path in (tmp_path / "out").rglob("*.dcm"):
            assert scan(pydicom.dcmread(path), who.known, path.name) == []
    again = run_cli(*args)  # a re-send: same pseudonyms, same files
    assert sorted(p.name for p in (tmp_path / "out" / "held").iterdir()) == folders
    assert len(list((tmp_path / "out").rglob("*.dcm"))) == 6 and again.returncode == 0


def test_the_batch_fails_when_the_gate_finds_an_identifier_the_profile_keeps(tmp_path):
    who = hospital_patient(random.Random(11))
    ds = pacs_image(who, random.Random(11), seed="leak")
    ds.ManufacturerModelName = f"Portable unit, ward of {who.family}"  # kept by Retain Device Identity
    (tmp_path / "pacs").mkdir()
    ds.save_as(tmp_path / "pacs" / "leak.dcm", enforce_file_format=True)
    key_file = KEY.save(tmp_path / "k.key")
    proc = run_cli(
        "site", "deid", tmp_path / "pacs", tmp_path / "out", "--key-file", key_file, "--vault", tmp_path / "v.sqlite"
    )
    assert proc.returncode == 1
    assert "(0008,1090)" in proc.stderr and "name" in proc.stderr and "must not be uploaded" in proc.stderr
    assert not list((tmp_path / "out").rglob("*.dcm")) if (tmp_path / "out").exists() else True
