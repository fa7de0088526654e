"""De-identify a folder of PACS exports at the site, with the gate run on every output file.

For each file: find the NHS/CHI number (PatientID, else OtherPatientIDs), encrypt it, get the person's pseudonym
(one per person), de-identify, then scan the output for every identifier the original header carried. Files that
cannot be matched to a valid number, or that are held by the profile, are reported and not written. A finding
from the gate fails the whole batch: nothing from it may be uploaded.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from nccid.contracts.dicom import ImageRejected
from nccid.site.deid import DeidHeld, DeidKeys, deidentify
from nccid.site.gate import Finding, KnownIdentifiers, scan
from nccid.site.identifiers import IdentifierError, validate_patient_number
from nccid.site.outbox import write_image
from nccid.site.vault import PseudonymKey

Pseudonymise = Callable[[list[str]], list[str]]  # ciphertexts -> pseudonyms (the vault, or its service)


@dataclass
class BatchResult:
    written: list[Path] = field(default_factory=list)
    held: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    findings: list[Finding] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        """True when the gate found nothing: the batch may be uploaded."""
        return not self.findings


def patient_number(ds: Dataset) -> str:
    """The valid NHS/CHI number in PatientID or OtherPatientIDs(Sequence); IdentifierError if there is none."""
    candidates = [str(ds.get("PatientID", ""))]
    candidates += [str(v) for v in (ds.get("OtherPatientIDs") or [])] if ds.get("OtherPatientIDs") else []
    candidates += [str(item.get("PatientID", "")) for item in ds.get("OtherPatientIDsSequence", [])]
    for candidate in candidates:
        try:
            return validate_patient_number(candidate)
        except IdentifierError:
            continue
    raise IdentifierError("no valid NHS/CHI number in PatientID (0010,0020) or OtherPatientIDs")


def known_from_header(ds: Dataset) -> KnownIdentifiers:
    """Every identifier the original header itself carries: what the output must no longer contain."""
    names = [
        str(ds.get(k, ""))
        for k in (
            "PatientName",
            "ReferringPhysicianName",
            "PerformingPhysicianName",
            "OperatorsName",
            "PatientMotherBirthName",
        )
        if ds.get(k)
    ]
    numbers = [str(ds.get(k, "")) for k in ("PatientID", "AccessionNumber") if ds.get(k)]
    numbers += [
        str(item.get("PatientID", "")) for item in ds.get("OtherPatientIDsSequence", []) if item.get("PatientID")
    ]
    return KnownIdentifiers(
        names=names,
        numbers=numbers,
        birth_date=str(ds.get("PatientBirthDate", "")),
        address=[str(ds.get("PatientAddress", ""))] if ds.get("PatientAddress") else [],
        free_text=[str(ds.get(k, "")) for k in ("ImageComments", "PatientComments") if ds.get(k)],
    )


@dataclass(frozen=True)
class Deidentified:
    """One object matched, pseudonymised, de-identified and scanned by the gate (not yet written)."""

    clean: Dataset
    pseudonym: str
    person: str  # the NHS/CHI ciphertext
    findings: list[Finding]


def deidentify_checked(
    ds: Dataset, *, key: PseudonymKey, keys: DeidKeys, pseudonym_of: Callable[[str], str]
) -> Deidentified:
    """The one path from an identifiable object to a gated, de-identified one, for `site deid` and the node.

    Raises IdentifierError (no valid NHS/CHI number), DeidHeld (held by policy), or ImageRejected when a value
    cannot be decoded; the reasons never quote a value. `pseudonym_of` maps a ciphertext to its pseudonym.
    """
    try:
        person = key.encrypt(patient_number(ds))
    except IdentifierError:
        raise
    except Exception as exc:  # a corrupt value in the identifying elements
        raise ImageRejected(f"unreadable patient identifiers ({type(exc).__name__})") from exc
    pseudonym = pseudonym_of(person)
    try:
        known = known_from_header(ds)
        clean = deidentify(ds, pseudonym=pseudonym, person=person, keys=keys)
        findings = scan(clean, known, f"images/{pseudonym}/{clean.SOPInstanceUID}.dcm")
    except DeidHeld:
        raise
    except Exception as exc:  # a value pydicom cannot convert: a malformed data set
        raise ImageRejected(f"cannot de-identify the data set ({type(exc).__name__})") from exc
    return Deidentified(clean, pseudonym, person, findings)


def deidentify_folder(
    src: Path,
    out: Path,
    *,
    key: PseudonymKey,
    pseudonymise: Pseudonymise,
    progress: Callable[[int, int], None] | None = None,
) -> BatchResult:
    result = BatchResult()
    tick = progress or (lambda n, b: None)
    keys = DeidKeys.derive(key.key)
    pseudonyms: dict[str, str] = {}  # one vault round trip per person, not per file

    def pseudonym_of(person: str) -> str:
        if person not in pseudonyms:
            (pseudonyms[person],) = pseudonymise([person])
        return pseudonyms[person]

    for path in sorted(p for p in Path(src).rglob("*") if p.is_file()):
        tick(1, path.stat().st_size)
        name = str(path.relative_to(src))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(path)
        except (InvalidDicomError, OSError) as exc:
            result.held.append((name, f"not a readable DICOM file: {exc}"))
            continue
        try:
            done = deidentify_checked(ds, key=key, keys=keys, pseudonym_of=pseudonym_of)
        except IdentifierError as exc:
            result.held.append((name, str(exc)))
            continue
        except (DeidHeld, ImageRejected) as exc:
            result.held.append((name, exc.reason))
            continue
        if done.findings:
            result.findings.extend(done.findings)
            continue
        target = out / "images" / done.pseudonym / f"{done.clean.SOPInstanceUID}.dcm"
        write_image(done.clean, target)
        result.written.append(target)
    return result
