"""De-identify a folder of PACS exports at the site, with the gate run on every output file.

For each file: find the NHS/CHI number (PatientID, else OtherPatientIDs), encrypt it, get the person's pseudonym
(one per person), de-identify, then scan the output for every identifier the original header carried. Files that
cannot be matched to a valid number, or that are held by the profile, are reported and not written. A finding
from the gate fails the whole batch: nothing from it may be uploaded.

The outbox rule is the node's: an image whose patient has a clinical record goes to images/, the others wait in
held/ and are released by the same code when the record arrives (`Outbox.add_image`). Input files are named on
the console and in the result by their number in the batch (`input #12`), never by their path: PACS exports put
names and NHS numbers in folder names. The full paths are in an owner-only report in the outbox's site-reports/,
marked IDENTIFIABLE and never uploaded.
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
from nccid.log import event
from nccid.site.deid import DeidHeld, DeidKeys, deidentify
from nccid.site.gate import Finding, KnownIdentifiers, scan
from nccid.site.identifiers import IdentifierError, validate_patient_number
from nccid.site.outbox import Outbox
from nccid.site.pseudonymiser import Pseudonymiser
from nccid.site.vault import PseudonymKey

Pseudonymise = Callable[[list[str]], list[str]]  # ciphertexts -> pseudonyms (the vault, or its service)


@dataclass
class BatchResult:
    """What `deidentify_folder` did. Inputs are named `input #<n>` (their place in the batch), never by path."""

    written: list[Path] = field(default_factory=list)  # de-identified images ready in images/
    waiting: list[Path] = field(default_factory=list)  # de-identified images held in held/ for a clinical record
    held: list[tuple[str, str]] = field(default_factory=list)  # (input #n, reason): not written, stays at the PACS
    findings: list[Finding] = field(default_factory=list)
    inputs: int = 0
    report: Path | None = None  # the owner-only IDENTIFIABLE report naming every input by path

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
    ds: Dataset,
    *,
    key: PseudonymKey,
    keys: DeidKeys,
    pseudonym_of: Callable[[str], str],
    age_policy: str = "keep",
) -> Deidentified:
    """The one path from an identifiable object to a gated, de-identified one, for `site deid` and the node.

    Raises IdentifierError (no valid NHS/CHI number), DeidHeld (held by policy), or ImageRejected when a value
    cannot be decoded; the reasons never quote a value. `pseudonym_of` maps a ciphertext to its pseudonym;
    `age_policy` is the site's setting for ages over 89 (`Outbox.settings().ages_over_89`).
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
        clean = deidentify(ds, pseudonym=pseudonym, person=person, keys=keys, age_policy=age_policy)
        findings = scan(clean, known, f"images/{pseudonym}/{clean.SOPInstanceUID}.dcm")
    except DeidHeld:
        raise
    except Exception as exc:  # a value pydicom cannot convert: a malformed data set
        raise ImageRejected(f"cannot de-identify the data set ({type(exc).__name__})") from exc
    return Deidentified(clean, pseudonym, person, findings)


def _read_input(path: Path) -> Dataset:
    """Read one input file; ImageRejected with a reason that never quotes its path or values."""
    try:
        if path.stat().st_size == 0:
            raise ImageRejected("empty file (0 bytes)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pydicom.dcmread(path)
    except InvalidDicomError as exc:
        raise ImageRejected("not a DICOM Part 10 file (no 'DICM' prefix after the 128-byte preamble)") from exc
    except OSError as exc:
        raise ImageRejected(f"cannot be read ({exc.strerror or type(exc).__name__})") from exc
    except ImageRejected:
        raise
    except Exception as exc:  # pydicom raises many types for corrupt files; its messages may quote values
        raise ImageRejected(f"unreadable DICOM data set ({type(exc).__name__})") from exc


def deidentify_folder(
    src: Path,
    out: Path,
    pseudonymiser: Pseudonymiser | None = None,
    *,
    key: PseudonymKey | None = None,
    pseudonymise: Pseudonymise | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> BatchResult:
    """De-identify every file under `src` (a PACS folder export) into the outbox `out`, each output checked by
    the gate, so that only pseudonymised images are ever staged for upload.

    Images of patients with a clinical record in the outbox go to images/, the others to held/ (released when
    the record arrives); files that cannot be sent are listed in `held` with the reason; the site's age policy
    comes from the outbox's settings. `pseudonymiser` gives pseudonyms (or, as before, `key` and a
    `pseudonymise` issuer of ciphertexts). Returns a BatchResult whose `report` is the owner-only IDENTIFIABLE
    list of inputs by path; raises UsageError on a malformed settings file, TypeError when neither a
    pseudonymiser nor `key` and `pseudonymise` are given, and OSError if the outbox cannot be written.
    """
    if pseudonymiser is None:
        if key is None or pseudonymise is None:
            raise TypeError("deidentify_folder needs a Pseudonymiser (or key and pseudonymise)")
        pseudonymiser = Pseudonymiser(key, pseudonymise)
    outbox = Outbox(out)
    age_policy = outbox.settings().ages_over_89
    result = BatchResult()
    tick = progress or (lambda n, b: None)
    keys = DeidKeys.derive(pseudonymiser.key.key)
    with_record = outbox.record_pseudonyms()
    rows: list[list[str]] = []
    inputs = sorted(p for p in Path(src).rglob("*") if p.is_file())
    result.inputs = len(inputs)
    for number, path in enumerate(inputs, start=1):
        ref = f"input #{number}"
        tick(1, path.stat().st_size)
        try:
            ds = _read_input(path)
            done = deidentify_checked(
                ds, key=pseudonymiser.key, keys=keys, pseudonym_of=pseudonymiser.pseudonym, age_policy=age_policy
            )
        except IdentifierError as exc:
            result.held.append((ref, str(exc)))
            rows.append([str(number), str(path), "not sent", str(exc)])
            continue
        except (DeidHeld, ImageRejected) as exc:
            result.held.append((ref, exc.reason))
            rows.append([str(number), str(path), "not sent", exc.reason])
            continue
        if done.findings:
            result.findings.extend(done.findings)
            rows.append([str(number), str(path), "gate finding", str(done.findings[0])])
            continue
        added = outbox.add_image(done.clean, done.pseudonym, done.person, ready=done.pseudonym in with_record)
        (result.waiting if added.held else result.written).append(added.path)
        where = "held for a clinical record" if added.held else "ready"
        rows.append([str(number), str(path), where, added.path.relative_to(outbox.root).as_posix()])
    if rows:
        result.report = outbox.write_identifiable_report("deid", ["input", "path", "outcome", "detail"], rows)
    event(  # counts only: an input's path may name the patient
        "site.deid",
        inputs=result.inputs,
        ready=len(result.written),
        held_for_record=len(result.waiting),
        not_sent=len(result.held),
        findings=len(result.findings),
    )
    return result
