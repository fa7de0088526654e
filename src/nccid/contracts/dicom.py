"""Reading a raw image's header (never its pixels), deciding whether it can be filed, and the metadata JSON.

One reader for the warehouse loader (`read_header`: the header only, memory bounded on request) and the site node
(`read_image`: the whole object). Both walk the Part 10 element stream themselves, element by element, and
hand the values to pydicom, because pydicom is tolerant on purpose: it parses a truncated file and returns
whatever it got, swallows an unknown VR, and raises anything (NotImplementedError, BytesLengthException,
RecursionError, ...) only later, when a value is first used. Here every defect is found while reading and
raised as `ImageRejected` with a reason naming the tag, so that one bad file never stops a load.

What a file must be to be read (each failure has its own reason):

* not empty; the 128-byte preamble and 'DICM'; a file meta group with a transfer syntax that pydicom knows;
* every element whole: a known VR (explicit VR), a length that fits in the file and in its sequence item and,
  for fixed-size VRs (US, UL, FD, AT, OW, ...), a multiple of the value size; elements in ascending tag order,
  none twice; items and sequences closed by their delimiters; undefined lengths only where DICOM allows them;
* sequences nested at most `MAX_SEQUENCE_DEPTH` deep and at most `MAX_ELEMENTS` elements (and, when
  bounded, at most `MAX_HEADER_BYTES` of values kept in memory), so that the memory one header costs is bounded;
* the header runs up to Pixel Data and the pixel data fits inside the file (the completeness check);
* `read_header` also makes sure `pixel_array` will work on the filed file: a pixel decoder for the transfer
  syntax is installed, the Image Pixel attributes are valid (pydicom's own checks), native pixel data holds
  exactly Rows x Columns x Samples x Bits Allocated / 8 x Frames bytes (plus the one pad byte for odd
  lengths), compressed pixel data is encapsulated, its fragments are well formed and the first one starts
  with the codestream marker of its transfer syntax (JPEG, JPEG-LS, JPEG 2000, RLE).

Every raw image of every load passes here, so the CPU a header costs is the loader's on a machine with few
cores. A worker reads many headers of the same series (the same modality, device, sizes, study and series
UIDs, image after image), so it remembers, per process and bounded, what pydicom made of each short value it
decoded (see `_decoded_values`) and pydicom's verdict on each set of Image Pixel values: a value seen before
is not converted again, and its DICOM JSON is pydicom's from the first time. Every value is still checked to
decode, and the outputs are byte for byte those of converting everything (tests/test_examine_identity.py).

Deflated Explicit VR Little Endian files (1.2.840.10008.1.2.1.99) are inflated, streaming into a spooled
temporary file (memory bounded, at most `MAX_INFLATED_BYTES`), and the same checks run on the inflated data set.

Large values. `read_header(..., bounded=True)` (for the warehouse loader) does not read a value longer than
`BULK_THRESHOLD` bytes of a binary VR (OB, OW, UN, ...) or `LARGE_VALUE_THRESHOLD` bytes of any other VR (a
10 MB text, say): it skips over it and notes it (`omitted_elements`), and keeps at most `MAX_HEADER_BYTES` of
values. By default it reads every value, because a gate looking for identifiers must see them all. Either
way `metadata_json` leaves such values out like bulk data and lists them, so a metadata JSON stays small.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import struct
import tempfile
import warnings
import zlib
from dataclasses import dataclass, field
from typing import BinaryIO

import pydicom.config
import pydicom.uid
from pydicom.charset import convert_encodings
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.hooks import hooks as _pydicom_hooks
from pydicom.multival import MultiValue
from pydicom.pixels.decoders.base import DecodeRunner, get_decoder
from pydicom.pixels.utils import as_pixel_options

try:  # pydicom's own JPEG / JPEG-LS header parser (the one its decoders use)
    from pydicom.pixels.utils import _get_jpg_parameters as _jpeg_parameters
except ImportError:  # pragma: no cover - a pydicom without it: every JPEG fails the check, loudly

    def _jpeg_parameters(data: bytes) -> dict:
        return {}


from pydicom.sequence import Sequence
from pydicom.tag import BaseTag
from pydicom.uid import UID
from pydicom.valuerep import VR as _VR
from pydicom.values import convert_string

from nccid.contracts.layout import MODALITY_FOLDER, is_pseudonym, is_uid
from nccid.errors import ImageRejected, StoreError

#: binary values longer than this are bulk data: not read by `read_header`, not in the metadata JSON
BULK_THRESHOLD = 1024
#: values of any other VR longer than this (64 KiB) are treated as bulk data too
LARGE_VALUE_THRESHOLD = 64 * 1024
#: values kept in memory while reading one header (bulk data skipped); more is refused
MAX_HEADER_BYTES = 8 * 1024 * 1024
#: data elements in one header, all nesting levels together
MAX_ELEMENTS = 50_000
#: sequences nested deeper than this are refused (real images use fewer than 10 levels)
MAX_SEQUENCE_DEPTH = 32
#: a deflated data set may inflate to at most this many bytes (a "zip bomb" is refused, not inflated)
MAX_INFLATED_BYTES = 2 * 1024**3
#: the private block listing, in a metadata JSON, the elements left out of it (other than pixel data)
OMITTED_CREATOR = "NCCID omitted elements"
OMITTED_GROUP = 0x0009

#: the study-level fields the statistics tables carry (NCCID dashboard columns)
STUDY_FIELDS = (
    "PatientSex",
    "PatientAge",
    "StudyDate",
    "BodyPartExamined",
    "Manufacturer",
    "ManufacturerModelName",
)

_PIXEL_TAGS = {0x7FE00008, 0x7FE00009, 0x7FE00010}
_BINARY_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN"}
_LONG_LENGTH_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
_KNOWN_VRS = {vr.value for vr in _VR if len(vr.value) == 2}
_VR_OF_BYTES = {vr.encode("latin-1"): vr for vr in _KNOWN_VRS}
#: (group, element) and value lengths of an element header, by endianness (little: True)
_TAG_OF = {True: struct.Struct("<HH").unpack_from, False: struct.Struct(">HH").unpack_from}
_SHORT_LENGTH_OF = {True: struct.Struct("<H").unpack_from, False: struct.Struct(">H").unpack_from}
_LONG_LENGTH_OF = {True: struct.Struct("<L").unpack_from, False: struct.Struct(">L").unpack_from}
_VALUE_SIZE = {
    "AT": 4, "FL": 4, "FD": 8, "OD": 8, "OF": 4, "OL": 4, "OV": 8, "OW": 2,
    "SL": 4, "SS": 2, "SV": 8, "UL": 4, "US": 2, "UV": 8,
}  # fmt: skip
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
_CHARSET = 0x00080005
_DEFLATED = pydicom.uid.DeflatedExplicitVRLittleEndian
#: the first bytes of the first fragment, by transfer syntax family
_JPEG_SOI = b"\xff\xd8"
_J2K_STARTS = (b"\xff\x4f\xff\x51", b"\x00\x00\x00\x0cjP  ")
#: RLE frames are decoded to check them; larger ones are refused rather than decoded
_MAX_RLE_FRAME = 512 * 1024**2
_MAX_RLE_FRAGMENT = 256 * 1024**2


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


@dataclass(frozen=True, slots=True)
class Omitted:
    """A value `read_header` skipped over (too large for the header's memory budget)."""

    tag: int
    vr: str
    length: int


def omitted_elements(ds: Dataset) -> dict[int, Omitted]:
    """The elements of this data set (not of its sequence items) whose values `read_header` left unread."""
    return vars(ds).get("_nccid_omitted", {})  # not getattr: a Dataset looks a missing name up as a keyword


# -- reading --------------------------------------------------------------------------------------------
def tag_name(tag: int) -> str:
    """A tag as DICOM writes it, `(0010,0020)`, so error messages name the element a data manager can look up."""
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


@dataclass
class _Pixels:
    """Where the top-level pixel data element is (read_header stops there)."""

    tag: int
    vr: str
    length: int
    value_pos: int


@dataclass
class _Walk:
    """One pass over an element stream: the limits spent so far."""

    fp: BinaryIO
    size: int
    little: bool
    header_only: bool  # read_header: stop before the top-level pixel data
    bounded: bool = False  # skip large values (listed as omitted) and keep at most MAX_HEADER_BYTES
    elements: int = 0
    kept: int = 0
    pixels: _Pixels | None = None
    label: str = "file"  # 'file' or 'inflated data set', for messages
    endian: str = field(init=False)

    def __post_init__(self) -> None:
        self.endian = "<" if self.little else ">"

    def read(self, n: int, what: str) -> bytes:
        data = self.fp.read(n)
        if len(data) < n:
            raise ImageRejected(f"truncated: the {self.label} ends inside {what} ({self.size} bytes)")
        return data

    def keep(self, n: int) -> None:
        self.kept += n
        if self.bounded and self.kept > MAX_HEADER_BYTES:
            raise ImageRejected(
                f"header too large: more than {MAX_HEADER_BYTES // 1024**2} MiB of values before Pixel Data"
            )


def _read_dataset(walk: _Walk, end: int | None, implicit: bool, depth: int, encoding, top: bool) -> Dataset:
    """Elements up to `end` (a defined length), an item delimiter (end None, inside a sequence) or the end of
    the file (end None, top level). Returns the data set; raises ImageRejected naming the element.

    Every image passes here: the loop runs once per element, so it builds no message unless it raises."""
    fp = walk.fp
    read, tell = fp.read, fp.tell
    tag_of, short_length_of = _TAG_OF[walk.little], _SHORT_LENGTH_OF[walk.little]
    bounded, little = walk.bounded, walk.little
    stop_at_pixels = top and walk.header_only
    elements: dict[BaseTag, RawDataElement | DataElement] = {}
    omitted: dict[int, Omitted] = {}
    last = -1
    while True:
        pos = tell()
        if end is not None and pos >= end:
            if pos > end:
                raise ImageRejected(f"element {tag_name(last)} runs past the end of its sequence item")
            break
        head = read(8)
        if not head and end is None and top:
            break  # the end of the file
        if len(head) < 8:
            raise ImageRejected(f"truncated: the {walk.label} ends inside an element header ({walk.size} bytes)")
        group, elem = tag_of(head)
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
        if stop_at_pixels and tag in _PIXEL_TAGS:
            vr, length, header_len = _element_header(walk, head, implicit, tag)
            walk.pixels = _Pixels(tag, vr or "OW", length, pos + header_len)
            break
        last = tag
        walk.elements += 1
        if walk.elements > MAX_ELEMENTS:
            raise ImageRejected(f"header too large: more than {MAX_ELEMENTS} data elements")
        vr = None if implicit else _VR_OF_BYTES.get(head[4:6])
        if vr is not None and vr not in _LONG_LENGTH_VRS:  # most elements: explicit VR, a 2-byte length
            length, value_pos = short_length_of(head, 6)[0], pos + 8
        else:  # implicit VR, a 4-byte length, or an unknown VR (rejected there)
            vr, length, header_len = _element_header(walk, head, implicit, tag)
            value_pos = pos + header_len
        if length == _UNDEFINED:
            element = _undefined_length(walk, tag, vr, implicit, depth, encoding, value_pos)
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
            seq = _read_sequence(walk, tag, value_pos + length, implicit, depth, encoding)
            elements[BaseTag(tag)] = DataElement(BaseTag(tag), "SQ", seq, value_pos, is_undefined_length=False)
            continue
        size = _value_size(effective_vr)
        if size and length % size:
            raise ImageRejected(
                f"{tag_name(tag)} VR {effective_vr}: a length of {length} bytes is not a multiple of {size}"
            )
        if bounded and tag != _CHARSET and length > _value_limit(effective_vr):
            omitted[tag] = Omitted(tag, effective_vr or "UN", length)
            fp.seek(value_pos + length)
            continue
        walk.kept += length
        if bounded and walk.kept > MAX_HEADER_BYTES:
            walk.keep(0)  # raises, with the one message for it
        value = read(length)
        if len(value) < length:
            walk.read(length, f"the value of {tag_name(tag)}")  # raises: the file is shorter than its size
        if tag == _CHARSET:
            encoding = _encodings(value, little)
        btag = BaseTag(tag)
        elements[btag] = RawDataElement(btag, vr, length, value, value_pos, implicit, little)
    ds = Dataset(elements, parent_encoding=encoding)
    ds.set_original_encoding(implicit, little, encoding)
    if omitted:
        ds._nccid_omitted = omitted
    return ds


def _element_header(walk: _Walk, head: bytes, implicit: bool, tag: int) -> tuple[str | None, int, int]:
    """(VR or None for implicit VR, value length, header length) of the element whose first 8 bytes are `head`."""
    if implicit:
        return None, _LONG_LENGTH_OF[walk.little](head, 4)[0], 8
    vr = _VR_OF_BYTES.get(head[4:6])
    if vr is None:
        raise ImageRejected(f"unknown VR {head[4:6]!r} in {tag_name(tag)}")
    if vr in _LONG_LENGTH_VRS:
        data = walk.fp.read(4)
        if len(data) < 4:
            walk.read(4, f"the header of {tag_name(tag)}")  # raises: truncated
        return vr, _LONG_LENGTH_OF[walk.little](data)[0], 12
    return vr, _SHORT_LENGTH_OF[walk.little](head, 6)[0], 8


def _dictionary_vr(tag: int) -> str | None:
    try:
        return dictionary_VR(tag)
    except KeyError:
        return None


@functools.lru_cache(maxsize=512)  # a few dozen VRs and dictionary VR spellings ('US or SS', 'OB or OW')
def _value_limit(vr: str | None) -> int:
    if vr is None or vr in _BINARY_VRS or vr.startswith("OB") or vr.endswith("OW"):
        return BULK_THRESHOLD
    return LARGE_VALUE_THRESHOLD


@functools.lru_cache(maxsize=512)
def _value_size(vr: str | None) -> int:
    """The size of one value of `vr` (the smallest of an ambiguous VR's), 0 if values have no fixed size."""
    sizes = [_VALUE_SIZE.get(one) for one in (vr or "").split(" or ")]
    return min((s for s in sizes if s), default=0) if all(sizes) else 0


def _encodings(value: bytes, little: bool):
    """The Python encodings of a SpecificCharacterSet value (pydicom's warnings about it are silenced by the
    public reader that runs this)."""
    try:
        return convert_encodings(convert_string(value, little))
    except Exception as exc:  # an unknown or garbled character set name
        raise ImageRejected(f"unreadable SpecificCharacterSet (0008,0005): {type(exc).__name__}") from exc


def _undefined_length(walk: _Walk, tag: int, vr: str | None, implicit: bool, depth: int, encoding, pos: int):
    """An element of undefined length: a sequence (SQ, or UN/private whose value is items), or encapsulated
    pixel data (read_image keeps its bytes)."""
    effective_vr = vr or _dictionary_vr(tag)
    if effective_vr in (None, "UN") and _peek_tag(walk) == _ITEM:
        seq = _read_sequence(walk, tag, None, implicit or effective_vr == "UN", depth, encoding)
        return DataElement(BaseTag(tag), "SQ", seq, pos, is_undefined_length=True)
    if effective_vr == "SQ":
        seq = _read_sequence(walk, tag, None, implicit, depth, encoding)
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


def _peek_tag(walk: _Walk) -> int:
    pos = walk.fp.tell()
    data = walk.fp.read(4)
    walk.fp.seek(pos)
    if len(data) < 4:
        return -1
    group, elem = struct.unpack(walk.endian + "HH", data)
    return group << 16 | elem


def _read_sequence(walk: _Walk, tag: int, end: int | None, implicit: bool, depth: int, encoding) -> Sequence:
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
            item = _read_dataset(walk, None, implicit, depth + 1, encoding, top=False)
            item.is_undefined_length_sequence_item = True
        else:
            item_end = fp.tell() + length
            if item_end > walk.size or (end is not None and item_end > end):
                raise ImageRejected(f"truncated: an item of sequence {tag_name(tag)} runs past its end")
            item = _read_dataset(walk, item_end, implicit, depth + 1, encoding, top=False)
        items.append(item)
    seq = Sequence(items)
    seq.is_undefined_length = end is None
    return seq


def _skip_fragments(walk: _Walk, tag: int) -> int:
    """Walk the items of encapsulated pixel data (reading only their 8-byte headers); return the position after
    the sequence delimiter. The first item is the Basic Offset Table; at least one fragment must follow."""
    fp = walk.fp
    fragments = 0
    while True:
        head = fp.read(8)
        if len(head) < 8:
            raise ImageRejected(f"truncated: encapsulated Pixel Data {tag_name(tag)} has no sequence delimiter")
        group, elem, length = struct.unpack(walk.endian + "HHL", head)
        item_tag = group << 16 | elem
        if item_tag == _SEQUENCE_END:
            break
        if item_tag != _ITEM or length == _UNDEFINED:
            raise ImageRejected(f"encapsulated Pixel Data {tag_name(tag)}: {tag_name(item_tag)} is not a fragment")
        if fp.tell() + length > walk.size:
            raise ImageRejected(f"truncated: a fragment of Pixel Data {tag_name(tag)} runs past the end")
        fragments += 1
        fp.seek(fp.tell() + length)
    if fragments < 2:
        raise ImageRejected(f"encapsulated Pixel Data {tag_name(tag)} holds no fragment (only an offset table)")
    return fp.tell()


def _read_file(reader: BinaryIO, size: int, header_only: bool, bounded: bool) -> tuple[FileDataset, _Walk]:
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
        vr, length, _ = _element_header(meta_walk, head, False, tag)
        if length == _UNDEFINED or length > LARGE_VALUE_THRESHOLD:
            raise ImageRejected(f"file meta element {tag_name(tag)} has an invalid length ({length})")
        if BaseTag(tag) in elements:
            raise ImageRejected(f"file meta element {tag_name(tag)} appears twice")
        value = meta_walk.read(length, f"the value of {tag_name(tag)}")
        elements[BaseTag(tag)] = RawDataElement(BaseTag(tag), vr, length, value, pos + 8, False, True)
    file_meta = FileMetaDataset(elements)  # the same data set as FileMetaDataset(Dataset(elements)), one fewer
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
    dataset = _read_dataset(walk, None, implicit, 0, "iso8859", top=True)
    ds = FileDataset(getattr(reader, "name", "<stream>"), dataset, start[:128], file_meta, implicit, walk.little)
    ds.set_original_encoding(implicit, walk.little, dataset.original_character_set)
    if omitted_elements(dataset):
        ds._nccid_omitted = omitted_elements(dataset)
    return ds, walk


def _check_vr_encoding(walk: _Walk, implicit: bool, syntax: UID) -> None:
    """The first element must be encoded as the transfer syntax says (pydicom's own test: two capital letters
    after the tag mean explicit VR); otherwise pydicom would read the filed file another way than we did."""
    pos = walk.fp.tell()
    head = walk.fp.read(6)
    walk.fp.seek(pos)
    if len(head) < 6:
        return
    found_implicit = not (0x40 < head[4] < 0x5B and 0x40 < head[5] < 0x5B)
    if found_implicit != implicit:
        found = "implicit" if found_implicit else "explicit"
        raise ImageRejected(f"the data set is encoded in {found} VR, not as transfer syntax {syntax.name!r} says")


def _transfer_syntax(file_meta: FileMetaDataset) -> UID:
    try:
        value = file_meta.get("TransferSyntaxUID")
    except Exception as exc:  # a garbled value
        raise ImageRejected(f"unreadable TransferSyntaxUID (0002,0010): {type(exc).__name__}") from exc
    text = str(value or "").strip("\x00 ")
    if not text:
        raise ImageRejected("no TransferSyntaxUID (0002,0010) in the file meta information")
    if not is_uid(text):
        raise ImageRejected(f"invalid TransferSyntaxUID (0002,0010) {text[:64]!r}: not a DICOM UID")
    uid = UID(text)
    if uid not in pydicom.uid.AllTransferSyntaxes:
        raise ImageRejected(f"unknown transfer syntax {text!r} (0002,0010)")
    return uid


def _inflate(reader: BinaryIO) -> BinaryIO:
    """The inflated data set of a Deflated Explicit VR Little Endian file, in a spooled temporary file."""
    out = tempfile.SpooledTemporaryFile(max_size=16 * 1024**2)  # noqa: SIM115 - the caller closes it
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    try:
        while not inflater.eof:
            chunk = inflater.unconsumed_tail or reader.read(1024**2)
            if not chunk:
                out.close()
                raise ImageRejected("truncated: the deflated data set ends before its deflate stream does")
            data = inflater.decompress(chunk, 16 * 1024**2)
            total += len(data)
            if total > MAX_INFLATED_BYTES:
                out.close()
                raise ImageRejected(f"deflated data set inflates to more than {MAX_INFLATED_BYTES // 1024**2} MiB")
            out.write(data)
    except zlib.error as exc:
        out.close()
        raise ImageRejected(f"deflated data set cannot be inflated (zlib: {exc})") from exc
    return out


# -- the pixel data of a header: will `pixel_array` work on the filed file? --------------------------------
def _check_pixels(ds: FileDataset, walk: _Walk) -> None:
    pixels = walk.pixels
    if pixels is None:  # the file ended before any pixel data
        classes = (_text(ds.file_meta, "MediaStorageSOPClassUID"), _text(ds, "SOPClassUID"))
        is_image = (
            any("Image Storage" in UID(c).name for c in classes) or _text(ds, "Modality").upper() in MODALITY_FOLDER
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
    expected = _check_pixel_module(ds, syntax, pixels)
    if syntax.is_encapsulated:
        _check_first_frame(walk, first, ds, syntax, name)
    if not syntax.is_encapsulated and pixels.length not in (expected, expected + expected % 2):
        raise ImageRejected(
            f"Pixel Data {name} holds {pixels.length} bytes; Rows x Columns x Samples x Bits x Frames needs {expected}"
        )
    if end < walk.size:  # elements after the pixel data (padding, signatures): they must be whole too
        walk.fp.seek(end)
        _read_dataset(walk, None, bool(ds.original_encoding[0]), 0, ds.original_character_set, top=True)


def _first_fragment(walk: _Walk) -> tuple[int, int]:
    """(position, length) of the first fragment after the offset table; (0, 0) if there is none."""
    pos = walk.fp.tell()
    found = (0, 0)
    head = walk.fp.read(8)
    if len(head) == 8:
        group, elem, length = struct.unpack("<HHL", head)
        if (group << 16 | elem) == _ITEM and length != _UNDEFINED:
            walk.fp.seek(walk.fp.tell() + length)
            head = walk.fp.read(8)
            if len(head) == 8:
                group, elem, length = struct.unpack("<HHL", head)
                if (group << 16 | elem) == _ITEM and length != _UNDEFINED:
                    found = (walk.fp.tell(), length)
    walk.fp.seek(pos)
    return found


def _check_first_frame(walk: _Walk, fragment: tuple[int, int], ds: Dataset, syntax: UID, name: str) -> None:
    """The first frame's codestream must be of its transfer syntax and describe the image the header does
    (pixel_array would fail otherwise): JPEG, JPEG-LS and JPEG 2000 by their codestream header (a few bytes),
    RLE by decoding the frame (RLE is rare and cheap to decode)."""
    pos, length = fragment
    walk.fp.seek(pos)
    title = f"Pixel Data {name} of transfer syntax {syntax.name!r}"
    if syntax in pydicom.uid.JPEGTransferSyntaxes or syntax in pydicom.uid.JPEGLSTransferSyntaxes:
        found = _parsed(walk, pos, length, _jpeg_size)
        if found is None:
            raise ImageRejected(f"{title} does not start with a JPEG header (SOI, then a SOF marker)")
    elif syntax in pydicom.uid.JPEG2000TransferSyntaxes:  # HTJ2K included
        found = _parsed(walk, pos, length, _j2k_size)
        if found is None:
            raise ImageRejected(f"{title} does not start with a JPEG 2000 codestream (SOC, then SIZ)")
    elif syntax == pydicom.uid.RLELossless:
        _decode_rle_frame(walk.fp.read(length) if length <= _MAX_RLE_FRAGMENT else b"", ds, title)
        return
    else:
        return
    rows, columns, samples, precision = found
    want = (int(ds.Rows), int(ds.Columns), int(ds.get("SamplesPerPixel") or 1))
    if (rows or want[0], columns, samples) != want:
        raise ImageRejected(
            f"{title} holds a {columns} x {rows or '?'} image of {samples} sample(s); the header says "
            f"{want[1]} x {want[0]} of {want[2]}"
        )
    if precision > int(ds.BitsAllocated):
        raise ImageRejected(f"{title} holds {precision}-bit samples; Bits Allocated (0028,0100) is {ds.BitsAllocated}")


def _parsed(walk: _Walk, pos: int, length: int, parse):
    """`parse` over the start of a fragment: 4 KiB (enough for nearly every codestream header, one ranged read
    on a remote store), then up to 1 MiB when large application segments come first."""
    for size in (4096, 1024**2):
        walk.fp.seek(pos)
        found = parse(walk.fp.read(min(length, size)))
        if found is not None or length <= size:
            return found
    return None


def _jpeg_size(data: bytes) -> tuple[int, int, int, int] | None:
    """(rows, columns, components, precision) from a JPEG or JPEG-LS SOF segment, or None."""
    if not data.startswith(_JPEG_SOI):
        return None
    params = _jpeg_parameters(data)
    if not params or "width" not in params:
        return None
    return params["height"], params["width"], params["components"], params["precision"]


def _j2k_size(data: bytes) -> tuple[int, int, int, int] | None:
    """(rows, columns, components, precision) from a JPEG 2000 SIZ marker segment (JP2 boxes skipped), or None."""
    offset = 0
    if data.startswith(_J2K_STARTS[1]):
        offset = 12
        while offset + 8 <= len(data) and data[offset + 4 : offset + 8] != b"jp2c":
            box = int.from_bytes(data[offset : offset + 4], "big")
            if box < 8:
                return None
            offset += box
        offset += 8
    siz = data[offset : offset + 43]
    if len(siz) < 43 or siz[:4] != b"\xff\x4f\xff\x51":
        return None
    xsiz, ysiz, xosiz, yosiz = struct.unpack(">LLLL", siz[8:24])
    (components,) = struct.unpack(">H", siz[40:42])
    return ysiz - yosiz, xsiz - xosiz, components, (siz[42] & 0x7F) + 1


def _decode_rle_frame(fragment: bytes, ds: Dataset, title: str) -> None:
    samples = int(ds.get("SamplesPerPixel") or 1)
    frame = int(ds.Rows) * int(ds.Columns) * samples * (int(ds.BitsAllocated) // 8 or 1)
    if not fragment or frame > _MAX_RLE_FRAME or frame > 64 * len(fragment) + 64:
        raise ImageRejected(f"{title}: its first frame ({len(fragment)} bytes) cannot decode to {frame} bytes")
    options = as_pixel_options(ds)
    options["number_of_frames"] = 1
    decoder = get_decoder(pydicom.uid.RLELossless)
    buffer = encapsulate([fragment])
    try:
        # pydicom's own decoder first: it raises on a bad stream where pylibjpeg-rle (Rust) may panic; then the
        # plugins a researcher's pixel_array would use
        decoder.as_buffer(buffer, index=0, decoding_plugin="pydicom", **options)
        decoder.as_buffer(buffer, index=0, **options)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # a Rust panic (pyo3 PanicException) is a BaseException, not an Exception
        raise ImageRejected(f"{title}: its first frame does not decode to Rows x Columns x Samples") from exc


def _check_pixel_module(ds: Dataset, syntax: UID, pixels: _Pixels) -> int:
    """pydicom's own checks of the Image Pixel attributes; returns the expected native length in bytes.

    Its answer depends only on the transfer syntax, the pixel element and the Image Pixel values, so a worker
    remembers it for values it read before (a series repeats them image after image)."""
    key = _pixel_module_key(ds, syntax, pixels)
    if key is None:
        return _pixel_module_length(ds, syntax, pixels)
    known = _PIXEL_MODULES.get(key)
    if isinstance(known, str):
        raise ImageRejected(known)
    if known is not None:
        return known
    try:
        expected = _pixel_module_length(ds, syntax, pixels)
    except ImageRejected as exc:
        _remember(_PIXEL_MODULES, _PIXEL_MODULES_MAX, key, exc.reason)
        raise
    return _remember(_PIXEL_MODULES, _PIXEL_MODULES_MAX, key, expected)


def _remember(memo: dict, limit: int, key, value):
    """`memo[key] = value`, the oldest entry dropped first when the memo holds `limit` (memory stays bounded
    however many headers a worker reads); returns `value`."""
    if len(memo) >= limit:
        with contextlib.suppress(KeyError, RuntimeError, StopIteration):  # another thread dropped it first
            del memo[next(iter(memo))]
    memo[key] = value
    return value


#: (transfer syntax, pixel tag and VR, the memo keys of the Image Pixel values) -> expected length or reason
_PIXEL_MODULES: dict[tuple, int | str] = {}
_PIXEL_MODULES_MAX = 1024
#: what pydicom's `as_pixel_options` reads (Image Pixel values; with an extended offset table, no memo)
_PIXEL_MODULE_TAGS = (0x00280002, 0x00280004, 0x00280006, 0x00280008, 0x00280010, 0x00280011, 0x00280100,
                      0x00280101, 0x00280103)  # fmt: skip
_EXTENDED_OFFSETS = (0x7FE00001, 0x7FE00002)


def _pixel_module_key(ds: Dataset, syntax: UID, pixels: _Pixels) -> tuple | None:
    """The memo key of `_check_pixel_module`: None unless every Image Pixel value present is one read_header
    left as read (see `_known_values`), so that the key holds its bytes."""
    known_values = _known_values(ds)
    if not known_values or any(tag in ds for tag in _EXTENDED_OFFSETS):
        return None
    parts = []
    for tag in _PIXEL_MODULE_TAGS:
        raw = ds.get_item(tag)
        if raw is None:
            parts.append(None)
            continue
        entry = known_values.get(tag)
        if entry is None or entry[0] is not raw:
            return None
        parts.append(entry[1])
    return syntax, pixels.tag, pixels.vr, tuple(parts)


def _pixel_module_length(ds: Dataset, syntax: UID, pixels: _Pixels) -> int:
    keyword = {0x7FE00008: "FloatPixelData", 0x7FE00009: "DoubleFloatPixelData"}.get(pixels.tag, "PixelData")
    try:  # pydicom's warnings are silenced by the public reader that runs this
        runner = DecodeRunner(syntax)
        runner.set_options(**as_pixel_options(ds), pixel_keyword=keyword, pixel_vr=pixels.vr)
        runner._validate_options()  # validate() also wants the pixel bytes, which a header reader skips
        frame = runner.frame_length(unit="bytes")
        return int(-(-frame * runner.number_of_frames // 1))
    except (AttributeError, ValueError, TypeError, KeyError, OverflowError) as exc:
        message = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise ImageRejected(f"Image Pixel attributes (0028,xxxx) do not describe the pixel data: {message}") from exc


# -- public readers -----------------------------------------------------------------------------------------
def read_header(reader: BinaryIO, size: int, *, bounded: bool = False) -> Dataset:
    """The header of a Part 10 file up to the pixel data, checked to be whole and its pixels readable.

    By default every value is read: a gate looking for identifiers (`nccid site check`) must see them all.
    `bounded=True` (the warehouse loader) bounds memory instead: values over the bulk thresholds are skipped,
    not read (see `omitted_elements`), and at most `MAX_HEADER_BYTES` of values are kept; and a value this
    process has decoded before (see `_decoded_values`) is known to decode, so it is left for pydicom to
    convert when first used (as in any lazily read data set), and `image_facts` and `metadata_json` take what
    pydicom made of it then.
    Raises ImageRejected with a one-line reason naming the tag or defect; StoreError passes through (the
    store failed to deliver bytes: not the file's fault, never quarantined).
    """
    with warnings.catch_warnings():  # pydicom warns about odd values it reads anyway; the reasons say enough
        warnings.simplefilter("ignore")
        ds, walk = _guarded(reader, size, header_only=True, bounded=bounded)
        try:
            _convert_all(ds, _decoded_values() if bounded else None)
            _guard(lambda: _check_pixels(ds, walk))
        finally:
            if walk.fp is not reader:
                walk.fp.close()
    return ds


def read_image(reader: BinaryIO, size: int) -> Dataset:
    """The whole object, pixel data and any trailing elements included, after the same structural and
    completeness checks as `read_header` (the pixel length against Rows and Columns is the caller's)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds, walk = _guarded(reader, size, header_only=False, bounded=False)
        try:
            _convert_all(ds, None)
            if not any(tag in ds for tag in _PIXEL_TAGS):
                _guard(lambda: _check_pixels(ds, walk))  # only says whether an object without pixels is whole
        finally:
            if walk.fp is not reader:
                walk.fp.close()
    return ds


def _guarded(reader: BinaryIO, size: int, header_only: bool, bounded: bool) -> tuple[FileDataset, _Walk]:
    return _guard(lambda: _read_file(reader, size, header_only, bounded))


def _guard(step):
    """Run a reading step: ImageRejected and StoreError pass; anything else a corrupt file provokes (pydicom
    or struct raising on odd bytes) becomes ImageRejected naming the exception type, never a traceback.
    (The public readers that run it silence pydicom's warnings.)"""
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


def _convert_all(ds: Dataset, decoded: dict | None, path: str = "") -> None:
    """Convert every value now (pydicom converts lazily, on first use), so that a value that cannot be
    decoded is a reason here, not an exception in whoever touches it later. With `decoded` (the memo of
    `_decoded_values`), a value decoded before is known to decode and stays as read; one not decoded before
    is decoded aside, remembered, and stays as read too (pydicom decodes it the same way when it is used).
    What pydicom made of each value left as read is noted on its data set (see `_known`)."""
    encoding = _encoding_key(ds) if decoded is not None else None
    known_here: dict[int, tuple[RawDataElement, tuple, tuple]] = {}
    for tag, raw in list(ds.items()):
        if encoding is not None:
            key = _decoded_key(raw, encoding)  # None: not a value the memo keeps
            if key is not None:
                known = decoded.get(key) or _decode_aside(decoded, key, raw, ds, path)
                if known is not None:
                    known_here[key[0]] = (raw, key, known)
                    continue
        try:
            element = ds[tag]
        except Exception as exc:
            vr = getattr(ds.get_item(tag), "VR", None) or "UN"
            raise ImageRejected(
                f"{path}{tag_name(tag)} VR {vr}: the value cannot be decoded ({type(exc).__name__})"
            ) from exc
        if element.VR == "SQ":
            for item in element.value:
                _convert_all(item, decoded, f"{path}{tag_name(tag)} > ")
    if known_here:
        ds._nccid_known = known_here


# -- values decoded before ----------------------------------------------------------------------------------
# A series repeats most of its header from image to image (the same modality, manufacturer, rows, spacing,
# study and series UIDs, ...), and a loader worker reads thousands of headers: pydicom's conversion of a raw
# value and its DICOM JSON are the bulk of the CPU a header costs, so a worker remembers, for each value it
# decoded, what pydicom made of it. The key holds everything pydicom's conversion of an explicit-VR public
# element depends on (tag, VR, bytes, endianness, character set; pydicom's settings empty the memo when they
# change), and the memo keeps pydicom's own results: nothing is decoded or written here but by pydicom.
#: (tag, VR, value bytes, little endian, implicit VR, character set) -> (left out of the metadata JSON as too
#: large, the element's DICOM JSON by pydicom as `json.dumps` writes it, its text for image_facts or None)
_DECODED: dict[tuple, tuple[bool, str, str | None]] = {}
_DECODED_MAX = 4096  # entries; with values of at most _DECODED_VALUE_MAX bytes, a few MB at most
_DECODED_VALUE_MAX = 512
_decoded_settings: tuple = ()


def _decoded_values() -> dict | None:
    """The memo of values decoded in this process, emptied when a pydicom setting that shapes a decoded value
    changes; None (no memo) when a data element callback or hook arguments are set."""
    global _decoded_settings
    config = pydicom.config
    if config.data_element_callback is not None or _pydicom_hooks.raw_element_kwargs:
        return None
    settings = (
        config.settings.reading_validation_mode,
        config.use_DS_numpy,
        config.use_IS_numpy,
        config.use_DS_decimal,
        config.datetime_conversion,
        config.convert_wrong_length_to_UN,
        config.use_none_as_empty_text_VR_value,
        _pydicom_hooks.raw_element_vr,
        _pydicom_hooks.raw_element_value,
    )
    if settings != _decoded_settings:
        _DECODED.clear()
        _decoded_settings = settings
    return _DECODED


def _encoding_key(ds: Dataset):
    """The character set pydicom decodes this data set's values with, hashable; None when it is not known
    from the reading (then nothing of this data set is remembered)."""
    encoding = ds.original_character_set
    if not encoding:
        return None
    return encoding if isinstance(encoding, str) else tuple(encoding)


def _decoded_key(raw, encoding) -> tuple | None:
    """The memo key of a raw element: None unless it is a raw explicit-VR public element of a short defined
    length whose conversion depends on nothing else (not UN, SQ, pixel data or SpecificCharacterSet)."""
    if not isinstance(raw, RawDataElement):
        return None
    tag, vr, value = int(raw.tag), raw.VR, raw.value
    if (
        vr is None
        or vr == "UN"
        or vr == "SQ"
        or tag & 0x10000  # a private group: its VR and creator come from the data set
        or tag == _CHARSET
        or tag in _PIXEL_TAGS
        or value is None
        or raw.length != len(value)
        or raw.length > _DECODED_VALUE_MAX
    ):
        return None
    return tag, vr, value, raw.is_little_endian, raw.is_implicit_VR, encoding


def _decode_aside(decoded: dict, key: tuple, raw: RawDataElement, ds: Dataset, path: str) -> tuple | None:
    """Decode `raw` as `ds[tag]` would (the same pydicom call) without changing `ds`, and remember and return
    what pydicom made of it (None if pydicom cannot write it as JSON); raises ImageRejected if it cannot be
    decoded."""
    tag = key[0]
    try:
        element = convert_raw_data_element(raw, encoding=ds.original_character_set, ds=ds)
    except Exception as exc:
        raise ImageRejected(
            f"{path}{tag_name(tag)} VR {raw.VR}: the value cannot be decoded ({type(exc).__name__})"
        ) from exc
    try:
        value = element.value
        large = value is not None and _too_large(element)
        as_json = _dumps(element.to_json_dict(None, LARGE_VALUE_THRESHOLD))
        text = ("" if value is None else str(value).strip()) if tag in _FACT_TAGS else None
    except Exception:  # pydicom cannot write it: it is converted again, and metadata_json names it
        return None
    return _remember(decoded, _DECODED_MAX, key, (large, as_json, text))


def _known_values(ds: Dataset) -> dict[int, tuple[RawDataElement, tuple, tuple]]:
    """What `read_header` noted of the values of `ds` it left as read: tag -> (the raw element, its memo key,
    (too large, JSON, text))."""
    return vars(ds).get("_nccid_known", _NOTHING_KNOWN)


_NOTHING_KNOWN: dict = {}


def _known(known: dict, tag: int, raw) -> tuple[bool, str, str | None] | None:
    """What pydicom made of `raw` (the element now at `tag`), if it is still the one read_header left as read:
    a caller that changed or converted it has put another object there."""
    entry = known.get(tag)
    return entry[2] if entry is not None and entry[0] is raw else None


# -- facts and metadata -------------------------------------------------------------------------------------
def _text(ds: Dataset, keyword: str) -> str:
    try:
        value = ds.get(keyword)
    except Exception:  # an undecodable value reads as absent (read_header has converted every value already)
        return ""
    if value is None:
        return ""
    return str(value).strip()


#: the tags image_facts reads, by keyword
_FACT_KEYWORDS = ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "Modality", *STUDY_FIELDS)
_FACT_TAG_OF: dict[str, int] = {keyword: tag_for_keyword(keyword) for keyword in _FACT_KEYWORDS}
_FACT_TAGS = frozenset(_FACT_TAG_OF.values())


def _fact_text(ds: Dataset, keyword: str, known_values: dict) -> str:
    """`_text` of an element image_facts reads, from what pydicom made of its value before when it is known."""
    tag = _FACT_TAG_OF[keyword]
    raw = ds.get_item(tag)
    if raw is None:
        return ""
    known = _known(known_values, tag, raw)
    if known is not None and known[2] is not None:
        return known[2]
    if isinstance(raw, RawDataElement):  # pydicom converts it now: silence its warnings, as read_header does
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _text(ds, keyword)
    return _text(ds, keyword)


def _identifying(ds: Dataset, keyword: str, tag: str, known_values: dict) -> str:
    """The value of an identifying tag; one too long to have been read is a reason of its own."""
    skipped = omitted_elements(ds).get(_FACT_TAG_OF[keyword])
    if skipped is not None:
        raise ImageRejected(f"{keyword} {tag} is {skipped.length} bytes long: not an identifier")
    return _fact_text(ds, keyword, known_values)


def image_facts(ds: Dataset) -> ImageFacts:
    """Check the identifying tags and the modality; the reason names the tag."""
    known_values = _known_values(ds)
    patient = _identifying(ds, "PatientID", "(0010,0020)", known_values)
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
        value = _identifying(ds, keyword, tag, known_values).rstrip("\x00")
        if not value:
            raise ImageRejected(f"missing {keyword} {tag}")
        if not is_uid(value):
            raise ImageRejected(f"invalid {keyword} {tag}: not a DICOM UID (value not shown)")
        uids[keyword] = value
    modality = _identifying(ds, "Modality", "(0008,0060)", known_values).upper()
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
        fields={name: _fact_text(ds, name, known_values)[:64] for name in STUDY_FIELDS},
    )


def _strip_bulk(ds: Dataset) -> None:
    """Remove pixel data and bulk values; list every other value left out in a private block of its data set.
    A value decoded before is judged by what pydicom made of it then; any other is converted, all of them
    first and in tag order (as iterating the data set does), before anything is removed."""
    left_out = [o.tag for o in omitted_elements(ds).values()]
    known_values = _known_values(ds)
    raws = dict(ds.items())
    elements = []
    for tag in sorted(raws, key=int):  # tag order (ints compare faster than pydicom's tags)
        known = _known(known_values, int(tag), raws[tag])
        elements.append((tag, known, ds[tag] if known is None else None))
    for tag, known, elem in elements:
        if tag in _PIXEL_TAGS:
            del ds[tag]
        elif known is not None:
            if known[0]:
                del ds[tag]
                left_out.append(int(tag))
        elif elem.VR == "SQ":
            for item in elem.value:
                _strip_bulk(item)
        elif elem.value is not None and _too_large(elem):
            del ds[tag]
            left_out.append(int(tag))
    if left_out:
        block = ds.private_block(OMITTED_GROUP, OMITTED_CREATOR, create=True)
        block.add_new(0x01, "AT", sorted(set(left_out)))


def _too_large(elem: DataElement) -> bool:
    """Bulk data for the metadata JSON: a binary value over BULK_THRESHOLD bytes, any other over
    LARGE_VALUE_THRESHOLD characters."""
    limit = BULK_THRESHOLD if elem.VR in _BINARY_VRS else LARGE_VALUE_THRESHOLD
    value = elem.value
    if isinstance(value, bytes | bytearray | str):
        return len(value) > limit
    if isinstance(value, list | tuple | MultiValue):
        return len(value) > limit or sum(len(str(v)) + 1 for v in value) > limit
    return len(str(value)) > limit


def _json_text(ds: Dataset) -> str:
    """`json.dumps(ds.to_json_dict(bulk_data_threshold=LARGE_VALUE_THRESHOLD), sort_keys=True,
    separators=(",", ":"))`, each element's JSON written by pydicom and serialised by `json.dumps` with the
    same options: taken from the memo for a value decoded before, else made now (sequences by pydicom's own
    recursion). The elements' JSON texts are joined in the order `sort_keys` puts their keys in (the keys are
    the tags in 8 upper-case hex digits, so text order is tag order)."""
    known_values = _known_values(ds)
    parts = []
    for tag, raw in ds.items():
        known = _known(known_values, int(tag), raw)
        if known is not None:
            parts.append((f"{tag:08X}", known[1]))
        else:
            parts.append((f"{tag:08X}", _dumps(ds[tag].to_json_dict(None, LARGE_VALUE_THRESHOLD))))
    parts.sort()
    return "{" + ",".join(f'"{key}":{text}' for key, text in parts) + "}"


def _dumps(doc) -> str:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"))


def metadata_json(ds: Dataset) -> bytes:
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
            _strip_bulk(ds)
            try:
                text = _json_text(ds)
            except Exception:  # pydicom's own walk names the element in its log and raises the same error
                text = _dumps(ds.to_json_dict(bulk_data_threshold=LARGE_VALUE_THRESHOLD))
            return (text + "\n").encode()
        except Exception as exc:
            where = _json_culprit(ds)
            raise ImageRejected(f"header cannot be written as DICOM JSON: {where}{type(exc).__name__}") from exc


def _json_culprit(ds: Dataset, path: str = "") -> str:
    """'(gggg,eeee) VR XX: ' of the first element that cannot be written as DICOM JSON ('' if none is found)."""
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                found = _json_culprit(item, f"{path}{tag_name(elem.tag)} > ")
                if found:
                    return found
            continue
        try:
            elem.to_json_dict(None, LARGE_VALUE_THRESHOLD)
        except Exception:  # the one that fails, whatever pydicom raises for it
            return f"{path}{tag_name(elem.tag)} VR {elem.VR} holds a value DICOM JSON cannot carry: "
    return ""
