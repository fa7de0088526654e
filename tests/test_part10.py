"""The outbox writer against pydicom's: the same bytes, for every kind of object the node and `site deid` write."""

from __future__ import annotations

import copy
import io
import random

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRBigEndian, ImplicitVRLittleEndian, JPEG2000Lossless, RLELossless

from nccid.site.deid import DeidKeys, deidentify
from nccid.site.outbox import write_part10
from nccid.site.vault import PseudonymKey
from nccid.synth.hospital import hospital_patient, pacs_image

KEYS = DeidKeys.derive(PseudonymKey.generate().key)


def _as_sent(ds: pydicom.Dataset, syntax=None) -> pydicom.Dataset:
    """Read back from bytes, as the node and `site deid` get it: elements undecoded until touched."""
    if syntax is not None:
        ds = copy.deepcopy(ds)
        if syntax.is_compressed:
            ds.compress(syntax, encoding_plugin="pylibjpeg" if syntax == JPEG2000Lossless else None)
        else:
            ds.file_meta.TransferSyntaxUID = syntax
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buffer.getvalue()))


def _both(ds: pydicom.Dataset) -> tuple[bytes, bytes]:
    ours, theirs = io.BytesIO(), io.BytesIO()
    write_part10(copy.deepcopy(ds), ours)
    pydicom.dcmwrite(theirs, copy.deepcopy(ds), enforce_file_format=True)
    return ours.getvalue(), theirs.getvalue()


@pytest.mark.parametrize("modality", ["CT", "MR", "CR", "DX"])
@pytest.mark.parametrize("syntax", [None, ImplicitVRLittleEndian, RLELossless, ExplicitVRBigEndian])
def test_a_de_identified_image_is_written_byte_for_byte_as_pydicom_writes_it(modality, syntax):
    person = hospital_patient(random.Random(7))
    sent = _as_sent(pacs_image(person, random.Random(3), modality=modality, scale=0.1), syntax)
    clean = deidentify(sent, pseudonym="Covid42", person="cipher", keys=KEYS)
    ours, theirs = _both(clean)
    assert ours == theirs
    back = pydicom.dcmread(io.BytesIO(ours))
    assert back.PatientID == "Covid42" and back.file_meta.MediaStorageSOPInstanceUID == clean.SOPInstanceUID
    assert np.array_equal(back.pixel_array, sent.pixel_array)


def test_an_untouched_file_and_one_with_decoded_values_are_written_as_pydicom_writes_them():
    person = hospital_patient(random.Random(8))
    sent = _as_sent(pacs_image(person, random.Random(4), scale=0.1))
    assert _both(sent)[0] == _both(sent)[1]  # every element still raw
    sent.PatientName, sent.Rows = "SOMEONE^ELSE", sent.Rows  # decoded and changed values go through pydicom
    sent.PixelData = bytes(sent.PixelData)
    ours, theirs = _both(sent)
    assert ours == theirs


def test_compressed_pixel_data_passes_through_and_the_data_sets_own_meta_is_untouched():
    person = hospital_patient(random.Random(9))
    sent = _as_sent(pacs_image(person, random.Random(5), modality="CR", scale=0.1), JPEG2000Lossless)
    clean = deidentify(sent, pseudonym="Covid7", person="cipher", keys=KEYS)
    meta_before = copy.deepcopy(clean.file_meta)
    clean.file_meta.MediaStorageSOPInstanceUID = "1.2.3"  # stale: the writer must take the data set's own UID
    ours, theirs = _both(clean)
    assert ours == theirs
    assert pydicom.dcmread(io.BytesIO(ours)).file_meta.MediaStorageSOPInstanceUID == clean.SOPInstanceUID
    assert clean.file_meta.MediaStorageSOPInstanceUID == "1.2.3" and meta_before.TransferSyntaxUID == JPEG2000Lossless
