"""`nccid site check`: the gate over a whole outbox or store catches every planted identifier, names the file and
tag, and lets a clean batch through; `site upload` refuses a batch the gate fails."""

from __future__ import annotations

import json
import random

import pydicom
import pytest
from helpers import run_cli

from nccid.site.batch import deidentify_folder
from nccid.site.check import Gate, check_files, outbox_files, people_by_pseudonym, read_identifiers, store_files
from nccid.site.upload import UploadError, upload
from nccid.site.vault import PseudonymKey, Vault
from nccid.synth.hospital import hospital_patient, nhs_number, pacs_image, write_identifiers


@pytest.fixture
def site(tmp_path):
    """Two patients de-identified into an outbox, with the site's PAS extract, key and vault."""
    rng = random.Random(11)
    people = [hospital_patient(rng) for _ in range(2)]
    pacs = tmp_path / "pacs"
    pacs.mkdir()
    accessions = {}
    for i, person in enumerate(people):
        for j, modality in enumerate(("CT", "CR")):
            accession = f"ACC{i}{j}77"
            accessions.setdefault(person.nhs, []).append(accession)
            pacs_image(person, rng, modality=modality, seed=f"c{i}{j}", accession=accession).save_as(
                pacs / f"{i}-{j}.dcm", enforce_file_format=True
            )
    key_file = PseudonymKey.generate().save(tmp_path / "site.key")
    key = PseudonymKey.load(key_file)
    outbox, vault = tmp_path / "outbox", tmp_path / "vault.sqlite"
    with Vault(vault) as v:
        pseudonyms = v.issue([key.encrypt(p.nhs) for p in people], actor="t")
        (outbox / "data").mkdir(parents=True)
        for pseudonym in pseudonyms:  # the sheet first, so that the images are ready, not held
            record = {"Pseudonym": pseudonym, "SubmittingCentre": "Northfield Trust", "Age": 71, "Sex": 1}
            (outbox / "data" / f"{pseudonym}_data.json").write_text(json.dumps(record))
        result = deidentify_folder(pacs, outbox, key=key, pseudonymise=lambda c: v.issue(c, actor="t"))
    assert result.clean and len(result.written) == 4
    pas = write_identifiers(people, str(tmp_path / "pas.csv"), accessions)
    return {
        "people": people,
        "pseudonyms": pseudonyms,
        "outbox": outbox,
        "pas": pas,
        "args": ["--identifiers", pas, "--key-file", key_file, "--vault", vault],
        "gate": Gate(people_by_pseudonym(read_identifiers(pas), Vault(vault).lookup, key.encrypt)),
    }


def test_the_pas_extract_gives_the_gate_what_the_site_knows(site):
    person = site["people"][0]
    known = read_identifiers(site["pas"])[person.nhs]
    assert {person.family, person.given, "HOUSE^GREGORY"} <= set(known.names)
    assert {person.nhs, person.hospital_number, "ACC0077", "ACC0177"} <= set(known.numbers)
    assert known.birth_date == person.birth_date.strftime("%Y%m%d")
    assert set(site["gate"].people) == set(site["pseudonyms"])


def test_a_clean_outbox_passes(site):
    proc = run_cli("site", "check", site["outbox"], *site["args"])
    assert proc.returncode == 0, proc.stderr
    assert "6 files" in proc.stdout and "4 DICOM, 2 clinical records" in proc.stdout
    assert "2 known patient(s)" in proc.stdout and "no identifiers found" in proc.stdout


def _plant(path, change) -> None:
    ds = pydicom.dcmread(path)
    change(ds)
    ds.save_as(path, enforce_file_format=True)


def test_every_planted_identifier_is_found_with_its_file_and_tag(site):
    outbox, people = site["outbox"], site["people"]
    first, second = sorted((outbox / "images" / site["pseudonyms"][0]).glob("*.dcm"))
    other = sorted((outbox / "images" / site["pseudonyms"][1]).glob("*.dcm"))[0]

    def nested_name(ds):
        ds.DeidentificationMethodCodeSequence[0].CodeMeaning = f"checked by {people[0].family}"

    def private(ds):
        ds.private_block(0x0099, "LEFT BEHIND", create=True).add_new(0x01, "LO", "anything")

    _plant(first, nested_name)
    _plant(second, private)
    _plant(other, lambda ds: setattr(ds, "ImageComments", f"see also {people[0].nhs}"))  # someone else's number
    stray = nhs_number(random.Random(99))  # nobody the site knows, but shaped like an NHS number
    _plant(other, lambda ds: setattr(ds, "StudyDescription", f"ref {stray[:3]} {stray[3:6]} {stray[6:]}"))
    record = outbox / "data" / f"{site['pseudonyms'][1]}_data.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "Notes": people[1].hospital_number}))

    report = check_files(outbox_files(outbox), site["gate"])
    found = {(f.file, f.tag_path, f.kind) for f in report.findings}
    rel = lambda p: p.relative_to(outbox).as_posix()  # noqa: E731
    assert found == {
        (rel(first), "(0012,0064)[0]>(0008,0104)", "name"),
        (rel(second), "(0099,0010)", "private tag"),
        (rel(second), "(0099,1001)", "private tag"),
        (rel(other), "(0020,4000)", "a known NHS/CHI or hospital number"),
        (rel(other), "(0008,1030)", "a valid NHS number pattern"),
        (rel(record), "Notes", "a known NHS/CHI or hospital number"),
    }

    proc = run_cli("site", "check", outbox, *site["args"])
    assert proc.returncode == 1 and "6 finding(s)" in proc.stderr and "(0012,0064)[0]>(0008,0104)" in proc.stderr
    for person in people:  # the report names where, never what
        assert person.family not in proc.stderr + proc.stdout and person.nhs not in proc.stderr + proc.stdout


def test_a_clinical_record_with_an_identifier_field_or_no_pseudonym_is_a_finding(site):
    path = site["outbox"] / "data" / f"{site['pseudonyms'][0]}_data.json"
    path.write_text(json.dumps({"Pseudonym": "Smith", "NHS/CHI Number": "x"}))
    kinds = {(f.tag_path, f.kind) for f in check_files(outbox_files(site["outbox"]), Gate({})).findings}
    assert kinds == {("NHS/CHI Number", "identifier field"), ("Pseudonym", "not a pseudonym")}


def test_upload_runs_the_gate_first_and_uploads_nothing_on_a_finding(site, local_store):
    image = next((site["outbox"] / "images").rglob("*.dcm"))
    _plant(image, lambda ds: setattr(ds, "PatientID", site["people"][0].hospital_number))
    with pytest.raises(UploadError, match="the gate found"):
        upload(site["outbox"], local_store, "northfield", gate=site["gate"])
    assert list(local_store.list()) == []
    assert not (site["outbox"] / ".upload-journal.jsonl").exists()


def test_the_gate_over_a_store_after_upload(site, store):
    upload(site["outbox"], store, "northfield", date="2020-05-01", gate=site["gate"])
    report = check_files(store_files(store), site["gate"])
    assert (report.dicom, report.clinical, report.findings) == (4, 2, [])


def test_a_birth_date_inside_a_keyed_uid_is_chance_but_inside_a_site_uid_a_leak():
    from pydicom.dataset import Dataset

    from nccid.site.gate import KnownIdentifiers, scan

    known = KnownIdentifiers(numbers=["9434765919"], birth_date="19610402")
    keyed = Dataset()
    keyed.StudyInstanceUID = "2.25.3318" + "19610402" + "77120938458810293847561"  # a hash that happens to hold it
    assert scan(keyed, known, "a.dcm") == []
    site_made = Dataset()
    site_made.StudyInstanceUID = "1.2.826.0.1.3680043.19610402.1"  # a PACS that builds UIDs from dates
    assert [f.kind for f in scan(site_made, known, "b.dcm")] == ["birth date"]
    keyed.SeriesInstanceUID = "2.25.1" + "9434765919" + "2837465"  # a whole NHS number is never chance
    assert [f.tag_path for f in scan(keyed, known, "c.dcm")] == ["(0020,000E)"]
