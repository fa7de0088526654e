"""Both routes into the outbox agree (issue 10, defects 1, 2 and 6): the same image sent as a folder export and
through the site DICOM node gives the same bytes; deflated and big-endian exports come out as Explicit VR Little
Endian that the warehouse's reader files; compressed pixel data is left as it is; `site check` refuses what the
warehouse could not file."""

from __future__ import annotations

import csv
import io
import json
import random

import numpy as np
import pydicom
import pytest
from helpers import run_cli
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless

from nccid.contracts.dicom import image_facts, read_header
from nccid.site.batch import deidentify_folder
from nccid.site.deid import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from nccid.site.node import NodeConfig, SiteNode
from nccid.site.outbox import Outbox
from nccid.site.pseudonymiser import Pseudonymiser
from nccid.site.vault import PseudonymKey
from nccid.synth.hospital import hospital_patient, pacs_image
from nccid.synth.site_exports import PACS_AE_TITLE, export_bytes, pacs_export


@pytest.fixture
def site(tmp_path):
    """A key, a vault, and a Pseudonymiser over them, as `nccid site ...` builds it."""
    key = PseudonymKey.generate()
    key_file = key.save(tmp_path / "site.key")
    return {
        "key": key,
        "key_file": key_file,
        "vault": tmp_path / "vault.sqlite",
        "pseudonymiser": Pseudonymiser.with_vault(key, tmp_path / "vault.sqlite", "test"),
    }


def _with_records(outbox, pseudonymiser, people):
    """Clinical records for `people` in the outbox first, so that their images are ready rather than held."""
    box = Outbox(outbox)
    for pseudonym in pseudonymiser.of_numbers([p.nhs for p in people]):
        box.add_record({"Pseudonym": pseudonym, "SubmittingCentre": "Northfield Trust"}, "data")
    return box


def _send(port: int, dataset, syntax) -> int:
    """A PACS sending one data set over a real association, offering only `syntax`; returns the status."""
    from pynetdicom import AE

    ae = AE(ae_title="PACS")
    ae.add_requested_context(dataset.SOPClassUID, [syntax])
    assoc = ae.associate("127.0.0.1", port, ae_title="NCCID")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(dataset)
    finally:
        assoc.release()
    return int(status.Status)


def test_the_same_image_by_folder_and_by_the_node_gives_the_same_bytes(tmp_path, site):
    rng = random.Random(21)
    person = hospital_patient(rng)
    original = pacs_image(person, rng, modality="CR", seed="both-routes")
    (tmp_path / "pacs").mkdir()
    (tmp_path / "pacs" / "export.dcm").write_bytes(export_bytes(original, "explicit"))  # the vendor's file meta
    folder = _with_records(tmp_path / "folder-outbox", site["pseudonymiser"], [person])
    deidentify_folder(tmp_path / "pacs", folder.root, site["pseudonymiser"])
    (by_folder,) = folder.images.rglob("*.dcm")

    node_box = _with_records(tmp_path / "node-outbox", site["pseudonymiser"], [person])
    node = SiteNode(NodeConfig(node_box.root, port=0, workers=1), key=site["key"], pseudonymise=site["pseudonymiser"])
    node.start()
    try:  # the PACS negotiates Implicit VR Little Endian: the node receives other bytes than the export's
        received = pydicom.dcmread(io.BytesIO(export_bytes(original, "explicit")))
        assert _send(node.config.port, received, ImplicitVRLittleEndian) == 0
    finally:
        node.stop()
    (by_node,) = node_box.images.rglob("*.dcm")

    assert by_folder.relative_to(folder.root) == by_node.relative_to(node_box.root)
    assert by_folder.read_bytes() == by_node.read_bytes()  # a re-send by the other route is a duplicate
    meta = pydicom.dcmread(by_folder).file_meta
    assert meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
    assert meta.ImplementationVersionName == IMPLEMENTATION_VERSION_NAME
    assert meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert "SourceApplicationEntityTitle" not in meta and PACS_AE_TITLE.encode() not in by_folder.read_bytes()


def test_deflated_and_big_endian_exports_come_out_as_explicit_little_endian_the_warehouse_files(tmp_path, site):
    rng = random.Random(5)
    people = [hospital_patient(rng) for _ in range(2)]
    syntaxes = ("explicit", "implicit", "deflated", "big-endian")
    export = pacs_export(tmp_path / "pacs", people, syntaxes=syntaxes, modality="CT", seed=3)
    pixels = {}  # the original pixels, by NHS number and syntax
    for path, syntax in export.files.items():
        ds = pydicom.dcmread(path)
        pixels[(str(ds.PatientID), syntax, int(ds.InstanceNumber or 0))] = ds.pixel_array.copy()
    box = _with_records(tmp_path / "outbox", site["pseudonymiser"], people)
    result = deidentify_folder(export.root, box.root, site["pseudonymiser"])
    assert result.clean and result.held == [] and len(result.written) == 8
    for path in result.written:
        with open(path, "rb") as handle:
            header = read_header(handle, path.stat().st_size)  # the warehouse's reader: whole, fileable
        assert header.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert image_facts(header).folder == "ct"
    # the pixels survive every syntax, big endian included (byte-swapped, not copied as they were)
    written = [pydicom.dcmread(p).pixel_array for p in result.written]
    originals = list(pixels.values())
    assert all(any(np.array_equal(w, o) for o in originals) for w in written)
    assert all(any(np.array_equal(w, o) for w in written) for o in originals)


def test_compressed_pixel_data_is_left_in_its_encoding(tmp_path, site):
    rng = random.Random(8)
    person = hospital_patient(rng)
    ds = pacs_image(person, rng, modality="CT", seed="rle")
    ds.compress(RLELossless)
    (tmp_path / "pacs").mkdir()
    ds.save_as(tmp_path / "pacs" / "rle.dcm", enforce_file_format=True)
    box = _with_records(tmp_path / "outbox", site["pseudonymiser"], [person])
    (path,) = deidentify_folder(tmp_path / "pacs", box.root, site["pseudonymiser"]).written
    out = pydicom.dcmread(path)
    assert out.file_meta.TransferSyntaxUID == RLELossless
    assert np.array_equal(out.pixel_array, ds.pixel_array)


def test_site_check_refuses_an_image_the_warehouse_cannot_file(tmp_path, site):
    rng = random.Random(13)
    person = hospital_patient(rng)
    (tmp_path / "pacs").mkdir()
    pacs_image(person, rng, modality="DX", seed="cut").save_as(tmp_path / "pacs" / "a.dcm", enforce_file_format=True)
    box = _with_records(tmp_path / "outbox", site["pseudonymiser"], [person])
    (path,) = deidentify_folder(tmp_path / "pacs", box.root, site["pseudonymiser"]).written
    args = ("site", "check", box.root)
    assert run_cli(*args).returncode == 0
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # an interrupted copy: pixels cut short
    proc = run_cli(*args)
    assert proc.returncode == 1
    rel = path.relative_to(box.root).as_posix()
    assert f"{rel}: the warehouse cannot file it: truncated" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_site_deid_holds_images_without_a_record_and_the_sheet_releases_them(tmp_path, site):
    rng = random.Random(17)
    people = [hospital_patient(rng) for _ in range(3)]
    export = pacs_export(tmp_path / "pacs", people, modality="CR", seed=4)
    box = _with_records(tmp_path / "outbox", site["pseudonymiser"], people[:1])  # one sheet row so far
    common = ("--key-file", site["key_file"], "--vault", site["vault"])
    proc = run_cli("site", "deid", export.root, box.root, *common)
    assert proc.returncode == 0, proc.stderr
    assert "1 ready in images/, 2 held in held/" in proc.stdout
    first, *late = site["pseudonymiser"].of_numbers([p.nhs for p in people])
    assert [p.name for p in box.images.iterdir()] == [first]
    assert sorted(h.pseudonym for h in box.held_patients()) == sorted(late)
    # the rest of the sheet arrives: the same release the node uses moves them
    sheet = tmp_path / "late.csv"
    with open(sheet, "w", newline="") as handle:
        rows = [["NHS/CHI Number", "Hospital", "Age", "Sex (Male = 1, Female = 0)", "Date of Positive Covid Swab"]]
        csv.writer(handle).writerows(rows + [[p.nhs, "Northfield Trust", 60, 1, "04/12/2020"] for p in people[1:]])
    args = ("--template", "positive", "--centre", "Northfield Trust")
    proc = run_cli("site", "clinical", sheet, box.root, *args, *common)
    assert proc.returncode == 0, proc.stderr
    assert "released 2 held image(s)" in proc.stdout
    assert box.held_patients() == [] and sorted(p.name for p in box.images.iterdir()) == sorted([first, *late])
    record = json.loads(box.record_path(late[0], "data").read_text())
    assert record["Date of Positive Covid Swab"] == "2020-04-12"
