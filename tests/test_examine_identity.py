"""Issue 9: the per-image CPU of the loader's examine step was cut (nccid.contracts.dicom: the header walk,
pydicom's conversions and DICOM JSON remembered per worker for values seen before, one warnings context per
call). This proves that the optimised `read_header`, `image_facts`, `metadata_json` and `read_image` give
exactly what the code before them gave: the same metadata JSON bytes, the same facts, the same one-line
quarantine reason, on every input the tests and nccid.synth make and on pydicom's own test files (awkward
ones included: private tags, sequences, odd VRs, character sets, big values left out and listed, bad headers).

The oracle is the code on main before the optimisation, kept below unchanged (its names prefixed with
`reference`, its lines wrapped) as a reference: do not "fix" it. The leaf helpers it shares with the current
module (unchanged by the optimisation) are imported from it. Nothing here is timed: bench/examine_cost.py
measures the CPU.
"""

from __future__ import annotations

import io
import json
import re
import struct
import warnings
from pathlib import Path
from typing import BinaryIO

import pydicom
import pydicom.config
import pydicom.data
import pytest
from helpers import header_end, header_mutants, image, written
from hypothesis import HealthCheck, given, settings
from pydicom.charset import convert_encodings
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.pixels.decoders.base import DecodeRunner, get_decoder
from pydicom.pixels.utils import as_pixel_options
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    RLELossless,
)
from pydicom.values import convert_string

from nccid.contracts import dicom
from nccid.contracts.dicom import (
    _BINARY_VRS,
    _CHARSET,
    _DEFLATED,
    _ITEM,
    _ITEM_END,
    _KNOWN_VRS,
    _LONG_LENGTH_VRS,
    _PIXEL_TAGS,
    _SEQUENCE_END,
    _UNDEFINED,
    _VALUE_SIZE,
    BULK_THRESHOLD,
    LARGE_VALUE_THRESHOLD,
    MAX_ELEMENTS,
    MAX_SEQUENCE_DEPTH,
    OMITTED_CREATOR,
    OMITTED_GROUP,
    STUDY_FIELDS,
    ImageFacts,
    Omitted,
    _check_first_frame,
    _check_vr_encoding,
    _dictionary_vr,
    _first_fragment,
    _inflate,
    _json_culprit,
    _peek_tag,
    _Pixels,
    _skip_fragments,
    _too_large,
    _transfer_syntax,
    _Walk,
    image_facts,
    metadata_json,
    omitted_elements,
    read_header,
    read_image,
    tag_name,
)
from nccid.contracts.layout import MODALITY_FOLDER, is_pseudonym, is_uid
from nccid.errors import ImageRejected, StoreError
from nccid.store import LocalStore
from nccid.synth.dicom import encode
from nccid.synth.national import SynthSpec, generate


# == the reference: the code on main before the optimisation, kept as an oracle ==============================
def reference_read_dataset(walk: _Walk, end: int | None, implicit: bool, depth: int, encoding, top: bool) -> Dataset:
    """Elements up to `end` (a defined length), an item delimiter (end None, inside a sequence) or the end of
    the file (end None, top level). Returns the data set; raises ImageRejected naming the element."""
    fp = walk.fp
    elements: dict[BaseTag, RawDataElement | DataElement] = {}
    omitted: dict[int, Omitted] = {}
    last = -1
    while True:
        pos = fp.tell()
        if end is not None and pos >= end:
            if pos > end:
                raise ImageRejected(f"element {tag_name(last)} runs past the end of its sequence item")
            break
        head = fp.read(8)
        if not head and end is None and top:
            break  # the end of the file
        if len(head) < 8:
            raise ImageRejected(f"truncated: the {walk.label} ends inside an element header ({walk.size} bytes)")
        group, elem = struct.unpack(walk.endian + "HH", head[:4])
        tag = group << 16 | elem
        if tag == _ITEM_END:
            if top or end is not None:
                raise ImageRejected(
                    f"item delimiter (FFFE,E00D) outside an item of undefined length after {tag_name(last)}"
                )
            break
        if group == 0xFFFE:
            raise ImageRejected(f"item tag {tag_name(tag)} outside a sequence after {tag_name(last)}")
        if tag <= last:
            reason = "appears twice" if tag == last else f"comes after {tag_name(last)}"
            raise ImageRejected(f"data elements out of order: {tag_name(tag)} {reason}")
        if top and walk.header_only and tag in _PIXEL_TAGS:
            vr, length, header_len = reference_element_header(walk, head, implicit, tag)
            walk.pixels = _Pixels(tag, vr or "OW", length, pos + header_len)
            break
        last = tag
        walk.elements += 1
        if walk.elements > MAX_ELEMENTS:
            raise ImageRejected(f"header too large: more than {MAX_ELEMENTS} data elements")
        vr, length, _ = reference_element_header(walk, head, implicit, tag)
        value_pos = fp.tell()
        if length == _UNDEFINED:
            element = reference_undefined_length(walk, tag, vr, implicit, depth, encoding, value_pos)
            if isinstance(element, Omitted):
                omitted[tag] = element
            else:
                elements[BaseTag(tag)] = element
            continue
        if value_pos + length > walk.size:
            raise ImageRejected(
                f"truncated: {tag_name(tag)} declares {length} bytes but the {walk.label} ends after "
                f"{walk.size - value_pos}"
            )
        if end is not None and value_pos + length > end:
            raise ImageRejected(f"element {tag_name(tag)} runs past the end of its sequence item")
        effective_vr = vr or _dictionary_vr(tag)
        if effective_vr == "SQ":
            seq = reference_read_sequence(walk, tag, value_pos + length, implicit, depth, encoding)
            elements[BaseTag(tag)] = DataElement(BaseTag(tag), "SQ", seq, value_pos, is_undefined_length=False)
            continue
        reference_check_value_size(tag, effective_vr, length)
        if walk.bounded and tag != _CHARSET and length > reference_value_limit(effective_vr):
            omitted[tag] = Omitted(tag, effective_vr or "UN", length)
            fp.seek(value_pos + length)
            continue
        walk.keep(length)
        value = walk.read(length, f"the value of {tag_name(tag)}")
        if tag == _CHARSET:
            encoding = reference_encodings(value, walk.little)
        elements[BaseTag(tag)] = RawDataElement(BaseTag(tag), vr, length, value, value_pos, implicit, walk.little)
    ds = Dataset(elements, parent_encoding=encoding)
    ds.set_original_encoding(implicit, walk.little, encoding)
    if omitted:
        ds._nccid_omitted = omitted
    return ds


def reference_element_header(walk: _Walk, head: bytes, implicit: bool, tag: int) -> tuple[str | None, int, int]:
    """(VR or None for implicit VR, value length, header length) of the element whose first 8 bytes are `head`."""
    if implicit:
        (length,) = struct.unpack(walk.endian + "L", head[4:8])
        return None, length, 8
    raw_vr = head[4:6]
    vr = raw_vr.decode("latin-1")
    if vr not in _KNOWN_VRS:
        raise ImageRejected(f"unknown VR {raw_vr!r} in {tag_name(tag)}")
    if vr in _LONG_LENGTH_VRS:
        (length,) = struct.unpack(walk.endian + "L", walk.read(4, f"the header of {tag_name(tag)}"))
        return vr, length, 12
    (length,) = struct.unpack(walk.endian + "H", head[6:8])
    return vr, length, 8


def reference_value_limit(vr: str | None) -> int:
    if vr is None or vr in _BINARY_VRS or vr.startswith("OB") or vr.endswith("OW"):
        return BULK_THRESHOLD
    return LARGE_VALUE_THRESHOLD


def reference_check_value_size(tag: int, vr: str | None, length: int) -> None:
    sizes = [_VALUE_SIZE.get(one) for one in (vr or "").split(" or ")]
    size = min((s for s in sizes if s), default=0) if all(sizes) else 0
    if size and length % size:
        raise ImageRejected(f"{tag_name(tag)} VR {vr}: a length of {length} bytes is not a multiple of {size}")


def reference_encodings(value: bytes, little: bool):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return convert_encodings(convert_string(value, little))
        except Exception as exc:  # an unknown or garbled character set name
            raise ImageRejected(f"unreadable SpecificCharacterSet (0008,0005): {type(exc).__name__}") from exc


def reference_undefined_length(walk: _Walk, tag: int, vr: str | None, implicit: bool, depth: int, encoding, pos: int):
    """An element of undefined length: a sequence (SQ, or UN/private whose value is items), or encapsulated
    pixel data (reference_read_image keeps its bytes)."""
    effective_vr = vr or _dictionary_vr(tag)
    if effective_vr in (None, "UN") and _peek_tag(walk) == _ITEM:
        seq = reference_read_sequence(walk, tag, None, implicit or effective_vr == "UN", depth, encoding)
        return DataElement(BaseTag(tag), "SQ", seq, pos, is_undefined_length=True)
    if effective_vr == "SQ":
        seq = reference_read_sequence(walk, tag, None, implicit, depth, encoding)
        return DataElement(BaseTag(tag), "SQ", seq, pos, is_undefined_length=True)
    if tag in _PIXEL_TAGS:  # encapsulated pixel data (of the image, or of an icon in a sequence)
        start = walk.fp.tell()
        stop = _skip_fragments(walk, tag)
        if walk.bounded:
            return Omitted(tag, vr or "OB", stop - start)
        walk.fp.seek(start)
        value = walk.read(stop - 8 - start, f"the value of {tag_name(tag)}")
        walk.fp.seek(stop)
        return RawDataElement(BaseTag(tag), vr or "OB", _UNDEFINED, value, pos, implicit, walk.little)
    raise ImageRejected(f"{tag_name(tag)} VR {effective_vr or 'UN'} has an undefined length (only sequences may)")


def reference_read_sequence(walk: _Walk, tag: int, end: int | None, implicit: bool, depth: int, encoding) -> Sequence:
    """The items of a sequence up to `end` (defined length) or its sequence delimiter."""
    if depth + 1 > MAX_SEQUENCE_DEPTH:
        raise ImageRejected(f"sequences nested deeper than {MAX_SEQUENCE_DEPTH} levels (at {tag_name(tag)})")
    fp = walk.fp
    items = []
    while True:
        pos = fp.tell()
        if end is not None and pos >= end:
            if pos > end:
                raise ImageRejected(f"sequence {tag_name(tag)}: its items run past its length")
            break
        head = fp.read(8)
        if len(head) < 8:
            raise ImageRejected(f"truncated: sequence {tag_name(tag)} is not closed before the {walk.label} ends")
        group, elem, length = struct.unpack(walk.endian + "HHL", head)
        item_tag = group << 16 | elem
        if item_tag == _SEQUENCE_END:
            if end is not None:
                raise ImageRejected(f"sequence {tag_name(tag)} of defined length has a sequence delimiter")
            break
        if item_tag != _ITEM:
            raise ImageRejected(
                f"sequence {tag_name(tag)} is not closed: found {tag_name(item_tag)} where an item should start"
            )
        walk.elements += 1
        if length == _UNDEFINED:
            item = reference_read_dataset(walk, None, implicit, depth + 1, encoding, top=False)
            item.is_undefined_length_sequence_item = True
        else:
            item_end = fp.tell() + length
            if item_end > walk.size or (end is not None and item_end > end):
                raise ImageRejected(f"truncated: an item of sequence {tag_name(tag)} runs past its end")
            item = reference_read_dataset(walk, item_end, implicit, depth + 1, encoding, top=False)
        items.append(item)
    seq = Sequence(items)
    seq.is_undefined_length = end is None
    return seq


def reference_read_file(reader: BinaryIO, size: int, header_only: bool, bounded: bool) -> tuple[FileDataset, _Walk]:
    """Preamble, file meta and data set (inflated if deflated); raises ImageRejected with a named reason."""
    if size == 0:
        raise ImageRejected("empty file (0 bytes): not a DICOM Part 10 file")
    start = reader.read(132)
    if len(start) < 132 or start[128:132] != b"DICM":
        raise ImageRejected("not a DICOM Part 10 file (no 'DICM' prefix after the 128-byte preamble)")
    meta_walk = _Walk(reader, size, little=True, header_only=True)
    elements: dict[BaseTag, RawDataElement | DataElement] = {}
    while True:
        pos = reader.tell()
        peek = reader.read(2)
        reader.seek(pos)
        if len(peek) < 2 or struct.unpack("<H", peek)[0] != 0x0002:
            break
        head = meta_walk.read(8, "the file meta information")
        tag = struct.unpack("<HH", head[:4])
        tag = tag[0] << 16 | tag[1]
        vr, length, _ = reference_element_header(meta_walk, head, False, tag)
        if length == _UNDEFINED or length > LARGE_VALUE_THRESHOLD:
            raise ImageRejected(f"file meta element {tag_name(tag)} has an invalid length ({length})")
        if BaseTag(tag) in elements:
            raise ImageRejected(f"file meta element {tag_name(tag)} appears twice")
        value = meta_walk.read(length, f"the value of {tag_name(tag)}")
        elements[BaseTag(tag)] = RawDataElement(BaseTag(tag), vr, length, value, pos + 8, False, True)
    file_meta = FileMetaDataset(Dataset(elements))
    transfer_syntax = _transfer_syntax(file_meta)
    if transfer_syntax == _DEFLATED:
        fp = _inflate(reader)
        data_size = fp.seek(0, 2)
        fp.seek(0)
        walk = _Walk(fp, data_size, True, header_only, bounded, label="inflated data set")
    else:
        walk = _Walk(reader, size, transfer_syntax.is_little_endian, header_only, bounded)
    implicit = transfer_syntax.is_implicit_VR
    _check_vr_encoding(walk, implicit, transfer_syntax)
    dataset = reference_read_dataset(walk, None, implicit, 0, "iso8859", top=True)
    ds = FileDataset(getattr(reader, "name", "<stream>"), dataset, start[:128], file_meta, implicit, walk.little)
    ds.set_original_encoding(implicit, walk.little, dataset.original_character_set)
    if omitted_elements(dataset):
        ds._nccid_omitted = omitted_elements(dataset)
    return ds, walk


def reference_check_pixels(ds: FileDataset, walk: _Walk) -> None:
    pixels = walk.pixels
    if pixels is None:  # the file ended before any pixel data
        classes = (reference_text(ds.file_meta, "MediaStorageSOPClassUID"), reference_text(ds, "SOPClassUID"))
        is_image = (
            any("Image Storage" in UID(c).name for c in classes)
            or reference_text(ds, "Modality").upper() in MODALITY_FOLDER
        )
        if is_image or "SOPInstanceUID" not in ds:
            raise ImageRejected(
                f"truncated: the {walk.label} ends after {walk.size} bytes, before Pixel Data (7FE0,0010)"
            )
        return  # a complete object without pixels (an SR, say) is judged on its modality
    syntax = UID(str(ds.file_meta.TransferSyntaxUID).strip("\x00 "))
    name = tag_name(pixels.tag)
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError as exc:
        raise ImageRejected(f"transfer syntax {syntax.name!r}: pydicom has no decoder for its pixel data") from exc
    if not decoder.is_available:
        raise ImageRejected(f"transfer syntax {syntax.name!r}: no pixel data decoder for it is installed")
    if pixels.length == _UNDEFINED:
        if not syntax.is_encapsulated:
            raise ImageRejected(f"Pixel Data {name} is encapsulated but transfer syntax {syntax.name!r} is native")
        walk.fp.seek(pixels.value_pos)
        first = _first_fragment(walk)
        end = _skip_fragments(walk, pixels.tag)
    else:
        end = pixels.value_pos + pixels.length
        if end > walk.size:
            raise ImageRejected(
                f"truncated: Pixel Data {name} declares {pixels.length} bytes but the {walk.label} ends after "
                f"{walk.size - pixels.value_pos}"
            )
        if syntax.is_encapsulated:
            raise ImageRejected(
                f"Pixel Data {name} is not encapsulated but transfer syntax {syntax.name!r} is compressed"
            )
    expected = reference_check_pixel_module(ds, syntax, pixels)
    if syntax.is_encapsulated:
        _check_first_frame(walk, first, ds, syntax, name)
    if not syntax.is_encapsulated and pixels.length not in (expected, expected + expected % 2):
        raise ImageRejected(
            f"Pixel Data {name} holds {pixels.length} bytes; Rows x Columns x Samples x Bits x Frames needs {expected}"
        )
    if end < walk.size:  # elements after the pixel data (padding, signatures): they must be whole too
        walk.fp.seek(end)
        reference_read_dataset(walk, None, bool(ds.original_encoding[0]), 0, ds.original_character_set, top=True)


def reference_check_pixel_module(ds: Dataset, syntax: UID, pixels: _Pixels) -> int:
    """pydicom's own checks of the Image Pixel attributes; returns the expected native length in bytes."""
    keyword = {0x7FE00008: "FloatPixelData", 0x7FE00009: "DoubleFloatPixelData"}.get(pixels.tag, "PixelData")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            runner = DecodeRunner(syntax)
            runner.set_options(**as_pixel_options(ds), pixel_keyword=keyword, pixel_vr=pixels.vr)
            runner._validate_options()  # validate() also wants the pixel bytes, which a header reader skips
            frame = runner.frame_length(unit="bytes")
            return int(-(-frame * runner.number_of_frames // 1))
        except (AttributeError, ValueError, TypeError, KeyError, OverflowError) as exc:
            message = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
            raise ImageRejected(
                f"Image Pixel attributes (0028,xxxx) do not describe the pixel data: {message}"
            ) from exc


def reference_read_header(reader: BinaryIO, size: int, *, bounded: bool = False) -> Dataset:
    """The header of a Part 10 file up to the pixel data, checked to be whole and its pixels readable.

    By default every value is read: a gate looking for identifiers (`nccid site check`) must see them all.
    `bounded=True` (the warehouse loader) bounds memory instead: values over the bulk thresholds are skipped,
    not read (see `omitted_elements`), and at most `MAX_HEADER_BYTES` of values are kept.
    Raises ImageRejected with a one-line reason naming the tag or defect; StoreError passes through (the
    store failed to deliver bytes: not the file's fault, never quarantined).
    """
    ds, walk = reference_guarded(reader, size, header_only=True, bounded=bounded)
    try:
        reference_convert_all(ds)
        reference_guard(lambda: reference_check_pixels(ds, walk))
    finally:
        if walk.fp is not reader:
            walk.fp.close()
    return ds


def reference_read_image(reader: BinaryIO, size: int) -> Dataset:
    """The whole object, pixel data and any trailing elements included, after the same structural and
    completeness checks as `reference_read_header` (the pixel length against Rows and Columns is the caller's)."""
    ds, walk = reference_guarded(reader, size, header_only=False, bounded=False)
    try:
        reference_convert_all(ds)
        if not any(tag in ds for tag in _PIXEL_TAGS):
            reference_guard(
                lambda: reference_check_pixels(ds, walk)
            )  # only says whether an object without pixels is whole
    finally:
        if walk.fp is not reader:
            walk.fp.close()
    return ds


def reference_guarded(reader: BinaryIO, size: int, header_only: bool, bounded: bool) -> tuple[FileDataset, _Walk]:
    return reference_guard(lambda: reference_read_file(reader, size, header_only, bounded))


def reference_guard(step):
    """Run a reading step: ImageRejected and StoreError pass; anything else a corrupt file provokes (pydicom
    or struct raising on odd bytes) becomes ImageRejected naming the exception type, never a traceback."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return step()
        except (ImageRejected, StoreError):
            raise
        except RecursionError as exc:
            raise ImageRejected(f"sequences nested deeper than {MAX_SEQUENCE_DEPTH} levels") from exc
        except MemoryError as exc:
            raise ImageRejected("header too large to read") from exc
        except Exception as exc:  # pydicom raises many types for corrupt data
            raise ImageRejected(f"unreadable DICOM header: {type(exc).__name__}") from exc


def reference_convert_all(ds: Dataset, path: str = "") -> None:
    """Convert every value now (pydicom converts lazily, on first use), so that a value that cannot be
    decoded is a reason here, not an exception in whoever touches it later."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for tag in list(ds.keys()):
            try:
                element = ds[tag]
            except Exception as exc:
                vr = getattr(ds.get_item(tag), "VR", None) or "UN"
                raise ImageRejected(
                    f"{path}{tag_name(tag)} VR {vr}: the value cannot be decoded ({type(exc).__name__})"
                ) from exc
            if element.VR == "SQ":
                for item in element.value:
                    reference_convert_all(item, f"{path}{tag_name(tag)} > ")


def reference_text(ds: Dataset, keyword: str) -> str:
    try:
        value = ds.get(keyword)
    except Exception:  # an undecodable value reads as absent (reference_read_header has converted every value already)
        return ""
    if value is None:
        return ""
    return str(value).strip()


def reference_identifying(ds: Dataset, keyword: str, tag: str) -> str:
    """The value of an identifying tag; one too long to have been read is a reason of its own."""
    skipped = omitted_elements(ds).get(int(tag.strip("()").replace(",", ""), 16))
    if skipped is not None:
        raise ImageRejected(f"{keyword} {tag} is {skipped.length} bytes long: not an identifier")
    return reference_text(ds, keyword)


def reference_image_facts(ds: Dataset) -> ImageFacts:
    """Check the identifying tags and the modality; the reason names the tag."""
    patient = reference_identifying(ds, "PatientID", "(0010,0020)")
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
        value = reference_identifying(ds, keyword, tag).rstrip("\x00")
        if not value:
            raise ImageRejected(f"missing {keyword} {tag}")
        if not is_uid(value):
            raise ImageRejected(f"invalid {keyword} {tag}: not a DICOM UID (value not shown)")
        uids[keyword] = value
    modality = reference_identifying(ds, "Modality", "(0008,0060)").upper()
    if not modality:
        raise ImageRejected("missing Modality (0008,0060)")
    folder = MODALITY_FOLDER.get(modality)
    if folder is None:
        shown = repr(modality) if re.fullmatch(r"[A-Z]{2,4}", modality) else "(not a modality code)"
        raise ImageRejected(f"unsupported Modality (0008,0060) {shown}: only CR, DX, CT and MR are filed")
    return ImageFacts(
        patient=patient,
        study=uids["StudyInstanceUID"],
        series=uids["SeriesInstanceUID"],
        sop=uids["SOPInstanceUID"],
        modality=modality,
        folder=folder,
        fields={name: reference_text(ds, name)[:64] for name in STUDY_FIELDS},
    )


def reference_strip_bulk(ds: Dataset) -> None:
    """Remove pixel data and bulk values; list every other value left out in a private block of its data set."""
    left_out = [o.tag for o in omitted_elements(ds).values()]
    for elem in list(ds):
        if elem.tag in _PIXEL_TAGS:
            del ds[elem.tag]
        elif elem.VR == "SQ":
            for item in elem.value:
                reference_strip_bulk(item)
        elif elem.value is not None and _too_large(elem):
            del ds[elem.tag]
            left_out.append(int(elem.tag))
    if left_out:
        block = ds.private_block(OMITTED_GROUP, OMITTED_CREATOR, create=True)
        block.add_new(0x01, "AT", sorted(set(left_out)))


def reference_metadata_json(ds: Dataset) -> bytes:
    """The DICOM JSON model (PS3.18 Annex F) of the header, pixels and bulk values left out.

    Pixel data is always left out. Other values left out (binary ones over `BULK_THRESHOLD` bytes, any over
    `LARGE_VALUE_THRESHOLD`) are listed, per data set, as AT values of element (0009,xx01) of the private
    block `OMITTED_CREATOR` ("NCCID omitted elements"), so a reader knows they exist and where to look: the
    image file beside the JSON holds them. Prunes `ds` in place (the loader is done with it). Deterministic
    bytes for the same header, so a re-run after a crash finds the same object already there.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            reference_strip_bulk(ds)
            doc = ds.to_json_dict(bulk_data_threshold=LARGE_VALUE_THRESHOLD)
            return (json.dumps(doc, sort_keys=True, separators=(",", ":")) + "\n").encode()
        except Exception as exc:
            where = _json_culprit(ds)
            raise ImageRejected(f"header cannot be written as DICOM JSON: {where}{type(exc).__name__}") from exc


# == what is compared ========================================================================================
def attempt(step, ds) -> object:
    """What one step gives: its result, its one-line reason, or the type of anything else it raised (which
    examine_image would quarantine as unexpected)."""
    try:
        return step(ds)
    except ImageRejected as exc:
        return ("rejected", exc.reason)
    except Exception as exc:
        return ("raised", type(exc).__name__)


def fingerprint(ds: Dataset) -> list:
    """Every element of a data set, file meta and sequence items included, as comparable values (repr, so
    that a NaN equals itself)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        meta = getattr(ds, "file_meta", None) or Dataset()
        return [
            (tuple(ds.original_encoding), ds.original_character_set),
            *((int(e.tag), e.VR, e.value if isinstance(e.value, bytes) else repr(e.value)) for e in meta.iterall()),
            *((int(e.tag), e.VR, e.value if isinstance(e.value, bytes) else repr(e.value)) for e in ds.iterall()),
        ]


def outcome(data: bytes, *, reference: bool, bounded: bool, change=None, size: int | None = None) -> tuple:
    """Everything the loader (bounded) or the site gate (unbounded) takes from one raw file: the header's
    reason, or the header itself, the facts (or their reason) and the metadata JSON bytes (or their reason),
    taken in the loader's order. `change` is a caller's edit of the header between reading and the rest;
    `size` what the store listed (default: the bytes' length)."""
    size = len(data) if size is None else size
    if reference:
        read, facts, meta = reference_read_header, reference_image_facts, reference_metadata_json
    else:
        read, facts, meta = read_header, image_facts, metadata_json
    ds = attempt(lambda d: read(io.BytesIO(d), size, bounded=bounded), data)
    if isinstance(ds, tuple):
        return ds
    if change is not None:
        change(ds)
    found_facts, found_metadata = attempt(facts, ds), attempt(meta, ds)
    header = read(io.BytesIO(data), size, bounded=bounded)  # again: the header as read, all of it
    return "read", fingerprint(header), found_facts, found_metadata


def whole(data: bytes, *, reference: bool) -> object:
    """What the site node's reader gives: the whole object, or the reason."""
    read = reference_read_image if reference else read_image
    found = attempt(lambda d: read(io.BytesIO(d), len(d)), data)
    return found if isinstance(found, tuple) else fingerprint(found)


def assert_same(name: str, data: bytes, change=None, whole_object: bool = True) -> tuple:
    """The optimised code gives what the reference gives, bounded and not; returns the loader's outcome."""
    for bounded in (True, False):
        found = outcome(data, reference=False, bounded=bounded, change=change)
        expected = outcome(data, reference=True, bounded=bounded, change=change)
        assert found == expected, f"{name} (bounded={bounded}): {str(found)[:300]} != {str(expected)[:300]}"
        if bounded:
            loader = expected
    if whole_object:
        assert whole(data, reference=False) == whole(data, reference=True), name
    return loader


def forget_decoded_values() -> None:
    """Start from a worker that has read nothing yet (the memo of values decoded before is per process)."""
    dicom._DECODED.clear()
    dicom._PIXEL_MODULES.clear()


def assert_corpus(files: dict[str, bytes]) -> list[tuple]:
    """Each file cold (nothing decoded before), then all again in the other order (values seen before)."""
    forget_decoded_values()
    outcomes = [assert_same(name, data) for name, data in files.items()]
    for name, data in reversed(list(files.items())):
        assert_same(name, data, whole_object=False)
    return outcomes


def reasons(outcomes: list[tuple]) -> list[str]:
    found = []
    for result in outcomes:
        for part in (result, *result[2:]) if result[0] == "read" else (result,):
            if isinstance(part, tuple) and part[0] == "rejected":
                found.append(part[1])
    return found


def filed(outcomes: list[tuple]) -> list[tuple[ImageFacts, bytes]]:
    return [
        (r[2], r[3]) for r in outcomes if r[0] == "read" and isinstance(r[2], ImageFacts) and isinstance(r[3], bytes)
    ]


# == the corpora ==============================================================================================
SYNTH = SynthSpec(
    seed=5,
    patients=30,
    imaged_fraction=0.9,
    scale=0.05,
    ct_slices=(4, 8),
    mr_slices=(2, 3),
    xray_share=0.5,
    mr_share=0.25,
)


@pytest.fixture(scope="module")
def synth_files(tmp_path_factory) -> dict[str, bytes]:
    store = LocalStore(tmp_path_factory.mktemp("synth"))
    generate(store, SYNTH)
    raw = sorted(p for p in store.root.glob("raw-*/**/images/**/*") if p.is_file())
    return {str(p.relative_to(store.root)): p.read_bytes() for p in raw}


def test_every_raw_file_synth_makes_awkward_ones_included_gives_what_the_code_before_gave(synth_files):
    outcomes = assert_corpus(synth_files)
    found = reasons(outcomes)
    assert any(r.startswith("truncated") for r in found)  # the awkward files are in the corpus
    assert "not a DICOM Part 10 file (no 'DICM' prefix after the 128-byte preamble)" in found
    assert "missing PatientID (0010,0020)" in found
    assert any(r.startswith("unsupported Modality (0008,0060)") for r in found)  # the SR or the screenshot
    assert {facts.modality for facts, _ in filed(outcomes)} == {"CR", "DX", "CT", "MR"}


def pydicom_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.dcm"))}


PYDICOM_DATA = Path(pydicom.data.__file__).parent
TEMPLATES = Path(pydicom.data.get_testdata_file("RG1_UNCR.dcm", download=False)).parent  # the chest CR, CT, MR


@pytest.mark.parametrize(
    "folder", [PYDICOM_DATA / "test_files", PYDICOM_DATA / "charset_files", TEMPLATES], ids=lambda p: p.name
)
def test_pydicom_test_files_and_the_synth_templates_give_what_the_code_before_gave(folder):
    outcomes = assert_corpus(pydicom_files(folder))
    assert len(outcomes) >= 15
    assert reasons(outcomes)  # some are refused (no file meta, odd pixel data, ...), with the same reason
    assert any(r[0] == "read" and isinstance(r[3], bytes) for r in outcomes)  # and some are written as JSON


# -- crafted: the cases that make the metadata JSON and the reasons hard ------------------------------------
STUDY, SERIES, SOP = "1.2.826.0.1.9", "1.2.826.0.1.9.1", "1.2.826.0.1.9.1.1"


def base(modality: str = "CR") -> Dataset:
    return image("Covid7", STUDY, SERIES, SOP, modality=modality)[0]


def item(**values) -> Dataset:
    found = Dataset()
    for keyword, value in values.items():
        setattr(found, keyword, value)
    return found


def big_values() -> Dataset:
    ds = base()
    ds.private_block(0x0009, "GEMS_IDEN_01", create=True).add_new(0x01, "LO", "its own private group 0009")
    ds.private_block(0x0029, "SITE NOTES", create=True).add_new(0x10, "UT", "note " * 300_000)  # 1.5 MB
    ds.private_block(0x0029, "SITE", create=True).add_new(0x11, "OB", b"x" * 3000)  # binary over 1 KiB
    ds.private_block(0x0029, "SITE", create=True).add_new(0x12, "OB", b"y" * 1000)  # binary under 1 KiB
    ds.ImageComments = "c" * 70_000  # text over 64 KiB
    ds.AdditionalPatientHistory = "h" * 60_000  # text under it
    ds.add_new(0x00181030, "LO", "protocol")
    return ds


def sequences() -> Dataset:
    ds = base("CT")
    inner = item(CodeValue="T-D3000", CodingSchemeDesignator="SRT", CodeMeaning="Chest")
    inner.private_block(0x0011, "ITEM PRIVATE", create=True).add_new(0x01, "OB", b"z" * 5000)  # left out of an item
    ds.AnatomicRegionSequence = [inner]
    ds["AnatomicRegionSequence"].is_undefined_length = True
    ds.ReferencedImageSequence = Sequence()  # empty
    deep = item(CodeValue="x")
    for _ in range(5):
        deep = item(ContentSequence=[deep], ValueType="CONTAINER")
    ds.ContentSequence = [deep, item(TextValue="t" * 70_000, ValueType="TEXT")]
    ds.ProcedureCodeSequence = [item(CodeValue=str(n), CodingSchemeDesignator="99X", CodeMeaning="p") for n in (1, 2)]
    return ds


def odd_vrs() -> Dataset:
    ds = base("MR")
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.ReferringPhysicianName = "Müller^Jürgen^^Dr.=ミュラー^ユルゲン"
    ds.PatientBirthDate, ds.ContentTime, ds.AcquisitionDateTime = "19590101", "101500.123", "20200401101500.1+0100"
    ds.FrameIncrementPointer = [0x00181063, 0x00181065]  # AT
    ds.DiffusionBValue = 1000.5  # FD
    ds.RecommendedDisplayFrameRateInFloat = 25.0  # FL
    ds.DimensionIndexValues = [1, 2, 3]  # UL
    ds.ReferencedFrameNumber = [1, 2]  # IS
    ds.PatientWeight = "70.25"  # DS
    ds.SliceLocation = None  # empty DS
    ds.RetrieveURL = "https://example.invalid/wado?x=1"  # UR
    ds.LongCodeValue = "a long code value"  # UC
    ds.SmallestImagePixelValue = 3  # US or SS in the dictionary: US written
    ds.RedPaletteColorLookupTableDescriptor = [0, 0, 16]  # a LUT descriptor (pydicom fixes its first value)
    ds.add_new(0x00720082, "SV", [-(2**40), 7])  # Selector SV Value
    ds.add_new(0x00720083, "UV", [2**40])  # Selector UV Value
    ds.add_new(0x00189219, "OF", b"\x00\x00\x80?" * 4)  # a small float vector
    ds.add_new(0x00081030, "UN", b"STUDY DESCRIPTION AS UN ")  # a public tag sent as UN
    private = ds.private_block(0x0043, "GEMS_PARM_01", create=True)
    private.add_new(0x01, "DS", "1.5\\2.5")
    private.add_new(0x02, "UN", b"\x01\x02\x03\x04")
    private.add_new(0x03, "SQ", [item(CodeValue="p", CodeMeaning="private item")])
    return ds


def cases() -> dict[str, bytes]:
    found = {"a plain CR": encode(base()), "big values left out and listed": written(big_values())}
    found["sequences, nested, empty, undefined length"] = written(sequences())
    found["odd VRs, private tags, UTF-8 names"] = written(odd_vrs())
    for n, ds in enumerate(image("Covid8", STUDY + ".2", SERIES + ".2", SOP + ".2", modality="CT", slices=5)):
        found[f"CT slice {n}: most values as in the slice before"] = encode(ds)
    latin = base()
    latin.SpecificCharacterSet, latin.StudyDescription = "ISO_IR 100", "Thorax Müller"
    found["Latin-1 text"] = written(latin)
    found["the same bytes read as Cyrillic"] = found["Latin-1 text"].replace(b"ISO_IR 100", b"ISO_IR 144")
    spaced = base()
    spaced.Manufacturer, spaced.BodyPartExamined = "  Spaced Maker", " CHEST"  # insignificant leading spaces
    found["values with leading spaces"] = written(spaced)
    changed = base()
    changed.Manufacturer = "Another Maker"  # one value other than in the CR above
    found["the CR with another manufacturer"] = written(changed)
    for name, syntax in (
        ("implicit VR", ImplicitVRLittleEndian),
        ("big endian", ExplicitVRBigEndian),
        ("deflated", DeflatedExplicitVRLittleEndian),
    ):
        found[f"odd VRs, {name}"] = written(odd_vrs(), syntax)
        found[f"sequences, {name}"] = written(sequences(), syntax)
    rle = base("DX")
    rle.compress(RLELossless)
    found["RLE"] = encode(rle)
    # quarantined, each with its one-line reason
    for name, change in (
        ("not a pseudonym", lambda d: setattr(d, "PatientID", "John Smith")),
        ("no SOP Instance UID", lambda d: delattr(d, "SOPInstanceUID")),
        ("a UID that is not one", lambda d: setattr(d, "SeriesInstanceUID", "1.2.abc")),
        ("unsupported modality", lambda d: setattr(d, "Modality", "US")),
        ("not a modality code", lambda d: setattr(d, "Modality", "x-ray 1")),
        ("an identifier too long to read", lambda d: setattr(d, "PatientID", "Covid1" * 20000)),
        ("no Modality", lambda d: delattr(d, "Modality")),
        ("rows that do not fit the pixels", lambda d: setattr(d, "Rows", d.Rows + 1)),
        ("bits that do not make sense", lambda d: setattr(d, "BitsStored", 40)),
    ):
        ds = base()
        change(ds)
        found[name] = written(ds)
    good = found["a plain CR"]
    at = good.index(struct.pack("<HH", 0x0028, 0x1050) + b"DS")
    found["a DS DICOM JSON cannot carry"] = good[: at + 8] + b"#" + good[at + 9 :]
    manufacturer = struct.pack("<HH", 0x0008, 0x0070)
    found["a VR that names no VR"] = good.replace(manufacturer + b"LO", manufacturer + b"ZZ")
    at = good.index(struct.pack("<HH", 0x0020, 0x0010) + b"SH")
    found["elements out of order"] = good[:at] + struct.pack("<HH", 0x0020, 0x0001) + good[at + 4 :]
    found["cut inside the header"] = good[:600]
    found["cut inside the pixels"] = good[: len(good) - 100]
    found["an empty file"] = b""
    return found


def test_crafted_headers_and_quarantined_files_give_what_the_code_before_gave():
    files = cases()
    outcomes = assert_corpus(files)
    found = reasons(outcomes)
    for expected in (
        "PatientID (0010,0020) is not a pseudonym of the form Covid<digits>; was the file de-identified at the site?",
        "missing SOPInstanceUID (0008,0018)",
        "invalid SeriesInstanceUID (0020,000E): not a DICOM UID (value not shown)",
        "unsupported Modality (0008,0060) 'US': only CR, DX, CT and MR are filed",
        "PatientID (0010,0020) is 120000 bytes long: not an identifier",
        "header cannot be written as DICOM JSON: (0028,1050) VR DS holds a value DICOM JSON cannot carry: ValueError",
        "unknown VR b'ZZ' in (0008,0070)",
        "data elements out of order: (0020,0001) comes after (0020,000E)",
        "empty file (0 bytes): not a DICOM Part 10 file",
    ):
        assert expected in found
    assert any(r.startswith("Image Pixel attributes (0028,xxxx)") for r in found)
    by_name = dict(zip(files, outcomes, strict=True))
    latin, cyrillic = (
        json.loads(by_name[n][3])["00081030"] for n in ("Latin-1 text", "the same bytes read as Cyrillic")
    )
    assert latin["Value"] == ["Thorax Müller"] and cyrillic["Value"] == ["Thorax Mќller"]
    big = by_name["big values left out and listed"]
    listed = Dataset.from_json(json.loads(big[3]))  # left out, listed in the next free block of group 0009
    assert listed.private_block(OMITTED_GROUP, OMITTED_CREATOR)[0x01].value == [0x00204000, 0x00291010, 0x00291111]
    assert listed[0x00090010].value == "GEMS_IDEN_01" and len(listed.AdditionalPatientHistory) == 60_000


@pytest.mark.parametrize("name", ["a plain CR", "sequences, nested, empty, undefined length", "odd VRs, big endian"])
def test_a_file_shorter_than_the_store_listed_gives_what_the_code_before_gave(name):
    """The store lists a size, then delivers fewer bytes (the file was cut meanwhile): the same reasons."""
    data = cases()[name]
    for cut in [*range(132, min(header_end(data) + 16, 4096)), len(data) - 1]:  # every byte of the header
        found = outcome(data[:cut], reference=False, bounded=True, size=len(data))
        assert found == outcome(data[:cut], reference=True, bounded=True, size=len(data)), (name, cut)


CHANGES = {
    "a value set in place": lambda ds: setattr(ds, "Manufacturer", "Other Corp"),
    "an element replaced": lambda ds: ds.add_new(0x00080070, "LO", "Replaced Corp"),
    "an identifier changed": lambda ds: setattr(ds, "PatientID", "Covid999"),
    "an element removed": lambda ds: ds.pop(0x00080020, None),
    "rows changed": lambda ds: setattr(ds, "Rows", 7),
    "every value converted": lambda ds: list(ds.iterall()),
    "a value made too large": lambda ds: setattr(ds, "StudyDescription", "d" * 70_000),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_a_header_changed_by_its_caller_gives_what_the_code_before_gave(change):
    """Values decoded before are taken from the memo only while the data set still holds them as read."""
    series = [encode(ds) for ds in image("Covid9", STUDY + ".3", SERIES + ".3", SOP + ".3", modality="CT", slices=3)]
    forget_decoded_values()
    for n, data in enumerate(series + series):
        result = assert_same(f"slice {n % 3}, {change}", data, change=CHANGES[change], whole_object=False)
        assert result[0] == "read" and isinstance(result[3], bytes)


def test_a_change_of_pydicom_settings_is_honoured_not_hidden_by_values_decoded_before():
    ds = base()
    ds.FrameOfReferenceUID = "1.2.826.0.x"  # pydicom warns about it, or raises when told to
    data = written(ds)
    forget_decoded_values()
    assert assert_same("lenient", data)[0] == "read"  # the memo now knows the value
    mode = pydicom.config.settings.reading_validation_mode
    pydicom.config.settings.reading_validation_mode = pydicom.config.RAISE
    try:
        strict = assert_same("strict", data, whole_object=False)
    finally:
        pydicom.config.settings.reading_validation_mode = mode
    assert strict[0] == "rejected" and "(0020,0052)" in strict[1]


# -- any mutation of a header: one reason or a file, the same as before --------------------------------------
def _seed_files() -> dict[str, bytes]:
    seeds = {name: written(base(m)) for name, m in (("cr", "CR"), ("ct", "CT"), ("mr", "MR"))}
    rle = base("DX")
    rle.compress(RLELossless)
    seeds["rle"] = encode(rle)
    seeds["deflated"] = written(base("CT"), DeflatedExplicitVRLittleEndian)
    seeds["odd"] = written(odd_vrs())
    seeds["sequences"] = written(sequences())
    return seeds


SEEDS = _seed_files()


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(header_mutants(SEEDS, within=4096))
def test_any_mutant_gives_what_the_code_before_gave(data):
    assert_same("a mutant", data)
    assert_same("the mutant again (values seen before)", data, whole_object=False)
