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
    for path in sorted(p for p in Path(src).rglob("*") if p.is_file()):
        tick(1, path.stat().st_size)
        name = str(path.relative_to(src))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(path)
            ciphertext = key.encrypt(patient_number(ds))
        except (InvalidDicomError, OSError) as exc:
            result.held.append((name, f"not a readable DICOM file: {exc}"))
            continue
        except IdentifierError as exc:
            result.held.append((name, str(exc)))
            continue
        known = known_from_header(ds)
        if ciphertext not in pseudonyms:
            (pseudonyms[ciphertext],) = pseudonymise([ciphertext])
        pseudonym = pseudonyms[ciphertext]
        try:
            clean = deidentify(ds, pseudonym=pseudonym, person=ciphertext, keys=keys)
        except DeidHeld as exc:
            result.held.append((name, exc.reason))
            continue
        target = out / "images" / pseudonym / f"{clean.SOPInstanceUID}.dcm"
        findings = scan(clean, known, str(target.relative_to(out)))
        if findings:
            result.findings.extend(findings)
            continue
        write_image(clean, target)
        result.written.append(target)
    return result
