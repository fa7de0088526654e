"""The validation cohort of a model's intended use, its ground truth, and its read-only materialisation.

Selection reads the warehouse's `validation/` group through the store interface only (listing keys, never
hashing objects to list them): the clinical records (`validation/data/<P>/{data,status}_<date>.json`) and the
image metadata JSON beside every image. The rules (a patient's label, their subgroup attributes, which image
is theirs) are pure functions of plain values.

Materialisation writes one folder per case, `<input>/<case>/image-1.dcm`, and nothing else: no clinical data,
no label. Only the header passes through Python; from a local store the pixel data is copied by the kernel.
Each case has a random identifier of its cohort's own; the DICOM header's PatientID, PatientName and every UID
(study, series, SOP instance, media storage) are replaced by values of the cohort's own, so the model never sees
a pseudonym or an SOP Instance UID of the warehouse. (A sealed run's materialised cohort is frozen and read by
later runs of the same intended use: frozen.py.) The private cohort manifest (keys and checksums) and the ground truth
stay with the validator; only their SHA-256 hashes go into the report.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import datetime as dt
import hashlib
import io
import json
import os
import re
import secrets
import shutil
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import pydicom
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from nccid.contracts.layout import LayoutError, ProcessedKey, parse_processed_key
from nccid.errors import CohortError
from nccid.store import ObjectStore
from nccid.validation.manifest import RADIOGRAPH_MODALITIES, IntendedUse

#: NHS ethnic category codes grouped as in the census's five high-level groups
ETHNICITY_GROUPS = {
    **dict.fromkeys("ABC", "White"),
    **dict.fromkeys("DEFG", "Mixed"),
    **dict.fromkeys("HJKL", "Asian"),
    **dict.fromkeys("MNP", "Black"),
    **dict.fromkeys("RS", "Other"),
}
ETHNICITY_WORDS = {"white": "White", "mixed": "Mixed", "asian": "Asian", "black": "Black", "other": "Other"}
AGE_BANDS = ((0, 17, "under 18"), (18, 39, "18-39"), (40, 59, "40-59"), (60, 79, "60-79"), (80, 200, "80+"))
#: comorbidity fields of the positive record, coded No 0 / Yes >= 1 / Unknown (2 for the yes-no fields)
COMORBIDITIES = {
    "hypertension": ("PMH hypertension", "PMH h1pertension"),
    "diabetes": ("PMH diabetes mellitus type II",),
    "chronic kidney disease": ("PMH CKD",),
    "cardiovascular disease": ("PMH CVS disease",),
    "lung disease": ("PMH Lung disease",),
}
_YES_NO_UNKNOWN = {"PMH hypertension", "PMH h1pertension", "PMH diabetes mellitus type II", "PMH CKD"}
_UNKNOWN_CODE = {"PMH Lung disease": 6}
_DATE_FORMATS = ("%m/%d/%Y", "%d/%m/%Y", "%Y-%m-%d")
_POSITIVE_TEXT = re.compile(r"\b(positive|detected)\b", re.IGNORECASE)
_NEGATIVE_TEXT = re.compile(r"\b(negative|not detected)\b", re.IGNORECASE)
UNKNOWN = "unknown"
NOT_RECORDED = "not recorded (no positive test record)"


# -- pure rules ----------------------------------------------------------------------------------------
def is_positive_result(value: object) -> bool | None:
    """A result field read as the template codes it (1 positive, 0 negative) or as lab text ('RNA DETECTED').
    Returns None when it says neither."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return {1: True, 0: False}.get(int(value)) if value in (0, 1) else None
    if isinstance(value, str):
        text = value.strip()
        if text in ("0", "1"):
            return text == "1"
        if _NEGATIVE_TEXT.search(text):
            return False
        if _POSITIVE_TEXT.search(text):
            return True
    return None


def _code(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def ground_truth(task: str, positive: dict | None, status: dict | None) -> tuple[int | None, str]:
    """A patient's label for `task` from their latest positive (`data_`) and status records.

    Returns (1 or 0, "") or (None, the reason the patient is left out). For `covid19` a data_ record with a
    positive RT-PCR or Final COVID Status is positive and a status_ record saying negative is negative; the
    prognostic tasks look at Death or ITU admission in the positive record only.
    """
    if task == "covid19":
        if positive is not None:
            fields = ("1st RT-PCR result", "2nd RT-PCR result", "Final COVID Status")
            if any(is_positive_result(positive.get(f)) for f in fields):
                return 1, ""
            return None, "positive record without a positive RT-PCR or Final COVID Status"
        if status is not None:
            if _code(status.get("SwabStatus")) == 0:
                return 0, ""
            return None, "status record without a negative SwabStatus"
        return None, "no clinical record"
    field_name = {"death": "Death", "itu_admission": "ITU admission"}[task]
    if positive is None:
        return None, "no positive record (prognostic tasks concern COVID-19 positive patients)"
    code = _code(positive.get(field_name))
    if code not in (0, 1):
        return None, f"{field_name} missing or not 0/1"
    return code, ""


def age_of(record: dict) -> int | None:
    """The clinical Age in whole years, or None when missing or not a number."""
    value = record.get("Age")
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return int(value)
    if isinstance(value, str):
        try:
            return int(float(value.strip()))
        except ValueError:
            return None
    return None


def age_band(age: int | None) -> str:
    """The subgroup label of an age ('under 18', '18-39', ... '80+'), or 'unknown': bands, not ages, are reported."""
    if age is None:
        return UNKNOWN
    return next((label for low, high, label in AGE_BANDS if low <= age <= high), UNKNOWN)


def sex_of(record: dict) -> str:
    """Template coding Male 1 / Female 0, also 'M' / 'F'; anything else (2, 3, ...) is unknown."""
    value = record.get("Sex")
    if isinstance(value, str):
        value = value.strip().upper()
    return {1: "male", "1": "male", "M": "male", 0: "female", "0": "female", "F": "female"}.get(value, UNKNOWN)


def ethnicity_group(record: dict) -> str:
    """The census high-level group (White, Mixed, Asian, Black, Other) of a record's NHS ethnic category code or
    of words naming it; 'unknown' for anything else."""
    value = record.get("Ethnicity")
    if not isinstance(value, str):
        return UNKNOWN
    text = value.strip()
    if len(text) == 1:
        return ETHNICITY_GROUPS.get(text.upper(), UNKNOWN)
    lowered = text.lower()
    return next((group for word, group in ETHNICITY_WORDS.items() if word in lowered), UNKNOWN)


def comorbidities(record: dict | None) -> dict[str, str]:
    """'yes' / 'no' / 'unknown' per comorbidity of the positive record; `NOT_RECORDED` for a patient with none (a
    COVID-19 negative: status records hold no comorbidities), kept apart from 'unknown' so that a robustness row
    never mixes positives of unknown history with every negative."""
    out = {}
    for name, fields in COMORBIDITIES.items():
        value = UNKNOWN if record is not None else NOT_RECORDED
        if record is not None:
            code = next((_code(record[f]) for f in fields if f in record), None)
            if code == 0:
                value = "no"
            elif code is not None and not (
                (fields[0] in _YES_NO_UNKNOWN and code == 2) or _UNKNOWN_CODE.get(fields[0]) == code
            ):
                value = "yes"
        out[name] = value
    return out


def swab_date(positive: dict | None, status: dict | None) -> dt.date | None:
    """The swab date of the record that gives the label (MM/DD/YYYY, DD/MM/YYYY or ISO, as real sheets hold)."""
    text = (positive or {}).get("Date of Positive Covid Swab") if positive else (status or {}).get("SwabDate")
    if not isinstance(text, str):
        return None
    formats = _DATE_FORMATS if positive else ("%d/%m/%Y", "%m/%d/%Y", "%Y-%m-%d")
    for fmt in formats:
        try:
            return dt.datetime.strptime(text.strip(), fmt).date()
        except ValueError:
            continue
    return None


def _tag(meta: dict, tag: str) -> str:
    value = meta.get(tag, {}).get("Value") or [""]
    return str(value[0]).strip()


@dataclass(frozen=True)
class ImageInfo:
    """What selection needs of one stored image, from its metadata JSON."""

    key: str  # the image key in the processed layout
    patient: str
    study: str
    modality: str
    view: str
    study_date: str  # YYYYMMDD or ""
    manufacturer: str
    model: str

    @classmethod
    def from_metadata(cls, image_key: str, patient: str, study: str, meta: dict) -> ImageInfo:
        return cls(
            key=image_key,
            patient=patient,
            study=study,
            modality=_tag(meta, "00080060").upper(),
            view=_tag(meta, "00185101").upper(),
            study_date=_tag(meta, "00080020"),
            manufacturer=_tag(meta, "00080070") or UNKNOWN,
            model=_tag(meta, "00081090") or UNKNOWN,
        )


def image_eligible(image: ImageInfo, use: IntendedUse, swab: dt.date | None) -> str:
    """'' when the image fits the intended use's input and window, else the reason it does not."""
    if image.modality not in use.modalities:
        return "modality outside the intended use"
    if image.view not in use.views:
        return "view outside the intended use"
    if use.window_days is not None:
        try:
            taken = dt.datetime.strptime(image.study_date, "%Y%m%d").date()
        except ValueError:
            return "no study date to compare with the swab date"
        if swab is None:
            return "no swab date to compare with the study date"
        if abs((taken - swab).days) > use.window_days:
            return "study date outside the window around the swab date"
    return ""


def pick_images(images: Iterable[ImageInfo], unit: str) -> list[ImageInfo]:
    """The first image (by study date, then key) per patient, or per study when the unit is 'study'."""
    chosen: dict[str, ImageInfo] = {}
    for image in sorted(images, key=lambda i: (i.study_date or "99999999", i.key)):
        chosen.setdefault(image.patient if unit == "patient" else image.study, image)
    return list(chosen.values())


# -- the cohort ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """One unit of the cohort as the validator knows it (never shown to the model or the vendor)."""

    case: str  # the cohort's own identifier, the only one the model sees
    key: str  # the image key in the warehouse
    label: int
    attributes: dict[str, str]  # subgroup attributes: sex, age band, ethnicity group, site, scanner, ...


@dataclass
class Cohort:
    """The selected cases and why everyone else was left out (counts only)."""

    cases: list[Case]
    excluded: Counter = field(default_factory=Counter)
    patients_considered: int = 0

    def ground_truth_json(self) -> dict[str, Any]:
        """Case -> label and attributes: the private ground truth whose hash goes into the report."""
        return {c.case: {"label": c.label, **c.attributes} for c in sorted(self.cases, key=lambda c: c.case)}

    def to_json(self) -> dict[str, Any]:
        """The whole selection as JSON (private: it maps cases to warehouse keys); `from_json` reads it back."""
        return {
            "cases": [{"case": c.case, "key": c.key, "label": c.label, "attributes": c.attributes} for c in self.cases],
            "excluded": dict(self.excluded),
            "patients_considered": self.patients_considered,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Cohort:
        """The Cohort that `to_json` wrote. Raises KeyError or TypeError on anything else."""
        cases = [Case(c["case"], c["key"], int(c["label"]), dict(c["attributes"])) for c in data["cases"]]
        return cls(cases, Counter(data["excluded"]), int(data["patients_considered"]))


def _latest(records: dict[str, tuple[str, str]], kind: str) -> str | None:
    dated = [(date, key) for (k, date), key in records.items() if k == kind]  # type: ignore[misc]
    return max(dated)[1] if dated else None


def _read_json(store: ObjectStore, key: str) -> dict | None:
    try:
        data = json.loads(store.read(key))
    except (ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _map(store: ObjectStore, function, items: list) -> list:
    if store.remote and len(items) > 4:
        with cf.ThreadPoolExecutor(max_workers=8) as pool:
            return list(pool.map(function, items))
    return [function(i) for i in items]


@dataclass(frozen=True)
class CohortSources:
    """What selection reads of a warehouse group, as listed (keys only, nothing read yet): the clinical records
    by patient ((kind, date) -> key) and the parsed keys of the image metadata JSON."""

    group: str
    clinical: dict[str, dict[tuple[str, str], str]]
    metadata: list[ProcessedKey]

    def keys(self) -> list[str]:
        """Every listed key, sorted: processed objects are never overwritten, so these name the whole input of
        selection (see frozen.cohort_fingerprint)."""
        listed = [key for records in self.clinical.values() for key in records.values()]
        return sorted(listed + [parsed.key for parsed in self.metadata])


def list_sources(store: ObjectStore, group: str = "validation") -> CohortSources:
    """List the clinical records and image metadata below `group/` (one listing each, no object read). Raises
    CohortError when the group holds neither."""
    clinical: dict[str, dict[tuple[str, str], str]] = {}
    for info in store.list_unhashed(f"{group}/data/"):
        try:
            parsed = parse_processed_key(info.key)
        except LayoutError:
            continue
        if parsed.kind == "clinical":
            clinical.setdefault(parsed.patient, {})[(parsed.clinical_kind, parsed.date)] = info.key
    metadata = []
    for info in store.list_unhashed(f"{group}/xray-metadata/"):
        try:
            parsed = parse_processed_key(info.key)
        except LayoutError:
            continue
        metadata.append(parsed)
    if not clinical and not metadata:
        raise CohortError(f"{store.url}: nothing below {group}/ (load the warehouse first: nccid warehouse load)")
    return CohortSources(group, clinical, metadata)


def select_cohort(
    store: ObjectStore, use: IntendedUse, *, group: str = "validation", sources: CohortSources | None = None
) -> Cohort:
    """The cohort of `use` from the warehouse's `group` (the held-out validation set unless told), from
    `sources` when the caller has listed them already (`list_sources`).

    Returns the Cohort (cases with fresh identifiers) and the counted reasons for exclusion.
    Raises CohortError when the modality is not a radiograph, or no case, positive or negative is left.
    """
    if any(m not in RADIOGRAPH_MODALITIES for m in use.modalities):
        raise CohortError(
            f"intended use input {', '.join(use.modalities)}: this version builds radiograph cohorts only (CR, DX)"
        )
    sources = sources or list_sources(store, group)
    group, clinical, metadata = sources.group, sources.clinical, sources.metadata
    metas = _map(store, lambda p: _read_json(store, p.key), metadata)
    images_by_patient: dict[str, list[ImageInfo]] = {}
    for parsed, meta in zip(metadata, metas, strict=True):
        if meta is None:
            continue
        image_key = f"{group}/{parsed.folder}/{parsed.patient}/{parsed.study}/{parsed.series}/{parsed.sop}.dcm"
        images_by_patient.setdefault(parsed.patient, []).append(
            ImageInfo.from_metadata(image_key, parsed.patient, parsed.study, meta)
        )
    cohort = Cohort(cases=[], patients_considered=len(set(clinical) | set(images_by_patient)))
    patients = sorted(set(clinical) | set(images_by_patient))

    def records(patient: str) -> tuple[dict | None, dict | None]:
        keys = clinical.get(patient, {})
        data_key, status_key = _latest(keys, "data"), _latest(keys, "status")
        return (
            _read_json(store, data_key) if data_key else None,
            _read_json(store, status_key) if status_key else None,
        )

    for patient, (positive, status) in zip(patients, _map(store, records, patients), strict=True):
        label, reason = ground_truth(use.task, positive, status)
        if label is None:
            cohort.excluded[reason] += 1
            continue
        record = positive or status or {}
        age = age_of(record)
        if (use.min_age is not None or use.max_age is not None) and age is None:
            cohort.excluded["age unknown"] += 1
            continue
        if (use.min_age is not None and age < use.min_age) or (use.max_age is not None and age > use.max_age):
            cohort.excluded["age outside the intended population"] += 1
            continue
        swab = swab_date(positive, status)
        reasons = Counter()
        eligible = []
        for image in images_by_patient.get(patient, []):
            why = image_eligible(image, use, swab)
            if why:
                reasons[why] += 1
            else:
                eligible.append(image)
        if not eligible:
            cohort.excluded[reasons.most_common(1)[0][0] if reasons else "no radiograph"] += 1
            continue
        base = {
            "sex": sex_of(record),
            "age band": age_band(age),
            "ethnicity group": ethnicity_group(record),
            "site": str(record.get("SubmittingCentre") or UNKNOWN),
            **{f"comorbidity: {k}": v for k, v in comorbidities(positive).items()},
        }
        for image in pick_images(eligible, use.unit):
            attributes = {
                **base,
                "scanner manufacturer": image.manufacturer,
                "scanner model": image.model,
                "modality": image.modality,
            }
            cohort.cases.append(Case(f"case-{secrets.token_hex(6)}", image.key, label, attributes))
    if not cohort.cases:
        raise CohortError(f"{store.url}: no case in {group}/ fits the intended use ({dict(cohort.excluded)})")
    labels = {c.label for c in cohort.cases}
    if labels != {0, 1}:
        missing = "negative" if 1 in labels else "positive"
        raise CohortError(f"{store.url}: the cohort of the intended use has no {missing} case; metrics need both")
    cohort.cases.sort(key=lambda c: c.case)  # the order says nothing of site, group or label
    return cohort


# -- materialisation -----------------------------------------------------------------------------------
#: header elements replaced by the cohort's own values, so the model sees no warehouse identifier
_REPLACED_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
_REMOVED = ("AccessionNumber", "StudyID", "OtherPatientIDsSequence", "ReferencedImageSequence")


def _opaque_header(ds: pydicom.Dataset, case: str) -> bytes:
    """The header (preamble, file meta, elements before the pixel data) of `ds` with PatientID/PatientName set to
    `case`, every instance UID replaced by a fresh random one and the identifying references removed."""
    ds.PatientID = case
    ds.PatientName = case
    for keyword in _REPLACED_UIDS:
        setattr(ds, keyword, generate_uid())
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for keyword in _REMOVED:
        if keyword in ds:
            delattr(ds, keyword)
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if syntax not in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):  # big endian, deflated, ...: pydicom's whole way
        header = io.BytesIO()
        ds.save_as(header, enforce_file_format=True)
        return header.getvalue()
    # the same bytes as save_as(enforce_file_format=True) (a test compares them), without its deep copy of the
    # file meta: half the cost, in a step that holds the GIL for every case of the cohort
    header = DicomBytesIO()
    header.is_little_endian, header.is_implicit_VR = True, syntax == ImplicitVRLittleEndian
    header.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(header, ds.file_meta, enforce_standard=True)
    write_dataset(header, ds)
    return header.getvalue()


def opaque_dicom(data: bytes, case: str) -> tuple[bytes, memoryview]:
    """The DICOM file with PatientID/PatientName set to `case` and every instance UID replaced by a fresh
    random one (pixels and imaging tags untouched), as (new header, the original bytes from the pixel data on).

    Only the header is decoded and re-encoded; the pixel data element and anything after it are copied as they
    are, so the cost does not grow with the image. Raises pydicom's InvalidDicomError on a non-DICOM file.
    """
    stream = io.BytesIO(data)
    ds = pydicom.dcmread(stream, stop_before_pixels=True)
    tail = memoryview(data)[stream.tell() :]  # pydicom stops at the start of (7FE0,0010)
    return _opaque_header(ds, case), tail


def canonical_hash(data: object) -> str:
    """SHA-256 of the canonical JSON form (sorted keys, no spaces): the same content, the same hash."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@contextlib.contextmanager
def _case_file(folder: Path, case: str) -> Iterator[BinaryIO]:
    """The new file `folder/<case>/image-1.dcm`, open for writing; once written, it and its folder are read-only
    (the model reads them and nothing else)."""
    case_dir = folder / case
    case_dir.mkdir(mode=0o755)
    fd = os.open(case_dir / "image-1.dcm", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444)
    with os.fdopen(fd, "wb") as handle:
        yield handle
    case_dir.chmod(0o555)


def write_case(folder: Path, case: str, *chunks: bytes | memoryview) -> str:
    """Write one case's file (the concatenated `chunks`) read-only below `folder/<case>/`; returns its SHA-256."""
    digest = hashlib.sha256()
    with _case_file(folder, case) as handle:
        for chunk in chunks:
            digest.update(chunk)
            handle.write(chunk)
    return digest.hexdigest()


def _copy_rest(source: BinaryIO, target: BinaryIO) -> None:
    """Copy `source` from its position to its end onto `target`: in the kernel (copy_file_range, no bytes through
    Python) when both are files on disk, else through a buffer (a remote store's reader)."""
    try:
        source_fd, target_fd = source.fileno(), target.fileno()
    except (AttributeError, io.UnsupportedOperation):
        source_fd = target_fd = -1
    if source_fd < 0 or not hasattr(os, "copy_file_range"):
        shutil.copyfileobj(source, target, 1 << 20)
        return
    target.flush()
    offset = source.tell()
    try:
        while copied := os.copy_file_range(source_fd, target_fd, 1 << 30, offset_src=offset):
            offset += copied
    except OSError:  # a file system or kernel without it: copy through a buffer from where the kernel stopped
        source.seek(offset)
        shutil.copyfileobj(source, target, 1 << 20)


def _materialise_case(store: ObjectStore, case: Case, folder: Path) -> None:
    """Write one case's opaque file `folder/<case>/image-1.dcm` (read-only). From a local store only the header
    is read into Python (and rewritten); the rest is copied by the kernel. From a remote store the object is
    fetched in one request."""
    if store.remote:
        write_case(folder, case.case, *opaque_dicom(store.read(case.key), case.case))
        return
    with _case_file(folder, case.case) as target, store.open(case.key) as source:
        ds = pydicom.dcmread(source, stop_before_pixels=True)  # stops at the start of (7FE0,0010)
        rest = source.tell()
        target.write(_opaque_header(ds, case.case))
        source.seek(rest)
        _copy_rest(source, target)


def write_inputs(store: ObjectStore, cohort: Cohort, folder: Path) -> None:
    """Write the cohort's images, made opaque, below `folder` (created, must not exist), read-only: one folder
    per case holding `image-1.dcm`, nothing else (no clinical data, no label). A few threads write: reading,
    copying and writing release the GIL. Raises pydicom's InvalidDicomError for an object that is not DICOM."""
    folder.mkdir(mode=0o755, parents=False)
    with cf.ThreadPoolExecutor(max_workers=8 if store.remote else min(4, os.cpu_count() or 2)) as pool:
        for _ in pool.map(lambda case: _materialise_case(store, case, folder), cohort.cases):
            pass
    folder.chmod(0o555)


def input_manifest(cohort: Cohort, folder: Path) -> dict[str, Any]:
    """The private cohort manifest of inputs written by `write_inputs`: per case its warehouse key (processed
    objects are never overwritten, so the key names the bytes) and the SHA-256 of the file the model reads,
    hashed from the file itself; and the counts of people left out. Safe to call while the model runs: the
    inputs are read-only to it."""

    def entry(case: Case) -> dict[str, str]:
        with open(folder / case.case / "image-1.dcm", "rb") as handle:
            digest = hashlib.file_digest(handle, "sha256").hexdigest()
        return {"case": case.case, "key": case.key, "sha256": digest}

    return {
        "cases": sorted((entry(c) for c in cohort.cases), key=lambda e: e["case"]),
        "excluded": dict(cohort.excluded),
    }
