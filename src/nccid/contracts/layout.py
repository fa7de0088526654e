"""Key builders and parsers for the raw and processed layouts (the contract of ../shared/DESIGN.md).

Pure functions: no I/O. Every parser raises LayoutError with a reason a data manager can act on.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from typing import Literal

from nccid.errors import LayoutError

GROUPS = ("training", "validation")
Group = Literal["training", "validation"]
ClinicalKind = Literal["data", "status"]

#: DICOM Modality -> processed folder. Anything else is held back, never filed as 'unknown'.
MODALITY_FOLDER = {"CR": "xray", "DX": "xray", "CT": "ct", "MR": "mri"}
MODALITY_FOLDERS = ("xray", "ct", "mri")

_PSEUDONYM = re.compile(r"Covid[0-9]{1,12}")
_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
_UPLOADER = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_CLINICAL_NAME = re.compile(r"(?P<pseudonym>[^/]+)_(?P<kind>data|status)\.json")
_PROCESSED_CLINICAL = re.compile(r"(?P<kind>data|status)_(?P<date>\d{4}-\d{2}-\d{2})\.json")


def is_pseudonym(value: str) -> bool:
    """`Covid<digits>` exactly: anything else (an NHS number, a name, stray spaces) must not become a folder."""
    return bool(_PSEUDONYM.fullmatch(value))


def is_uid(value: str) -> bool:
    """A DICOM UID: dot-separated numbers without leading zeros, at most 64 characters."""
    return len(value) <= 64 and bool(_UID.fullmatch(value))


def is_upload_date(value: str) -> bool:
    """True for a calendar date written exactly YYYY-MM-DD, the only form an upload folder may take."""
    try:
        return dt.date.fromisoformat(value).isoformat() == value
    except ValueError:
        return False


def raw_prefix(uploader: str) -> str:
    """The prefix a site uploads below, `raw-<uploader>/`.

    Raises LayoutError for a name other than letters, digits, '.', '_' and '-' (it must be a safe key part).
    """
    if not _UPLOADER.fullmatch(uploader):
        raise LayoutError(f"invalid uploader name {uploader!r}: letters, digits, '.', '_' and '-' only")
    return f"raw-{uploader}/"


@dataclass(frozen=True, slots=True)
class RawKey:
    """A key below a raw upload prefix: raw-<uploader>/<date>/<area>/<rest>."""

    key: str
    prefix: str  # 'raw-<uploader>/'
    date: str
    area: Literal["data", "images"]
    rest: str  # the path inside the area


def parse_raw_key(key: str) -> RawKey:
    """Split an uploaded key into uploader prefix, upload date, area and path, so the loader knows what it holds.

    Raises LayoutError naming the key and what is wrong (no raw prefix, bad date, unknown area, sub-folder in data/).
    """
    parts = key.split("/")
    if len(parts) < 4 or not parts[0].startswith("raw-"):
        raise LayoutError(f"{key}: not in the raw layout raw-<uploader>/<YYYY-MM-DD>/{{data,images}}/<file>")
    prefix, date, area = parts[0] + "/", parts[1], parts[2]
    if not is_upload_date(date):
        raise LayoutError(f"{key}: {date!r} is not an upload date (YYYY-MM-DD)")
    if area not in ("data", "images"):
        raise LayoutError(f"{key}: {area!r} is neither 'data' nor 'images'")
    rest = "/".join(parts[3:])
    if area == "data" and "/" in rest:
        raise LayoutError(f"{key}: clinical records go directly in data/, not in sub-folders")
    return RawKey(key=key, prefix=prefix, date=date, area=area, rest=rest)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class ClinicalName:
    """The pseudonym and kind (data or status) read from a clinical file's name."""

    pseudonym: str
    kind: ClinicalKind


def parse_clinical_name(filename: str) -> ClinicalName:
    """`<Pseudonym>_data.json` (positive record) or `<Pseudonym>_status.json` (negative status record)."""
    match = _CLINICAL_NAME.fullmatch(filename)
    if not match:
        raise LayoutError(f"{filename}: clinical file names are <Pseudonym>_data.json or <Pseudonym>_status.json")
    pseudonym = match["pseudonym"]
    if not is_pseudonym(pseudonym):
        raise LayoutError(f"{filename}: {pseudonym!r} is not a pseudonym of the form Covid<digits>")
    return ClinicalName(pseudonym=pseudonym, kind=match["kind"])  # type: ignore[arg-type]


def clinical_key(group: str, pseudonym: str, kind: str, date: str) -> str:
    """Where a clinical record is filed: <group>/data/<pseudonym>/<kind>_<date>.json (no validation here)."""
    return f"{group}/data/{pseudonym}/{kind}_{date}.json"


def image_key(group: str, folder: str, patient: str, study: str, series: str, sop: str) -> str:
    """Where an image is filed: <group>/<modality folder>/<patient>/<study>/<series>/<sop>.dcm (no validation)."""
    return f"{group}/{folder}/{patient}/{study}/{series}/{sop}.dcm"


def metadata_key(image_key_: str) -> str:
    """The metadata JSON beside an image: <group>/<mod>-metadata/.../<sop>.json."""
    group, folder, rest = image_key_.split("/", 2)
    return f"{group}/{folder}-metadata/{rest[: -len('.dcm')]}.json"


@dataclass(frozen=True, slots=True)
class ProcessedKey:
    """The parts of a key in the processed layout; fields that do not apply to its kind are ''."""

    key: str
    group: str
    kind: Literal["image", "metadata", "clinical"]
    patient: str
    folder: str = ""  # xray / ct / mri for images and metadata
    study: str = ""
    series: str = ""
    sop: str = ""
    clinical_kind: str = ""
    date: str = ""


def parse_processed_key(key: str) -> ProcessedKey:
    """Inverse of the builders above; used to rebuild the catalog from the store alone."""
    parts = key.split("/")
    if len(parts) < 3 or parts[0] not in GROUPS:
        raise LayoutError(f"{key}: not below training/ or validation/")
    group, folder = parts[0], parts[1]
    if folder == "data" and len(parts) == 4:
        match = _PROCESSED_CLINICAL.fullmatch(parts[3])
        if match and is_pseudonym(parts[2]):
            return ProcessedKey(key, group, "clinical", parts[2], clinical_kind=match["kind"], date=match["date"])
    base = folder.removesuffix("-metadata")
    if base in MODALITY_FOLDERS and len(parts) == 6:
        patient, study, series, name = parts[2:]
        suffix = ".json" if folder.endswith("-metadata") else ".dcm"
        sop = name[: -len(suffix)] if name.endswith(suffix) else ""
        if is_pseudonym(patient) and is_uid(study) and is_uid(series) and is_uid(sop):
            kind = "metadata" if suffix == ".json" else "image"
            return ProcessedKey(key, group, kind, patient, base, study, series, sop)  # type: ignore[arg-type]
    raise LayoutError(f"{key}: not a processed image, metadata or clinical key")
