"""The shared DICOM reader (nccid.contracts.dicom): every defect of a raw file is one named reason, never an
exception of another type; what it accepts, pydicom reads back with its pixels; memory stays bounded."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import pydicom
import pytest
from helpers import configure, header_mutants, image, listing, put_clinical, written
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
)

from nccid.contracts import dicom
from nccid.contracts.dicom import (
    MAX_ELEMENTS,
    MAX_SEQUENCE_DEPTH,
    OMITTED_CREATOR,
    image_facts,
    metadata_json,
    read_header,
    read_image,
)
from nccid.contracts.layout import metadata_key as dicom_metadata_key
from nccid.errors import ImageRejected
from nccid.synth.dicom import encode
from nccid.warehouse.catalog import Catalog
from nccid.warehouse.loader import load

STUDY, SERIES, SOP = "1.2.826.7", "1.2.826.7.1", "1.2.826.7.1.1"


def dataset(modality: str = "CR") -> Dataset:
    return image("Covid1", STUDY, SERIES, SOP, modality=modality)[0]


def examine(data: bytes, bounded: bool = True) -> str:
    """What the loader does with one raw object: '' when it could be filed, else the reason."""
    try:
        ds = read_header(io.BytesIO(data), len(data), bounded=bounded)
        image_facts(ds)
        metadata_json(ds)
    except ImageRejected as exc:
        return exc.reason
    return ""


def readable(data: bytes) -> None:
    """What a researcher does with a filed image."""
    ds = pydicom.dcmread(io.BytesIO(data))
    assert ds.pixel_array.size > 0


def element(data: bytes, tag: int, vr: bytes) -> int:
    """Offset of an explicit VR little endian element's tag."""
    return data.index(struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr)


GOOD = encode(dataset())


def test_a_good_file_is_accepted_and_reads_back():
    assert examine(GOOD) == ""
    readable(GOOD)


# -- 13.1: malformed headers --------------------------------------------------------------------------------
def test_a_vr_that_names_no_vr_is_named():
    at = element(GOOD, 0x00200010, b"SH")  # StudyID
    data = GOOD[: at + 4] + b"WH" + GOOD[at + 6 :]
    assert examine(data) == "unknown VR b'WH' in (0020,0010)"


def test_a_length_that_is_not_a_multiple_of_the_vr_size_is_named():
    at = element(GOOD, 0x00280010, b"US")  # Rows: 2 bytes -> 3 bytes
    data = GOOD[: at + 6] + b"\x03\x00" + GOOD[at + 8 : at + 10] + b"\x00" + GOOD[at + 10 :]
    assert examine(data) == "(0028,0010) VR US: a length of 3 bytes is not a multiple of 2"


@pytest.mark.parametrize("cut", [140, 300, 600])
def test_a_file_cut_inside_the_header_is_truncated(cut):
    assert examine(GOOD[:cut]).startswith("truncated: ")


def test_a_file_cut_inside_the_pixel_data_says_how_much_is_missing():
    reason = examine(GOOD[:-100])
    assert reason.startswith("truncated: Pixel Data (7FE0,0010) declares 4000 bytes but the file ends after 3900")


def test_an_image_whose_pixel_data_tag_is_damaged_has_no_pixel_data():
    """Found by fuzzing: (7FE0,0010) -> (7FE0,0012) and a damaged Media Storage SOP Class UID."""
    at = GOOD.rindex(b"\xe0\x7f\x10\x00OW")
    data = GOOD[:at] + b"\xe0\x7f\x12\x00" + GOOD[at + 4 :]
    data = data.replace(b"1.2.840.10008.5.1.4.1.1.1\x00", b"1.2.840.10008.5*1.4.1.1.1\x00", 1)
    assert examine(data) == f"truncated: the file ends after {len(GOOD)} bytes, before Pixel Data (7FE0,0010)"


def test_an_empty_file_is_an_empty_file():
    assert examine(b"") == "empty file (0 bytes): not a DICOM Part 10 file"
    assert examine(b"x" * 200) == "not a DICOM Part 10 file (no 'DICM' prefix after the 128-byte preamble)"


def test_no_message_tells_the_user_to_force_pydicom():
    for data in (b"", b"x" * 200, GOOD[:131], GOOD[:140]):
        assert "force" not in examine(data)


def test_a_value_dicom_json_cannot_carry_is_named():
    at = element(GOOD, 0x00281050, b"DS")  # Window Center '16000.0' -> '#6000.0': pydicom keeps it as text
    data = GOOD[: at + 8] + b"#" + GOOD[at + 9 :]
    assert examine(data) == (
        "header cannot be written as DICOM JSON: (0028,1050) VR DS holds a value DICOM JSON cannot carry: ValueError"
    )


def test_elements_out_of_order_or_twice_are_named():
    at = element(GOOD, 0x00200010, b"SH")  # StudyID -> (0020,0001): below the tags before it
    data = GOOD[:at] + struct.pack("<HH", 0x0020, 0x0001) + GOOD[at + 4 :]
    assert examine(data) == "data elements out of order: (0020,0001) comes after (0020,000E)"


def unclosed_sequence() -> bytes:
    ds = dataset()
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "T-D3000", "SRT", "Chest"
    ds.AnatomicRegionSequence = [item]
    ds["AnatomicRegionSequence"].is_undefined_length = True  # closed by a sequence delimiter, which goes missing
    data = written(ds)
    delimiter = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    assert data.count(delimiter) == 1
    return data.replace(delimiter, b"")


def test_an_unclosed_sequence_is_named():
    reason = examine(unclosed_sequence())
    assert reason == "sequence (0008,2218) is not closed: found (0010,0010) where an item should start"


def nested(depth: int) -> Dataset:
    ds = dataset()
    item = Dataset()
    item.CodeValue = "x"
    for _ in range(depth - 1):
        outer = Dataset()
        outer.ContentSequence = [item]
        item = outer
    ds.ContentSequence = [item]
    return ds


def test_sequences_nested_deeper_than_the_limit_are_named_not_a_recursion_error():
    assert examine(written(nested(MAX_SEQUENCE_DEPTH))) == ""
    reason = examine(written(nested(200)))
    assert reason == f"sequences nested deeper than {MAX_SEQUENCE_DEPTH} levels (at (0040,A730))"


def test_an_undefined_length_on_a_text_element_is_named():
    at = element(GOOD, 0x00080070, b"LO")  # Manufacturer: LO has a 2-byte length, make it UT with 0xFFFFFFFF
    end = at + 8 + struct.unpack("<H", GOOD[at + 6 : at + 8])[0]
    data = GOOD[:at] + b"\x08\x00\x70\x00UT\x00\x00\xff\xff\xff\xff" + GOOD[end:]
    assert examine(data) == "(0008,0070) VR UT has an undefined length (only sequences may)"


def test_too_many_elements_is_named():
    """Private groups 7001, 7003, ... (each a creator and 240 short elements), placed before the pixel data."""
    filler = bytearray()
    for n in range(MAX_ELEMENTS // 240 + 1):
        group = 0x7001 + 2 * n
        filler += struct.pack("<HH2sH", group, 0x0010, b"LO", 4) + b"FUZZ"
        for i in range(240):
            filler += struct.pack("<HH2sH", group, 0x1000 + i, b"US", 2) + b"\x01\x00"
    pixels = GOOD.index(b"\xe0\x7f\x10\x00OW")
    assert examine(GOOD[:pixels] + filler[: 12 + 240 * 10] + GOOD[pixels:]) == ""
    assert examine(GOOD[:pixels] + bytes(filler) + GOOD[pixels:]) == (
        f"header too large: more than {MAX_ELEMENTS} data elements"
    )


# -- 13.3: can the filed file be read? ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("uid", "reason"),
    [
        ("1.2.3.4.5.6.7", "unknown transfer syntax '1.2.3.4.5.6.7' (0002,0010)"),
        ("garbage!", "invalid TransferSyntaxUID (0002,0010) 'garbage!': not a DICOM UID"),
        ("", "no TransferSyntaxUID (0002,0010) in the file meta information"),
        (
            "1.2.840.10008.1.2.4.100",
            "transfer syntax 'MPEG2 Main Profile / Main Level': pydicom has no decoder for its pixel data",
        ),
    ],
)
def test_unknown_or_unusable_transfer_syntaxes_are_named(uid, reason):
    ds = dataset()
    ds.file_meta.TransferSyntaxUID = uid
    data = encode_as_explicit(ds)
    assert examine(data) == reason


def with_syntax(data: bytes, syntax: str) -> bytes:
    """The same bytes with another TransferSyntaxUID in the file meta (what a careless writer does)."""
    at = data.index(b"\x02\x00\x10\x00UI")
    length = struct.unpack("<H", data[at + 6 : at + 8])[0]
    new = str(syntax).encode()
    new += b"\x00" * (len(new) % 2)
    meta_length = struct.unpack("<L", data[140:144])[0] + len(new) - length
    data = data[: at + 6] + struct.pack("<H", len(new)) + new + data[at + 8 + length :]
    return data[:140] + struct.pack("<L", meta_length) + data[144:]


def encode_as_explicit(ds: Dataset) -> bytes:
    """The file meta says the data set's syntax, the data set is explicit VR little endian."""
    syntax = ds.file_meta.TransferSyntaxUID
    return with_syntax(written(ds, "1.2.840.10008.1.2.1"), syntax)


@pytest.mark.parametrize("syntax", [JPEGBaseline8Bit, RLELossless, JPEG2000Lossless])
def test_compressed_syntax_with_plain_pixel_data_is_named(syntax):
    ds = dataset()
    ds.file_meta.TransferSyntaxUID = syntax
    assert examine(encode_as_explicit(ds)) == (
        f"Pixel Data (7FE0,0010) is not encapsulated but transfer syntax {syntax.name!r} is compressed"
    )


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless])
def test_compressed_files_are_accepted_and_read_back(syntax):
    ds = dataset()
    ds.compress(syntax)
    data = encode(ds)
    assert examine(data) == ""
    readable(data)


def test_encapsulated_fragments_that_do_not_match_their_syntax_are_named():
    ds = dataset()
    ds.compress(RLELossless)
    data = encode(ds)
    assert examine(with_syntax(data, JPEG2000Lossless)).startswith(  # RLE bytes claimed to be JPEG 2000
        "Pixel Data (7FE0,0010) of transfer syntax 'JPEG 2000 Image Compression (Lossless Only)' does not start"
    )
    offsets_at = data.index(b"\xfe\xff\x00\xe0", data.index(b"\xe0\x7f\x10\x00"))
    offsets_end = offsets_at + 8 + struct.unpack("<L", data[offsets_at + 4 : offsets_at + 8])[0]
    only_offsets = data[:offsets_end]
    only_offsets += b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    assert examine(only_offsets) == "encapsulated Pixel Data (7FE0,0010) holds no fragment (only an offset table)"
    assert examine(data[:-8]) == "truncated: encapsulated Pixel Data (7FE0,0010) has no sequence delimiter"


@pytest.mark.parametrize(
    ("syntax", "rows", "reason"),
    [
        (RLELossless, 41, "its first frame does not decode to Rows x Columns x Samples"),
        (RLELossless, 12072, "its first frame (4210 bytes) cannot decode to 1207200 bytes"),
        (JPEG2000Lossless, 41, "holds a 50 x 40 image of 1 sample(s); the header says 50 x 41 of 1"),
    ],
)
def test_compressed_pixels_that_do_not_match_rows_and_columns_are_named(syntax, rows, reason):
    """What flipped bits did in a fuzz run: pydicom reads the header, then pixel_array fails."""
    ds = dataset()
    ds.compress(syntax)
    ds.Rows = rows
    separator = ": " if syntax == RLELossless else " "
    assert examine(encode(ds)) == f"Pixel Data (7FE0,0010) of transfer syntax {syntax.name!r}{separator}{reason}"


def test_an_rle_stream_that_makes_a_decoder_panic_is_named_not_a_crash():
    """Found by fuzzing: one flipped bit in an RLE segment makes pylibjpeg-rle (Rust) panic, and a panic is a
    BaseException that no `except Exception` (the loader's last line of defence) catches."""
    ds = dataset()
    ds.compress(RLELossless)
    data = bytearray(encode(ds))
    fragment = data.rindex(b"\xfe\xff\x00\xe0") + 8
    data[fragment + 204] ^= 0x80
    assert examine(bytes(data)) == (
        "Pixel Data (7FE0,0010) of transfer syntax 'RLE Lossless': its first frame does not decode to "
        "Rows x Columns x Samples"
    )


REAL_COMPRESSED = [  # public test files of pydicom-data (no patient data), one per codec family
    "SC_rgb_jpeg_dcmtk.dcm",
    "JPGExtended.dcm",
    "JPEG-LL.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "JPEG2000.dcm",
    "MR_small_RLE.dcm",
    "SC_rgb_rle.dcm",
    "image_dfl.dcm",
]


@pytest.mark.parametrize("name", REAL_COMPRESSED)
def test_real_compressed_files_are_accepted_and_a_wrong_rows_is_named(name):
    from pydicom.data import get_testdata_file

    data = Path(get_testdata_file(name)).read_bytes()
    header = read_header(io.BytesIO(data), len(data))
    readable(data)
    if header.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian:
        return
    at = element(data, 0x00280010, b"US")
    wrong = data[: at + 8] + struct.pack("<H", int(header.Rows) + 1) + data[at + 10 :]
    with pytest.raises(ImageRejected, match=r"^Pixel Data \(7FE0,0010\) of transfer syntax .*(the header says|decode)"):
        read_header(io.BytesIO(wrong), len(wrong))


def test_native_pixel_data_must_hold_every_pixel():
    ds = dataset()
    ds.Rows = ds.Rows + 1
    assert examine(written(ds)) == (
        "Pixel Data (7FE0,0010) holds 4000 bytes; Rows x Columns x Samples x Bits x Frames needs 4100"
    )


def test_image_pixel_attributes_pydicom_cannot_use_are_named():
    ds = dataset()
    ds.BitsStored = 17  # more than Bits Allocated
    assert examine(written(ds)).startswith("Image Pixel attributes (0028,xxxx) do not describe the pixel data: ")
    ds = dataset()
    del ds.PhotometricInterpretation
    assert "(0028,0004) 'Photometric Interpretation'" in examine(written(ds))


def test_a_data_set_in_another_vr_encoding_than_its_syntax_is_named():
    data = with_syntax(written(dataset(), ImplicitVRLittleEndian), "1.2.840.10008.1.2.1")
    assert examine(data) == (
        "the data set is encoded in implicit VR, not as transfer syntax 'Explicit VR Little Endian' says"
    )


@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian])
def test_every_native_encoding_reads(syntax):
    ds = dataset("CT")
    data = written(ds, syntax)
    assert examine(data) == ""
    readable(data)
    whole = read_image(io.BytesIO(data), len(data))
    assert whole.PixelData == ds.PixelData and whole.PatientID == "Covid1"


# -- 10.1: deflated files -----------------------------------------------------------------------------------
def test_a_deflated_file_is_read_through_its_inflated_data_set():
    ds = dataset("MR")
    data = written(ds, DeflatedExplicitVRLittleEndian)
    header = read_header(io.BytesIO(data), len(data))
    assert image_facts(header).sop == SOP and image_facts(header).folder == "mri"
    assert "PixelData" not in header
    assert examine(data[:-30]) == "truncated: the deflated data set ends before its deflate stream does"


def test_the_loader_files_a_deflated_image_that_reads_back(store, tmp_path):
    """Through both stores: the S3 reader fetches ranges, and inflating reads the whole object through it."""
    configure(store)
    put_clinical(store, "Covid1")
    ds = dataset("CT")
    store.write("raw-site/2020-04-01/images/deflated.dcm", written(ds, DeflatedExplicitVRLittleEndian))
    catalog = Catalog(tmp_path / "catalog.sqlite")
    try:
        report = load(store, catalog, workers=1)
    finally:
        catalog.close()
    assert report.counts == {"filed": 2}, report.items
    key = next(k for k in listing(store) if k.endswith(".dcm") and not k.startswith("raw-"))
    assert key == f"training/ct/Covid1/{STUDY}/{SERIES}/{SOP}.dcm"
    filed = pydicom.dcmread(io.BytesIO(store.read(key)))
    assert filed.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    assert (filed.pixel_array == ds.pixel_array).all()
    meta = Dataset.from_json(store.read(dicom_metadata_key(key)).decode())
    assert meta.PatientID == "Covid1" and meta.Rows == ds.Rows and "PixelData" not in meta


def test_a_deflated_file_whose_pixels_are_short_is_named():
    ds = dataset("CT")
    ds.PixelData = ds.PixelData[:-200]
    reason = examine(written(ds, DeflatedExplicitVRLittleEndian))
    assert reason.startswith("Pixel Data (7FE0,0010) holds 1050 bytes; "), reason


def test_a_deflate_bomb_is_refused_at_the_limit(monkeypatch):
    data = written(dataset("CT"), DeflatedExplicitVRLittleEndian)
    meta_end = data.index(b"1.2.840.10008.1.2.1.99") + 22
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    bomb = deflater.compress(b"\x00" * (8 * 1024**2)) + deflater.flush()
    monkeypatch.setattr(dicom, "MAX_INFLATED_BYTES", 4 * 1024**2)
    assert examine(data[:meta_end] + bomb) == "deflated data set inflates to more than 4 MiB"
    assert examine(data[:meta_end] + b"\xff" * 64).startswith("deflated data set cannot be inflated (zlib: ")


# -- 13.4: memory bounded, large values listed ---------------------------------------------------------------
TEN_MB_TEXT = dataset()
TEN_MB_TEXT.add_new(0x00204000, "LT", "x" * 10240)  # Image Comments: kept (10 KB)
TEN_MB_TEXT.add_new(0x00181030, "LO", "protocol")
TEN_MB_TEXT.private_block(0x0029, "SITE NOTES", create=True).add_new(0x10, "UT", "note " * 2_000_000)  # 10 MB


@pytest.mark.parametrize("bounded", [True, False])
def test_a_ten_megabyte_text_is_left_out_of_the_metadata_and_listed(bounded):
    data = written(TEN_MB_TEXT)
    header = read_header(io.BytesIO(data), len(data), bounded=bounded)
    assert ((0x00291010 in header) is not bounded) and ((0x00291010 in dicom.omitted_elements(header)) is bounded)
    doc = json.loads(metadata_json(header))
    assert len(json.dumps(doc)) < 40_000
    meta = Dataset.from_json(doc)
    omitted = meta.private_block(dicom.OMITTED_GROUP, OMITTED_CREATOR)
    assert omitted[0x01].VR == "AT" and omitted[0x01].value == 0x00291010
    assert meta.ImageComments == "x" * 10240 and meta.ProtocolName == "protocol"
    assert "PixelData" not in meta


def test_an_identifier_too_long_to_read_is_named():
    ds = dataset()
    ds.PatientID = "Covid1" * 20000  # 120 KB
    assert examine(written(ds)) == "PatientID (0010,0020) is 120000 bytes long: not an identifier"
    assert examine(written(ds), bounded=False).startswith("PatientID (0010,0020) is not a pseudonym")


def test_by_default_every_value_is_read_for_the_site_gate():
    ds = dataset()
    ds.private_block(0x0029, "SITE", create=True).add_new(0x10, "OB", b"SMITH^JOHN " * 200)  # 2.2 KB binary
    ds.TextValue = "Patient John Smith " * 5000  # (0040,A160) UT: 95 KB of text
    data = written(ds)
    whole = read_header(io.BytesIO(data), len(data))
    assert whole[0x00291010].value.startswith(b"SMITH^JOHN") and whole.TextValue.startswith("Patient John")
    assert dicom.omitted_elements(whole) == {}
    bounded = read_header(io.BytesIO(data), len(data), bounded=True)
    assert 0x00291010 not in bounded and "TextValue" not in bounded
    assert sorted(dicom.omitted_elements(bounded)) == [0x00291010, 0x0040A160]


def test_a_header_with_more_values_than_the_budget_is_refused():
    ds = dataset()
    block = ds.private_block(0x0029, "BIG", create=True)
    for i in range(140):  # 140 x 60 KB = 8.4 MB of values, each under the large-value threshold
        block.add_new(0x10 + i, "UT", "y" * 60_000)
    assert examine(written(ds)) == "header too large: more than 8 MiB of values before Pixel Data"
    assert examine(written(ds), bounded=False) == ""  # the site reads its own files whole


# -- properties: whatever the bytes, one reason or a readable file -----------------------------------------
SEEDS = {name: written(dataset(modality)) for name, modality in (("cr", "CR"), ("ct", "CT"), ("mr", "MR"))}
SEEDS["rle"] = encode((lambda d: (d.compress(RLELossless), d)[1])(dataset("DX")))
SEEDS["deflated"] = written(dataset("CT"), DeflatedExplicitVRLittleEndian)


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(header_mutants(SEEDS))
def test_any_mutant_is_one_named_reason_or_a_file_pydicom_reads_with_its_pixels(data):
    reason = examine(data)  # raises if anything but ImageRejected escapes
    assert examine(data, bounded=False) == reason  # small headers: both modes agree
    try:  # the site node's reader: the whole object, the same structural checks
        read_image(io.BytesIO(data), len(data))
    except ImageRejected as exc:
        assert exc.reason and "\n" not in exc.reason
    if reason:
        assert "\n" not in reason and reason.strip() == reason and "force=True" not in reason
        return
    readable(data)
    header = read_header(io.BytesIO(data), len(data))
    Dataset.from_json(metadata_json(header))


@settings(max_examples=100, deadline=None, database=None)
@given(st.binary(max_size=600))
def test_arbitrary_bytes_after_a_preamble_are_one_named_reason(tail):
    data = b"\x00" * 128 + b"DICM" + tail
    assert examine(data) != ""
    try:
        read_image(io.BytesIO(data), len(data))
    except ImageRejected as exc:
        assert exc.reason
