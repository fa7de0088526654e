"""Synthetic chest DICOM: CR/DX radiographs, CT and MR series, and the odd object the warehouse must refuse.

Pixels come from the real, public test images that `pydicom-data` ships (a chest CR, a CT slice, an MR slice),
resampled to realistic sizes and varied per image by cheap integer operations, so that output runs at tens
of MB/s. Headers are written from scratch: nothing of the templates' headers is carried over.
"""

from __future__ import annotations

import functools
import hashlib
import io
from dataclasses import dataclass

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian

CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
SC_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"

DEVICES = {
    "CR": [("FUJIFILM Corporation", "FCR PROFECT"), ("Agfa", "CR 85-X"), ("Carestream Health", "DRX-Revolution")],
    "DX": [
        ("Philips Medical Systems", "DigitalDiagnost"),
        ("SIEMENS", "Fluorospot Compact FD"),
        ("GE Healthcare", "Optima XR220amx"),
    ],
    "CT": [
        ("GE MEDICAL SYSTEMS", "Revolution CT"),
        ("SIEMENS", "SOMATOM Definition AS"),
        ("TOSHIBA", "Aquilion ONE"),
        ("Philips", "Ingenuity CT"),
    ],
    "MR": [("SIEMENS", "Avanto"), ("GE MEDICAL SYSTEMS", "SIGNA Artist")],
}
#: radiograph detector formats (rows, columns), around 2000 x 2500
XRAY_SIZES = [(2500, 2048), (2446, 2010), (2560, 2140), (2336, 1950), (2048, 2500)]


def synthetic_uid(*parts: object) -> str:
    """A deterministic UID in the 2.25 (UUID-derived) form, unique per `parts`."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:16]
    return f"2.25.{int.from_bytes(digest, 'big')}"


@functools.cache
def _template(name: str) -> np.ndarray:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    if path is None:  # pragma: no cover - depends on pydicom-data being installed
        raise RuntimeError(f"pydicom-data template {name} not found: pip install pydicom-data")
    return pydicom.dcmread(path).pixel_array


def _resample(image: np.ndarray, rows: int, cols: int) -> np.ndarray:
    r = (np.arange(rows) * image.shape[0] // rows).astype(np.intp)
    c = (np.arange(cols) * image.shape[1] // cols).astype(np.intp)
    return image[np.ix_(r, c)]


@functools.cache
def xray_base(rows: int, cols: int) -> np.ndarray:
    """The real chest CR (MONOCHROME1, 15 bits) resampled to a detector size."""
    return _resample(_template("RG1_UNCR.dcm"), rows, cols).astype(np.uint16)


@functools.cache
def ct_base(size: int) -> np.ndarray:
    """pydicom's real CT slice (signed 16-bit) resampled to `size` x `size`, cached: every synthetic CT starts
    from it. Raises RuntimeError when pydicom-data is not installed."""
    return _resample(_template("693_UNCR.dcm"), size, size).astype(np.int16)


@functools.cache
def mr_base(size: int) -> np.ndarray:
    """pydicom's real MR slice (unsigned 16-bit) resampled to `size` x `size`, cached: every synthetic MR starts
    from it. Raises RuntimeError when pydicom-data is not installed."""
    return _resample(_template("MR2_UNCR.dcm"), size, size).astype(np.uint16)


@dataclass(frozen=True)
class Subject:
    """What a DICOM header says of the patient and study (already pseudonymised for the raw layout)."""

    patient_id: str
    patient_name: str
    sex: str  # 'M' / 'F' / ''
    age_years: int | None
    study_uid: str
    study_date: str  # YYYYMMDD
    accession: str = ""


def _base_dataset(
    subject: Subject,
    sop_class: str,
    sop_uid: str,
    series_uid: str,
    modality: str,
    series_number: int,
    instance_number: int,
    device: tuple[str, str],
) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = subject.study_date
    ds.SeriesDate = subject.study_date
    ds.StudyTime = "101500"
    ds.AccessionNumber = subject.accession
    ds.Modality = modality
    ds.Manufacturer, ds.ManufacturerModelName = device
    ds.PatientName = subject.patient_name
    ds.PatientID = subject.patient_id
    ds.PatientSex = subject.sex
    if subject.age_years is not None:
        ds.PatientAge = f"{subject.age_years:03d}Y"
    ds.BodyPartExamined = "CHEST"
    ds.PatientIdentityRemoved = "YES"
    ds.StudyInstanceUID = subject.study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance_number
    return ds


def _set_pixels(ds: Dataset, pixels: np.ndarray, photometric: str, bits_stored: int, signed: bool) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.PixelData = pixels.tobytes()


def encode(ds: Dataset) -> bytes:
    """The data set as the bytes of a DICOM Part 10 file (preamble, DICM, file meta), as a store would hold it."""
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


#: default strength of the planted sign of disease: enough for a logistic regression on 16 x 16 downsampled
#: pixels to tell positives from negatives on held-out patients (AUC about 0.85-0.9), not perfectly
DEFAULT_SIGNAL = 1.0
#: where the opacities go, as fractions of (rows, columns) of the template: the lower zones (rows) and the
#: periphery of each lung (columns; the template's lungs span about 0.2-0.45 and 0.55-0.8)
_LOWER_ZONE = (0.52, 0.74)
_PERIPHERY = ((0.2, 0.33), (0.67, 0.8))


def _seeded(*parts: str) -> np.random.Generator:
    return np.random.default_rng(int.from_bytes(hashlib.sha256("/".join(parts).encode()).digest()[:8], "big"))


def vary_patient(pixels: np.ndarray, seed: str) -> np.ndarray:
    """Between-patient variation of one template radiograph, so that images differ as people and exposures do:
    a zoom of +/-8 % and a shift of +/-4 % (body size and positioning), a contrast and brightness change, and a
    smooth uneven exposure. Deterministic by `seed`, from its own generator. Returns a new uint16 array."""
    rng = _seeded("patient", seed)
    rows, cols = pixels.shape
    zoom = rng.uniform(0.92, 1.08)
    r = ((np.arange(rows) - rows / 2) / zoom + rows / 2 + rng.uniform(-0.04, 0.04) * rows).astype(np.intp)
    c = ((np.arange(cols) - cols / 2) / zoom + cols / 2 + rng.uniform(-0.04, 0.04) * cols).astype(np.intp)
    moved = pixels[np.ix_(np.clip(r, 0, rows - 1), np.clip(c, 0, cols - 1))].astype(np.float32)
    coarse = rng.normal(0.0, 700.0, (4, 4)).astype(np.float32)
    field = np.kron(coarse, np.ones((-(-rows // 4), -(-cols // 4)), dtype=np.float32))[:rows, :cols]
    varied = moved * np.float32(rng.uniform(0.85, 1.15)) + field
    return np.clip(varied, 0, 32767).astype(np.uint16)


def plant_opacities(pixels: np.ndarray, strength: float, seed: str) -> np.ndarray:
    """Patchy peripheral lower-zone opacities, the commonest radiographic sign of COVID-19 pneumonia.

    A few (2-7) soft blobs per image, on one or both sides, of varying extent, each textured by smooth noise
    so that the shadow is patchy rather than a clean disc. In a MONOCHROME1 image a denser (whiter) region has
    lower values, so the blobs are subtracted. `strength` scales the depth (0: no change; 1.0, the default, is
    a faint shadow beside the between-patient variation of `vary_patient`). The blobs are drawn at 1/8
    resolution and enlarged, so the cost is small beside encoding. Deterministic by `seed` (the SOP Instance
    UID, say), drawn from its own generator so that the other random streams of a synthetic dataset do not
    change. Returns a new array.
    """
    if strength <= 0:
        return pixels
    rng = _seeded("opacities", seed)
    rows, cols = pixels.shape
    small_r, small_c = max(4, -(-rows // 8)), max(4, -(-cols // 8))
    yy, xx = np.mgrid[0:small_r, 0:small_c]
    yy, xx = yy / small_r, xx / small_c
    shadow = np.zeros((small_r, small_c))
    sides = [0, 1] if rng.random() < 0.6 else [int(rng.integers(2))]
    for _ in range(int(rng.integers(2, 8))):
        low, high = _PERIPHERY[sides[int(rng.integers(len(sides)))]]
        cy, cx = rng.uniform(*_LOWER_ZONE), rng.uniform(low, high)
        sy, sx = rng.uniform(0.03, 0.08), rng.uniform(0.025, 0.06)
        shadow += rng.uniform(0.5, 1.0) * np.exp(-(((yy - cy) / sy) ** 2 + ((xx - cx) / sx) ** 2) / 2)
    texture = rng.normal(0.0, 1.0, (small_r, small_c))
    texture = (texture + np.roll(texture, 1, 0) + np.roll(texture, 1, 1) + np.roll(texture, (1, 1), (0, 1))) / 4
    shadow = np.clip(shadow, 0, 1.2) * np.clip(1 + 0.6 * texture, 0.2, 1.8)
    big = np.kron(shadow, np.ones((8, 8)))[:rows, :cols]
    depth = (2600.0 * strength) * big.astype(np.float32)
    grain = big > 0.05  # a fine grain inside the shadow only (drawing it everywhere would cost 5x more)
    depth[grain] += rng.normal(0, 60.0 * strength, int(grain.sum())).astype(np.float32)
    return np.clip(pixels.astype(np.float32) - depth, 0, 32767).astype(np.uint16)


def xray(
    subject: Subject,
    rng: np.random.Generator,
    *,
    modality: str = "CR",
    scale: float = 1.0,
    series_uid: str,
    sop_uid: str,
    instance_number: int = 1,
    signal: float = 0.0,
) -> Dataset:
    """One CR or DX chest radiograph; with `signal` > 0, carrying planted opacities (see `plant_opacities`)."""
    rows, cols = XRAY_SIZES[int(rng.integers(len(XRAY_SIZES)))]
    rows, cols = max(16, int(rows * scale)), max(16, int(cols * scale))
    pixels = plant_opacities(vary_patient(xray_base(rows, cols), sop_uid), signal, sop_uid)
    if rng.random() < 0.5:
        pixels = pixels[:, ::-1]
    pixels = np.clip(pixels.astype(np.int32) + int(rng.integers(-600, 600)), 0, 32767).astype(np.uint16)
    devices = DEVICES[modality]
    ds = _base_dataset(
        subject,
        CR_STORAGE if modality == "CR" else DX_STORAGE,
        sop_uid,
        series_uid,
        modality,
        1,
        instance_number,
        devices[int(rng.integers(len(devices)))],
    )
    ds.ViewPosition = "PA" if rng.random() < 0.6 else "AP"
    ds.ImagerPixelSpacing = [0.15 / scale, 0.15 / scale]
    ds.WindowCenter, ds.WindowWidth = 16000, 30000
    _set_pixels(ds, np.ascontiguousarray(pixels), "MONOCHROME1", 15, signed=False)
    return ds


def ct_slices(
    subject: Subject, rng: np.random.Generator, *, slices: int, scale: float = 1.0, series_uid: str, uid_seed: str
) -> list[Dataset]:
    """A synthetic axial CT series of `slices` slices for `subject` (in HU, 512 x 512 at scale 1), each with its
    own SOP UID derived from `uid_seed`: the same `rng` state and `uid_seed` always make the same series."""
    size = max(16, int(512 * scale))
    base = ct_base(size)
    devices = DEVICES["CT"]
    device = devices[int(rng.integers(len(devices)))]
    thickness = float(rng.choice([1.0, 1.25, 2.5, 5.0]))
    out = []
    for i in range(slices):
        shift = int(8 * np.sin(i / max(slices, 1) * np.pi) * scale)
        pixels = np.roll(base, shift, axis=0) + np.int16(int(rng.integers(-20, 20)))
        sop = synthetic_uid(uid_seed, "ct", i)
        ds = _base_dataset(subject, CT_STORAGE, sop, series_uid, "CT", 2, i + 1, device)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SliceThickness = thickness
        ds.ImagePositionPatient = [-175.0, -175.0, -thickness * i]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [0.68 / scale, 0.68 / scale]
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.WindowCenter, ds.WindowWidth = -600, 1500
        _set_pixels(ds, pixels, "MONOCHROME2", 16, signed=True)
        out.append(ds)
    return out


def mr_slices(
    subject: Subject, rng: np.random.Generator, *, slices: int, scale: float = 1.0, series_uid: str, uid_seed: str
) -> list[Dataset]:
    """A synthetic MR series of `slices` slices for `subject` (256 x 256 at scale 1), each with its own SOP UID
    derived from `uid_seed`: the same `rng` state and `uid_seed` always make the same series."""
    size = max(16, int(256 * scale))
    base = mr_base(size)
    devices = DEVICES["MR"]
    device = devices[int(rng.integers(len(devices)))]
    out = []
    for i in range(slices):
        pixels = np.roll(base, i % 7, axis=1)
        sop = synthetic_uid(uid_seed, "mr", i)
        ds = _base_dataset(subject, MR_STORAGE, sop, series_uid, "MR", 3, i + 1, device)
        ds.ScanningSequence, ds.SequenceVariant = "SE", "NONE"
        ds.SliceThickness = 6.0
        ds.ImagePositionPatient = [-200.0, -200.0, -6.0 * i]
        ds.PixelSpacing = [1.56 / scale, 1.56 / scale]
        _set_pixels(ds, pixels, "MONOCHROME2", 12, signed=False)
        out.append(ds)
    return out


def structured_report(subject: Subject, *, series_uid: str, sop_uid: str) -> Dataset:
    """A Basic Text SR: no pixels, not an image the warehouse files."""
    ds = _base_dataset(subject, BASIC_TEXT_SR, sop_uid, series_uid, "SR", 90, 1, ("nccid", "synth"))
    ds.ValueType = "CONTAINER"
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    return ds


def secondary_capture(subject: Subject, *, series_uid: str, sop_uid: str) -> Dataset:
    """An OT secondary capture (a screenshot-like object): refused by the warehouse."""
    ds = _base_dataset(subject, SC_STORAGE, sop_uid, series_uid, "OT", 91, 1, ("nccid", "synth"))
    ds.ConversionType = "WSD"
    _set_pixels(ds, np.zeros((64, 64), dtype=np.uint16), "MONOCHROME2", 12, signed=False)
    return ds
