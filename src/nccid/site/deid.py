"""DICOM de-identification: the PS3.15 Annex E Basic Application Level Confidentiality Profile, with the options
this programme uses.

The action table is not typed by hand: it is the standard's Table E.1-1 as shipped, generated from the standard,
by the `dicom-anonymizer` package (edition below). On top of the basic profile:

- Retain Patient Characteristics (sex, age, size, weight: the statistics use them);
- Retain Device Identity (manufacturer and model are never removed by the profile; device serial numbers and
  detector, gantry, generator, plate and cassette IDs are kept too);
- NCCID dates: StudyDate and AcquisitionDate kept, PatientBirthDate reduced to its year + 0101, every other date
  or date-time the profile would remove shifted by a per-patient offset derived from the key, so that intervals
  survive and a re-sent image gets the same dates;
- PatientID and PatientName become the pseudonym; UIDs become keyed deterministic 2.25 UIDs (references inside
  the data stay consistent, a re-send gets the same UIDs); private tags are removed; every sequence item is
  treated like the top level.

Objects likely to carry burned-in identifiers (BurnedInAnnotation YES, secondary capture, any SOP class other
than the CR/DX/CT/MR images the warehouse files) are held with a reason, never de-identified and sent.

The output does not depend on the route (a folder export or the site DICOM node): the file meta is the project's
own (`project_file_meta`: its implementation class UID and version name, no source AE title or other meta
elements of the sending system), and the transfer syntax follows one rule (`output_transfer_syntax`: native and
deflated encodings are written as Explicit VR Little Endian, which every reader handles; compressed pixel
encodings such as JPEG, JPEG 2000 and RLE stay as they are). The same image sent both ways gives the same bytes.

Ages over 89 (`AgePolicy`): a site setting. `keep` (the original programme's policy, the default) leaves
PatientAge and the reduced birth year as they are; `cap` writes PatientAge 090Y and moves the birth year so
that the person is 90 at the study date.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import importlib
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import UID, ExplicitVRLittleEndian

from nccid.errors import DeidHeld

PROFILE_EDITION = "dicomfields_2026c"  # dicom-anonymizer's machine-readable Table E.1-1
_CATEGORY_ACTION = {
    "D_TAGS": "D",
    "Z_TAGS": "Z",
    "X_TAGS": "X",
    "U_TAGS": "U",
    "Z_D_TAGS": "Z",
    "X_Z_TAGS": "X",
    "X_D_TAGS": "X",
    "X_Z_D_TAGS": "X",
    "X_Z_U_STAR_TAGS": "U*",
}
#: CID 7050 codes (scheme DCM) of the profile and the options applied
METHOD_CODES = [
    ("113100", "Basic Application Confidentiality Profile"),
    ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
    ("113108", "Retain Patient Characteristics Option"),
    ("113109", "Retain Device Identity Option"),
]
#: LO is at most 64 characters a value, so the description is multi-valued
METHOD = [
    "nccid: PS3.15 E.1 Basic Application Confidentiality Profile",
    "Retain Patient Characteristics",
    "Retain Device Identity",
    "NCCID dates",
]
PATIENT_CHARACTERISTICS = {Tag(0x0010, 0x0040), Tag(0x0010, 0x1010), Tag(0x0010, 0x1020), Tag(0x0010, 0x1030)}
DEVICE_IDENTITY = {
    Tag(0x0018, 0x1000),
    Tag(0x0018, 0x700A),
    Tag(0x0018, 0x1008),
    Tag(0x0018, 0x1005),
    Tag(0x0018, 0x1004),
    Tag(0x0018, 0x1007),
}
KEPT_DATES = {Tag(0x0008, 0x0020), Tag(0x0008, 0x0022)}  # StudyDate, AcquisitionDate
BIRTH_DATE = Tag(0x0010, 0x0030)
PSEUDONYM_TAGS = {Tag(0x0010, 0x0010), Tag(0x0010, 0x0020)}  # PatientName, PatientID
ALLOWED_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1",  # CR
    "1.2.840.10008.5.1.4.1.1.1.1",  # DX for presentation
    "1.2.840.10008.5.1.4.1.1.1.1.1",  # DX for processing
    "1.2.840.10008.5.1.4.1.1.2",  # CT
    "1.2.840.10008.5.1.4.1.1.2.1",  # enhanced CT
    "1.2.840.10008.5.1.4.1.1.4",  # MR
    "1.2.840.10008.5.1.4.1.1.4.1",  # enhanced MR
}


#: the project's own DICOM implementation class UID (a 2.25 UUID-derived UID) and version name, written in the
#: file meta of every de-identified image. The version name names the output format, not the software release:
#: it changes only when de-identified bytes change, so a re-send after an upgrade is still a duplicate.
IMPLEMENTATION_CLASS_UID = "2.25.39129277982002273127591903119906553236"
IMPLEMENTATION_VERSION_NAME = "NCCID_DEID_1"
#: ages above this are capped by the `cap` policy (HIPAA Safe Harbor and the NCCID's own option)
AGE_CAP = 90
AGE_POLICIES = ("keep", "cap")


def _load_table() -> tuple[dict[int, str], list[tuple[int, int, int, int, str]]]:
    module = importlib.import_module(f"dicomanonymizer.dicom_anonymization_databases.{PROFILE_EDITION}")
    exact: dict[int, str] = {}
    masked: list[tuple[int, int, int, int, str]] = []
    for category, action in _CATEGORY_ACTION.items():
        for entry in getattr(module, category):
            if len(entry) == 2:
                exact[int(Tag(*entry))] = action
            else:  # repeating groups such as overlays (60xx,3000): group and element masks
                group, element, group_mask, element_mask = entry
                masked.append((group, element, group_mask, element_mask, action))
    return exact, masked


EXACT_ACTIONS, MASKED_ACTIONS = _load_table()


def profile_action(tag: int) -> str | None:
    """D (dummy), Z (empty), X (remove), U (new UID), U* (de-identify inside), or None (keep)."""
    action = EXACT_ACTIONS.get(int(tag))
    if action is not None:
        return action
    group, element = int(tag) >> 16, int(tag) & 0xFFFF
    for g, e, gm, em, masked_action in MASKED_ACTIONS:
        if group & gm == g and element & em == e:
            return masked_action
    return None


@dataclass(frozen=True)
class DeidKeys:
    """Keys for UIDs and date shifts, derived from the programme's pseudonym key (so every site agrees)."""

    uid_key: bytes
    date_key: bytes

    @classmethod
    def derive(cls, secret: bytes) -> DeidKeys:
        return cls(
            hmac.new(secret, b"nccid-uid", hashlib.sha256).digest(),
            hmac.new(secret, b"nccid-date", hashlib.sha256).digest(),
        )

    def uid(self, original: str) -> str:
        """A keyed, deterministic 2.25 UID: the same original always maps to the same new UID."""
        digest = hmac.new(self.uid_key, original.strip().encode(), hashlib.sha256).digest()[:16]
        return f"2.25.{int.from_bytes(digest, 'big')}"

    def day_offset(self, person: str) -> int:
        """Days to move a person's other dates back (1-365), the same at every site and on every re-send."""
        digest = hmac.new(self.date_key, person.encode(), hashlib.sha256).digest()
        return int.from_bytes(digest[:4], "big") % 365 + 1


def _shift(value: str, vr: str, days: int) -> str | None:
    text = str(value).strip()
    try:
        if vr == "DA":
            return (dt.datetime.strptime(text[:8], "%Y%m%d") - dt.timedelta(days=days)).strftime("%Y%m%d")
        shifted = dt.datetime.strptime(text[:8], "%Y%m%d") - dt.timedelta(days=days)
        return shifted.strftime("%Y%m%d") + text[8:]
    except ValueError:
        return None


def _dummy(vr: str) -> object:
    return {"PN": "ANONYMOUS", "DA": "", "TM": "", "DT": "", "UI": "", "SQ": Sequence()}.get(
        vr, 0 if vr in ("US", "SS", "UL", "SL", "FL", "FD", "IS", "DS") else "ANONYMISED"
    )


def _apply(ds: Dataset, pseudonym: str, keys: DeidKeys, days: int) -> None:
    """One pass over the tags; an element is only decoded when something is to be done with it."""
    for tag in list(ds.keys()):
        if tag.is_private:
            del ds[tag]
            continue
        if tag in PSEUDONYM_TAGS:
            ds[tag].value = pseudonym
            continue
        if tag in PATIENT_CHARACTERISTICS or tag in DEVICE_IDENTITY or tag in KEPT_DATES:
            continue
        action = profile_action(tag)
        raw_vr = ds.get_item(tag).VR
        if action is None and raw_vr not in ("SQ", None):
            continue  # kept as it is (pixel data included), never decoded
        elem = ds[tag]
        if elem.VR == "SQ":
            if action == "X":
                del ds[tag]
            else:  # every item is treated like the top level
                for item in elem.value:
                    _apply(item, pseudonym, keys, days)
            continue
        if action is None:
            continue
        if tag == BIRTH_DATE:
            text = str(elem.value or "")
            elem.value = f"{text[:4]}0101" if len(text) >= 4 and text[:4].isdigit() else ""
        elif elem.VR in ("DA", "DT") and elem.value:
            shifted = _shift(elem.value, elem.VR, days)
            if shifted is None:
                del ds[tag]
            else:
                elem.value = shifted
        elif action in ("U", "U*") and elem.VR == "UI":
            values = elem.value if isinstance(elem.value, list | tuple) else [elem.value]
            mapped = [keys.uid(str(v)) for v in values if v]
            elem.value = mapped if len(mapped) > 1 else (mapped[0] if mapped else "")
        elif action == "X":
            del ds[tag]
        elif action == "Z":
            elem.value = "" if elem.VR not in ("US", "SS", "UL", "SL", "FL", "FD") else None
        else:
            elem.value = _dummy(elem.VR)


def check_sendable(ds: Dataset) -> None:
    """Objects likely to carry burned-in identifiers are held, not de-identified and sent."""
    if str(ds.get("BurnedInAnnotation", "")).strip().upper() == "YES":
        raise DeidHeld("BurnedInAnnotation (0028,0301) is YES: identifiers may be burned into the pixels")
    sop_class = str(ds.get("SOPClassUID", "") or ds.file_meta.get("MediaStorageSOPClassUID", ""))
    if sop_class.startswith("1.2.840.10008.5.1.4.1.1.7"):
        raise DeidHeld("secondary capture: screenshots often carry burned-in identifiers")
    if sop_class not in ALLOWED_SOP_CLASSES:
        raise DeidHeld(f"unsupported SOP class {UID(sop_class).name or sop_class}: only CR, DX, CT and MR images")


def output_transfer_syntax(source: str | None) -> UID:
    """The one rule for the transfer syntax of de-identified output, whatever the route: a compressed pixel
    encoding (JPEG, JPEG-LS, JPEG 2000, RLE, ...) is kept as it is; everything else (implicit or explicit,
    little or big endian, deflated) becomes Explicit VR Little Endian."""
    syntax = UID(str(source or ExplicitVRLittleEndian))
    if syntax.is_transfer_syntax and syntax.is_compressed and not syntax.is_deflated:
        return syntax
    return ExplicitVRLittleEndian


def project_file_meta(ds: Dataset) -> FileMetaDataset:
    """The file meta of a de-identified image: only what PS3.10 requires, with the project's implementation
    class UID and version name (nothing from the sending system: no source AE title, no private meta)."""
    source_meta = ds.file_meta if hasattr(ds, "file_meta") else FileMetaDataset()
    source = source_meta.get("TransferSyntaxUID")
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = ds.get("SOPClassUID") or source_meta.get("MediaStorageSOPClassUID")
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = output_transfer_syntax(source)
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    return meta


def _little_endian_pixels(ds: Dataset) -> None:
    """Native pixel data read from a big-endian file holds big-endian words: swap them for little endian
    (pydicom re-encodes every other element itself, but copies Pixel Data bytes as they are)."""
    if ds.original_encoding[1] is not False or "PixelData" not in ds:
        return
    if ds.file_meta.get("TransferSyntaxUID") not in (None, "1.2.840.10008.1.2.2"):
        return  # encapsulated data is byte-ordered by its codec, not by the transfer syntax
    bits = int(ds.get("BitsAllocated", 8))
    if bits in (16, 32, 64):
        words = np.frombuffer(ds.PixelData, dtype=f">u{bits // 8}")
        ds.PixelData = words.astype(f"<u{bits // 8}").tobytes()
        ds["PixelData"].VR = "OW"


def _age_years(ds: Dataset) -> int | None:
    """The age at the study in whole years, from PatientAge (nnnY) or else from the birth and study dates."""
    text = str(ds.get("PatientAge", "") or "").strip().upper()
    if len(text) == 4 and text[:3].isdigit():
        return int(text[:3]) if text[3] == "Y" else 0
    birth, study = str(ds.get("PatientBirthDate", "") or ""), str(ds.get("StudyDate", "") or "")
    if len(birth) >= 4 and len(study) >= 4 and birth[:4].isdigit() and study[:4].isdigit():
        return int(study[:4]) - int(birth[:4])
    return None


def cap_age(ds: Dataset) -> bool:
    """The `cap` policy: an age over 89 becomes 90 (PatientAge 090Y) and the birth year moves to match (the
    study year minus 90). Returns True if anything changed."""
    age = _age_years(ds)
    if age is None or age < AGE_CAP:
        return False
    changed = False
    if "PatientAge" in ds and str(ds.PatientAge) != f"{AGE_CAP:03d}Y":
        ds.PatientAge = f"{AGE_CAP:03d}Y"
        changed = True
    study = str(ds.get("StudyDate", "") or "")
    birth = str(ds.get("PatientBirthDate", "") or "")
    if birth and len(study) >= 4 and study[:4].isdigit():
        moved = f"{int(study[:4]) - AGE_CAP}0101"
        changed = changed or birth != moved
        ds.PatientBirthDate = moved
    return changed


def deidentify(ds: Dataset, *, pseudonym: str, person: str, keys: DeidKeys, age_policy: str = "keep") -> Dataset:
    """De-identify `ds` in place and return it. `person` (the NHS/CHI ciphertext) fixes the date offset;
    `age_policy` is the site's setting for ages over 89 (`keep` or `cap`). Raises DeidHeld for objects that
    may carry burned-in identifiers. The file meta becomes the project's own (see `project_file_meta`)."""
    check_sendable(ds)
    _apply(ds, pseudonym, keys, keys.day_offset(person))  # private tags go in the same pass, at every depth
    if age_policy == "cap":
        cap_age(ds)
    if not hasattr(ds, "file_meta"):
        ds.file_meta = FileMetaDataset()
    _little_endian_pixels(ds)
    ds.file_meta = project_file_meta(ds)
    ds.preamble = b"\0" * 128  # a PACS may put its own bytes (a TIFF header, say) in the preamble
    ds.PatientIdentityRemoved = "YES"
    ds.LongitudinalTemporalInformationModified = "MODIFIED"
    ds.DeidentificationMethod = METHOD
    codes = []
    for value, meaning in METHOD_CODES:
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
        codes.append(item)
    ds.DeidentificationMethodCodeSequence = codes
    return ds
