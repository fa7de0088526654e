"""`nccid site check`: the de-identification gate over a whole batch, an outbox or a warehouse store.

Every DICOM file is parsed (headers, nested sequences, private tags, file meta; not the pixels) and every clinical
JSON read. Each is checked three ways:

- against the identifiers the site knows for *that* patient (names, NHS/CHI and hospital numbers, birth date,
  address, accession numbers, physicians, free text), the patient being the pseudonym in PatientID or the file
  name, mapped back through the vault;
- for any NHS/CHI number the site knows, of any patient, and for anything shaped like a valid NHS number
  (10 digits passing the modulus 11 check) in text;
- for the marks of a de-identified object: PatientIdentityRemoved YES, a pseudonym in PatientID, no private
  tags; a clinical record has a pseudonym and no NHS/CHI or hospital number field.

Other files (reports, statistics) are searched for the known NHS/CHI and hospital numbers. One finding fails
the check; each names the file, the tag or field, and the kind of identifier, never the value.

Every DICOM file is also read as the warehouse reads it (`nccid.contracts.dicom`: a complete Part 10 file, the
tags it files by, a modality it files): a file the warehouse would quarantine is a finding here, before upload,
rather than a line in a central report later.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import BinaryIO

from pydicom.dataset import Dataset

from nccid.contracts.dicom import image_facts, read_header
from nccid.contracts.layout import is_pseudonym
from nccid.errors import ImageRejected
from nccid.site.gate import Finding, KnownIdentifiers, _elements, scan
from nccid.site.identifiers import IdentifierError, check_digit, validate_patient_number
from nccid.site.templates import read_rows
from nccid.store import ObjectStore

_NHS_SHAPE = re.compile(rb"(?<![\d.])(\d{3})[ -]?(\d{3})[ -]?(\d{4})(?![\d.])")
_DIGIT_RUNS = re.compile(rb"\d{6,}")
_BANNED_CLINICAL_FIELDS = ("NHS/CHI Number", "NHS Number", "CHI Number", "Hospital (Internal) Number")

#: identifier-list columns (a PAS extract, or a filled clinical template): header -> what it holds
COLUMNS = {
    "nhs/chi number": "number",
    "nhs number": "number",
    "chi number": "number",
    "hospital (internal) number": "hospital",
    "hospital number": "hospital",
    "family name": "name",
    "surname": "name",
    "given name": "name",
    "forename": "name",
    "date of birth": "birth",
    "address": "address",
    "postcode": "address",
    "accession numbers": "accession",
    "referring physician": "name",
}


@dataclass
class CheckReport:
    """The gate's verdict over a set of files: how many of each kind were checked, and every finding."""

    dicom: int = 0
    clinical: int = 0
    other: int = 0
    findings: list[Finding] = field(default_factory=list)

    @property
    def files(self) -> int:
        return self.dicom + self.clinical + self.other

    @property
    def clean(self) -> bool:
        return not self.findings


def read_identifiers(path: str | Path) -> dict[str, KnownIdentifiers]:
    """What the site knows per NHS/CHI number, from a CSV/XLSX with a header row (unknown columns ignored).

    Rows without a valid number are skipped: the gate cannot tie them to anyone.
    """
    rows = read_rows(path)
    if not rows:
        return {}
    kinds = [COLUMNS.get(str(h or "").strip().lower()) for h in rows[0]]
    out: dict[str, KnownIdentifiers] = {}
    for row in rows[1:]:
        values: dict[str, list[str]] = {}
        for kind, value in zip(kinds, row, strict=False):
            if kind and value not in (None, ""):
                values.setdefault(kind, []).append(str(value).strip())
        try:
            number = validate_patient_number(values.get("number", [""])[0])
        except IdentifierError:
            continue
        known = out.setdefault(number, KnownIdentifiers())
        known.numbers += [number, *values.get("hospital", [])]
        known.numbers += [a for text in values.get("accession", []) for a in re.split(r"[;,\s]+", text) if a]
        known.names += values.get("name", [])
        known.address += values.get("address", [])
        if values.get("birth"):
            known.birth_date = _yyyymmdd(values["birth"][0])
    return out


def _yyyymmdd(text: str) -> str:
    digits = re.sub(r"\D", "", text)
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}.*", text):
        return digits[:8]
    if re.fullmatch(r"\d{2}/\d{2}/\d{4}", text):  # DD/MM/YYYY
        return digits[4:8] + digits[2:4] + digits[0:2]
    return digits[:8]


def _looks_like_nhs(blob: bytes) -> bool:
    for match in _NHS_SHAPE.finditer(blob):
        digits = b"".join(match.groups()).decode()
        if digits[0] != "0" and check_digit(digits[:9]) == int(digits[9]):
            return True
    return False


class Gate:
    """Knowledge for the check: per-pseudonym identifiers, and every NHS/CHI and hospital number known."""

    def __init__(self, people: dict[str, KnownIdentifiers]) -> None:
        self.people = people  # pseudonym -> what the site knows of that person
        self.numbers: set[bytes] = set()  # all-digit numbers (NHS/CHI): equal to a whole run of digits
        self.codes: set[bytes] = set()  # numbers with letters (hospital, accession): anywhere, any case
        for known in people.values():
            for number in known.numbers:
                compact = re.sub(r"[\s-]", "", number).upper()
                if compact.isdigit() and len(compact) >= 8:
                    self.numbers.add(compact.encode())
                elif not compact.isdigit() and len(compact) >= 6:
                    self.codes.add(compact.encode())

    def _numbers_in(self, blob: bytes) -> bool:
        if self.numbers and any(run in self.numbers for run in _DIGIT_RUNS.findall(blob)):
            return True
        upper = blob.upper() if self.codes else b""
        return any(code in upper for code in self.codes)

    def check_dicom(self, ds: Dataset, name: str, pseudonym_hint: str) -> list[Finding]:
        """Everything in one DICOM header that could identify a patient: a PatientID that is not a pseudonym,
        PatientIdentityRemoved not YES, private tags, this person's known identifiers (found by its own or the
        hinted pseudonym), any known NHS/CHI or hospital number, and valid NHS number patterns. Returns findings."""
        findings: list[Finding] = []
        pseudonym = str(ds.get("PatientID", ""))
        if not is_pseudonym(pseudonym):
            findings.append(Finding(name, "(0010,0020)", "PatientID is not a pseudonym"))
        if str(ds.get("PatientIdentityRemoved", "")).upper() != "YES":
            findings.append(Finding(name, "(0012,0062)", "PatientIdentityRemoved is not YES"))
        known = KnownIdentifiers()
        for p in {pseudonym, pseudonym_hint}:
            if p in self.people:
                k = self.people[p]
                known.names += k.names
                known.numbers += k.numbers
                known.address += k.address
                known.free_text += k.free_text
                known.birth_date = known.birth_date or k.birth_date
        findings += scan(ds, known, name)
        findings += [Finding(name, path, "private tag") for path in _private_tags(ds)]
        flagged = {f.tag_path for f in findings}
        for path, _tag, vr, value in _elements(ds):
            if vr in ("UI", "OB", "UN") or path in flagged:
                continue
            blob = _as_bytes(value)
            if self._numbers_in(blob):
                findings.append(Finding(name, path, "a known NHS/CHI or hospital number"))
            elif _looks_like_nhs(blob):
                findings.append(Finding(name, path, "a valid NHS number pattern"))
        return findings

    def check_clinical(self, record: object, name: str) -> list[Finding]:
        """Everything in one clinical record that could identify a patient: identifier fields, a Pseudonym that
        is not one, known numbers, NHS number patterns, and this person's identifiers in free text. Returns
        findings (one for the whole file when it is not a JSON object)."""
        if not isinstance(record, dict):
            return [Finding(name, "(whole file)", "not a clinical record (JSON object)")]
        findings = [Finding(name, f, "identifier field") for f in _BANNED_CLINICAL_FIELDS if f in record]
        pseudonym = str(record.get("Pseudonym", ""))
        if not is_pseudonym(pseudonym):
            findings.append(Finding(name, "Pseudonym", "not a pseudonym"))
        known = self.people.get(pseudonym)
        for key, value in record.items():
            if not isinstance(value, str) or key == "Pseudonym":
                continue
            blob = value.encode()
            if self._numbers_in(blob):
                findings.append(Finding(name, key, "a known NHS/CHI or hospital number"))
            elif _looks_like_nhs(blob):
                findings.append(Finding(name, key, "a valid NHS number pattern"))
            elif known is not None:
                ds = Dataset()
                ds.ImageComments = value  # reuse the DICOM gate's matching rules for free text
                if scan(ds, known, name):
                    findings.append(Finding(name, key, "an identifier of this patient"))
        return findings

    def check_other(self, blob: bytes, name: str) -> list[Finding]:
        return [Finding(name, "(text)", "a known NHS/CHI or hospital number")] if self._numbers_in(blob) else []


def _private_tags(ds: Dataset, path: str = "") -> Iterator[str]:
    """Tag paths of every private element, at any depth (de-identification removes them all)."""
    for tag in list(ds.keys()):
        here = f"{path}({tag.group:04X},{tag.element:04X})"
        if tag.is_private:
            yield here
            continue
        elem = ds[tag]
        if elem.VR == "SQ":
            for n, item in enumerate(elem.value or []):
                yield from _private_tags(item, f"{here}[{n}]>")


def _as_bytes(value: object) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, list | tuple):
        return "\\".join(map(str, value)).encode("utf-8", "replace")
    return str(value).encode("utf-8", "replace")


def check_files(
    items: Iterable[tuple[str, Callable[[], BinaryIO]]],
    gate: Gate,
    progress: Callable[[int, int], None] | None = None,
) -> CheckReport:
    """Run the gate over (name, opener) pairs. DICOM is recognised by content, not by name."""
    report = CheckReport()
    tick = progress or (lambda n, b: None)
    for name, opener in items:
        with opener() as handle:
            head = handle.read(132)
            handle.seek(0)
            if len(head) == 132 and head[128:132] == b"DICM":
                report.dicom += 1
                report.findings += _check_dicom_file(handle, name, gate)
            elif name.endswith(".json") and "/data/" in f"/{name}":
                report.clinical += 1
                try:
                    record = json.loads(handle.read())
                except ValueError:
                    report.findings.append(Finding(name, "(file)", "unreadable JSON"))
                    continue
                report.findings += gate.check_clinical(record, name)
            else:
                report.other += 1
                report.findings += gate.check_other(handle.read(), name)
        tick(1, 0)
    return report


def warehouse_verdict(ds: Dataset) -> str:
    """Why the warehouse would not file this (already completely read) header, or '' if it would. A PatientID
    that is not a pseudonym is left to the gate's own finding."""
    try:
        image_facts(ds)
    except ImageRejected as exc:
        return "" if "PatientID (0010,0020)" in exc.reason else exc.reason
    return ""


def _check_dicom_file(handle: BinaryIO, name: str, gate: Gate) -> list[Finding]:
    """The gate over one DICOM file, read as the warehouse reads it (header up to the pixels, checked whole)."""
    handle.seek(0, 2)
    size = handle.tell()
    handle.seek(0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = read_header(handle, size)
    except ImageRejected as exc:
        return [Finding(name, "(file)", f"the warehouse cannot file it: {exc.reason}")]
    except (EOFError, ValueError, OSError) as exc:
        return [Finding(name, "(file)", f"unreadable DICOM ({type(exc).__name__})")]
    hint = next((part for part in Path(name).parts if is_pseudonym(part)), "")
    findings = gate.check_dicom(ds, name, hint)
    reason = warehouse_verdict(ds)
    if reason:
        findings.append(Finding(name, "(file)", f"the warehouse cannot file it: {reason}"))
    return findings


def outbox_files(
    outbox: Path, areas: tuple[str, ...] = ("data", "images", "held")
) -> Iterator[tuple[str, Callable[[], BinaryIO]]]:
    """What de-identification produced in an outbox: data/, images/ and held/ (not the node's own records)."""
    outbox = Path(outbox)
    for area in areas:
        for path in sorted((outbox / area).rglob("*")) if (outbox / area).is_dir() else []:
            if path.is_file() and not path.name.startswith("."):
                yield path.relative_to(outbox).as_posix(), partial(open, path, "rb")  # opened by check_files


def store_files(store: ObjectStore, prefix: str = "") -> Iterator[tuple[str, Callable[[], BinaryIO]]]:
    """Every object of a store (only the bytes the checks read are fetched from a remote store)."""
    for info in store.list(prefix):
        yield info.key, (lambda i=info: store.open(i.key, i.size))


def people_by_pseudonym(
    identifiers: dict[str, KnownIdentifiers], lookup: Callable[[list[str]], list[str | None]], encrypt
) -> dict[str, KnownIdentifiers]:
    """Re-key the site's knowledge by pseudonym (NHS/CHI -> ciphertext -> the vault's pseudonym)."""
    numbers = list(identifiers)
    pseudonyms = lookup([encrypt(n) for n in numbers])
    return {p: identifiers[n] for n, p in zip(numbers, pseudonyms, strict=True) if p}
