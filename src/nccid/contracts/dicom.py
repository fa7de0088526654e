"""Reading a raw image's header (never its pixels), deciding whether it can be filed, and the metadata JSON.

pydicom happily parses a truncated file and returns whatever it got, so completeness is checked here: the
header must run up to the Pixel Data element and the pixel data must fit inside the file.
"""

from __future__ import annotations

import json
import struct
import warnings
from dataclasses import dataclass
from typing import BinaryIO

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_dataset
from pydicom.uid import UID

from nccid.contracts.layout import MODALITY_FOLDER, is_pseudonym, is_uid
from nccid.errors import ImageRejected, StoreError

_BINARY_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN"}
_PIXEL_TAGS = {0x7FE00008, 0x7FE00009, 0x7FE00010}
_LONG_LENGTH_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT"}
BULK_THRESHOLD = 1024
#: the study-level fields the statistics tables carry (NCCID dashboard columns)
STUDY_FIELDS = (
    "PatientSex",
    "PatientAge",
    "StudyDate",
    "BodyPartExamined",
    "Manufacturer",
    "ManufacturerModelName",
)


@dataclass(frozen=True, slots=True)
class ImageFacts:
    """What the loader needs from a header to file an image and count it."""

    patient: str
    study: str
    series: str
    sop: str
    modality: str
    folder: str
    fields: dict[str, str]


def read_header(reader: BinaryIO, size: int) -> Dataset:
    """Parse the header of a Part 10 file up to the pixel data and check the file is whole."""
    return _read_checked(reader, size)[0]


def read_image(reader: BinaryIO, size: int) -> Dataset:
    """The whole object, pixel data and any trailing elements included, after the same completeness checks as
    `read_header`, in one pass over the file."""
    ds, pos = _read_checked(reader, size)
    implicit, little = ds.original_encoding
    reader.seek(pos)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            rest = read_dataset(reader, bool(implicit), little is not False)
        except Exception as exc:  # pydicom raises many types for corrupt data
            raise ImageRejected(f"unreadable Pixel Data (7FE0,0010): {type(exc).__name__}") from exc
    ds.update(rest)
    return ds


def _read_checked(reader: BinaryIO, size: int) -> tuple[Dataset, int]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(reader, stop_before_pixels=True)
        except InvalidDicomError as exc:
            raise ImageRejected("not a DICOM Part 10 file (no 'DICM' prefix after the 128-byte preamble)") from exc
        except StoreError:
            raise  # the store failed to deliver bytes: not the file's fault, never quarantined
        except (EOFError, struct.error) as exc:
            raise ImageRejected(f"truncated: the file ends inside the DICOM header ({size} bytes)") from exc
        except Exception as exc:  # pydicom raises many types for corrupt headers
            raise ImageRejected(f"unreadable DICOM header: {type(exc).__name__}: {exc}") from exc
    pos = reader.tell()
    _check_complete(reader, pos, size, ds)
    return ds, pos


def _check_complete(reader: BinaryIO, pos: int, size: int, ds: Dataset) -> None:
    implicit, little = ds.original_encoding
    if implicit is None:
        implicit, little = False, True
    reader.seek(pos)
    head = reader.read(12)
    if len(head) < 8:  # the file ended before any pixel data
        sop_class = ds.file_meta.get("MediaStorageSOPClassUID") or ds.get("SOPClassUID") or ""
        is_image_class = "Image Storage" in UID(str(sop_class)).name
        if is_image_class or "SOPInstanceUID" not in ds:
            raise ImageRejected(f"truncated: the file ends after {size} bytes, before Pixel Data (7FE0,0010)")
        return  # a complete object without pixels (an SR, say) is judged on its modality
    endian = "<" if little else ">"
    group, elem = struct.unpack(endian + "HH", head[:4])
    if group != 0x7FE0:
        raise ImageRejected(f"unreadable DICOM header: stopped at ({group:04X},{elem:04X}) before the end")
    if implicit:
        (length,) = struct.unpack(endian + "L", head[4:8])
        header_len = 8
    elif head[4:6] in _LONG_LENGTH_VRS:
        (length,) = struct.unpack(endian + "L", head[8:12])
        header_len = 12
    else:
        (length,) = struct.unpack(endian + "H", head[6:8])
        header_len = 8
    if length == 0xFFFFFFFF:  # encapsulated: must end with a sequence delimiter
        reader.seek(max(size - 8, 0))
        tail = reader.read(8)
        if len(tail) < 8 or struct.unpack(endian + "HH", tail[:4]) != (0xFFFE, 0xE0DD):
            raise ImageRejected("truncated: encapsulated Pixel Data (7FE0,0010) has no sequence delimiter")
        return
    end = pos + header_len + length
    if end > size:
        raise ImageRejected(
            f"truncated: Pixel Data (7FE0,0010) declares {length} bytes but the file ends after "
            f"{size - pos - header_len}"
        )


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    return str(value).strip()


def image_facts(ds: Dataset) -> ImageFacts:
    """Check the identifying tags and the modality; the reason names the tag."""
    patient = _text(ds, "PatientID")
    if not patient:
        raise ImageRejected("missing PatientID (0010,0020)")
    if not is_pseudonym(patient):
        raise ImageRejected(
            "PatientID (0010,0020) is not a pseudonym of the form Covid<digits>; "
            "was the file de-identified at the site?"
        )
    uids = {}
    for keyword, tag in (
        ("StudyInstanceUID", "(0020,000D)"),
        ("SeriesInstanceUID", "(0020,000E)"),
        ("SOPInstanceUID", "(0008,0018)"),
    ):
        value = _text(ds, keyword).rstrip("\x00")
        if not value:
            raise ImageRejected(f"missing {keyword} {tag}")
        if not is_uid(value):
            raise ImageRejected(f"invalid {keyword} {tag}: {value[:80]!r} is not a DICOM UID")
        uids[keyword] = value
    modality = _text(ds, "Modality").upper()
    if not modality:
        raise ImageRejected("missing Modality (0008,0060)")
    folder = MODALITY_FOLDER.get(modality)
    if folder is None:
        raise ImageRejected(f"unsupported Modality (0008,0060) {modality!r}: only CR, DX, CT and MR are filed")
    return ImageFacts(
        patient=patient,
        study=uids["StudyInstanceUID"],
        series=uids["SeriesInstanceUID"],
        sop=uids["SOPInstanceUID"],
        modality=modality,
        folder=folder,
        fields={name: _text(ds, name) for name in STUDY_FIELDS},
    )


def _strip_bulk(ds: Dataset) -> None:
    for elem in list(ds):
        if elem.tag in _PIXEL_TAGS:
            del ds[elem.tag]
        elif elem.VR == "SQ":
            for item in elem.value:
                _strip_bulk(item)
        elif elem.VR in _BINARY_VRS and elem.value is not None and len(elem.value) > BULK_THRESHOLD:
            del ds[elem.tag]


def metadata_json(ds: Dataset) -> bytes:
    """The DICOM JSON model (PS3.18 Annex F) of the header, pixels and bulk binary values left out.

    Prunes `ds` in place (the loader is done with it). Deterministic bytes for the same header, so a re-run
    after a crash finds the same object already there.
    """
    _strip_bulk(ds)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            doc = ds.to_json_dict(bulk_data_threshold=BULK_THRESHOLD)
        except Exception as exc:
            raise ImageRejected(f"header cannot be written as DICOM JSON: {type(exc).__name__}: {exc}") from exc
    return (json.dumps(doc, sort_keys=True, separators=(",", ":")) + "\n").encode()
