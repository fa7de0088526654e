"""Identifiable hospital exports and sheets with the awkward shapes real sites send (entirely synthetic).

- PACS exports in every transfer syntax a PACS writes: Explicit and Implicit VR Little Endian, Deflated Explicit
  VR Little Endian, and the retired Explicit VR Big Endian; each with the vendor's own file meta (implementation
  class UID and version name, the PACS's source AE title), in folders named as PACS exports name them (the
  patient's name and NHS number, the accession number).
- Filled clinical sheets as sites fill them: letter codes in the Sex column (`F`, `M`), dates whose template
  reading is impossible (`15/04/2020` in an MM/DD/YYYY column), dates with two possible readings, rows of
  another hospital of the trust, ages over 89, and a CSV saved by Excel on Windows (Windows-1252, CRLF).

Each maker returns what it planted, so a test states what it expects the site tools to do with it.
"""

from __future__ import annotations

import copy
import csv
import io
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from nccid.synth.hospital import HospitalPatient, pacs_image

#: what a vendor's PACS writes in the file meta of its exports (a made-up vendor root, not a real one)
PACS_IMPLEMENTATION_UID = "1.2.826.0.1.3680043.10.999.7.1"
PACS_VERSION_NAME = "NFG_PACS_7_2"
PACS_AE_TITLE = "NFG_PACS_01"
SYNTAXES = {
    "explicit": ExplicitVRLittleEndian,
    "implicit": ImplicitVRLittleEndian,
    "deflated": DeflatedExplicitVRLittleEndian,
    "big-endian": ExplicitVRBigEndian,
}


def pacs_file_meta(ds: Dataset, syntax: str) -> FileMetaDataset:
    """File meta as a PACS writes it: its own implementation UID and version name, and its source AE title."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = SYNTAXES[syntax]
    meta.ImplementationClassUID = PACS_IMPLEMENTATION_UID
    meta.ImplementationVersionName = PACS_VERSION_NAME
    meta.SourceApplicationEntityTitle = PACS_AE_TITLE
    return meta


def export_bytes(ds: Dataset, syntax: str = "explicit") -> bytes:
    """`ds` as a PACS export file in `syntax` (explicit, implicit, deflated or big-endian), with the vendor's file
    meta and a non-zero preamble. Native 16-bit pixel data is byte-swapped for big endian, as such a PACS stores
    it. `ds` itself is not changed."""
    out = copy.deepcopy(ds)
    out.file_meta = pacs_file_meta(out, syntax)
    out.preamble = b"PACS-EXPORT".ljust(128, b"\0")
    if syntax == "big-endian" and "PixelData" in out and int(out.get("BitsAllocated", 8)) in (16, 32):
        width = int(out.BitsAllocated) // 8
        out.PixelData = np.frombuffer(out.PixelData, dtype=f"<u{width}").astype(f">u{width}").tobytes()
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, out, enforce_file_format=True)
    return buffer.getvalue()


def export_folder_name(person: HospitalPatient, accession: str) -> str:
    """A PACS export's folder name: the patient's name and NHS number, then the accession number."""
    return f"{person.family}^{person.given}_{person.nhs}/{accession}"


@dataclass
class PacsExport:
    """A folder export: every file's path and the transfer syntax it was written in."""

    root: Path
    files: dict[Path, str] = field(default_factory=dict)  # path -> syntax
    people: list[HospitalPatient] = field(default_factory=list)


def pacs_export(
    root: str | Path,
    people: list[HospitalPatient],
    *,
    syntaxes: tuple[str, ...] = ("explicit",),
    modality: str = "CT",
    seed: int = 0,
) -> PacsExport:
    """One image per person and syntax, under `<FAMILY>^<GIVEN>_<NHS>/<ACCESSION>/IMG<n>.dcm` as PACS name them.
    The same person and seed always give the same images (the same SOP Instance UIDs)."""
    root = Path(root)
    rng = random.Random(seed)
    export = PacsExport(root, people=list(people))
    for n, person in enumerate(people):
        for k, syntax in enumerate(syntaxes):
            accession = f"ACC{seed:02d}{n:03d}{k}"
            ds = pacs_image(person, rng, modality=modality, seed=f"{seed}-{n}-{k}", accession=accession)
            path = root / export_folder_name(person, accession) / f"IMG{k + 1:04d}.dcm"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(export_bytes(ds, syntax))
            export.files[path] = syntax
    return export


# -- clinical sheets ----------------------------------------------------------------------------------------
SHEET_HEAD = [
    "NHS/CHI Number",
    "Hospital (Internal) Number",
    "Hospital",
    "Age",
    "Sex (Male = 1, Female = 0)",
    "Ethnicity",
    "Date of Positive Covid Swab",
    "Date of admission",
    "CXR severity",
    "Death",
]


@dataclass
class AwkwardSheet:
    """A positive sheet (MM/DD/YYYY) as a site fills it, and what each planted row should become."""

    path: Path
    rows: list[list[object]]
    letter_sex: dict[int, tuple[str, int]] = field(default_factory=dict)  # row -> (read, code)
    impossible_month: dict[int, tuple[str, str]] = field(default_factory=dict)  # row -> (read, ISO written)
    two_readings: dict[int, tuple[str, str]] = field(default_factory=dict)  # row -> (read, ISO of the template)
    other_hospital: dict[int, str] = field(default_factory=dict)  # row -> the other hospital's name
    over_89: dict[int, int] = field(default_factory=dict)  # row -> age read


def awkward_sheet(
    path: str | Path,
    people: list[HospitalPatient],
    *,
    hospital: str,
    other_hospital: str,
    encoding: str = "utf-8",
) -> AwkwardSheet:
    """A positive sheet for at least six people: row 2 plain; row 3 `F`/`M` in Sex; row 4 `15/04/2020` (month
    15: only the DD/MM reading is a date); row 5 `04/05/2020` (two readings: the template's, 5 April, holds);
    row 6 another hospital's patient; row 7 aged 93. Written as CSV in `encoding` (Excel on Windows:
    cp1252, CRLF line ends, an en dash in an Ethnicity value) or as XLSX by the file's extension."""
    if len(people) < 6:
        raise ValueError("awkward_sheet needs at least six people")
    path = Path(path)
    sheet = AwkwardSheet(path, [SHEET_HEAD])

    def row(person: HospitalPatient, **values: object) -> list[object]:
        base = {
            "Hospital": hospital,
            "Age": 64,
            "Sex (Male = 1, Female = 0)": 1 if person.sex == "M" else 0,
            "Ethnicity": "White – Irish",
            "Date of Positive Covid Swab": "04/12/2020",
            "Date of admission": "04/13/2020",
            "CXR severity": 2,
            "Death": 0,
        }
        base.update(values)
        base["NHS/CHI Number"], base["Hospital (Internal) Number"] = person.nhs, person.hospital_number
        return [base.get(column, "") for column in SHEET_HEAD]

    sex = "F" if people[1].sex == "F" else "M"
    sheet.rows.append(row(people[0]))
    sheet.rows.append(row(people[1], **{"Sex (Male = 1, Female = 0)": sex}))
    sheet.letter_sex[3] = (sex, 0 if sex == "F" else 1)
    sheet.rows.append(row(people[2], **{"Date of Positive Covid Swab": "15/04/2020"}))
    sheet.impossible_month[4] = ("15/04/2020", "2020-04-15")
    sheet.rows.append(row(people[3], **{"Date of Positive Covid Swab": "04/05/2020"}))
    sheet.two_readings[5] = ("04/05/2020", "2020-04-05")
    sheet.rows.append(row(people[4], Hospital=other_hospital))
    sheet.other_hospital[6] = other_hospital
    sheet.rows.append(row(people[5], Age=93))
    sheet.over_89[7] = 93
    if path.suffix.lower() == ".xlsx":
        import openpyxl

        book = openpyxl.Workbook()
        for values in sheet.rows:
            book.active.append(values)
        book.save(path)
    else:
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\r\n").writerows(sheet.rows)
        path.write_bytes(buffer.getvalue().encode(encoding))
    return sheet
