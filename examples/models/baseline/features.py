"""The baseline's features: a radiograph downsampled to 16 x 16 block means, standardised per image and made
left-right symmetric (the side of a shadow does not matter, and films are sometimes flipped). Shared by
train.py (on the host) and predict.py (in the sandbox); needs numpy and pydicom only."""

from __future__ import annotations

import numpy as np
import pydicom

GRID = 16


def image_features(path) -> np.ndarray:
    """128 numbers from one DICOM radiograph (raises pydicom's errors on an unreadable file)."""
    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array.astype(np.float32)
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        pixels = pixels.max() - pixels  # higher = denser (whiter), whatever the photometric interpretation
    if min(pixels.shape) < GRID:
        factor = -(-GRID // min(pixels.shape))
        pixels = np.kron(pixels, np.ones((factor, factor), dtype=np.float32))
    rows, cols = (pixels.shape[0] // GRID) * GRID, (pixels.shape[1] // GRID) * GRID
    blocks = pixels[:rows, :cols].reshape(GRID, rows // GRID, GRID, cols // GRID).mean(axis=(1, 3))
    blocks = (blocks - blocks.mean()) / (blocks.std() + 1e-6)
    symmetric = (blocks + blocks[:, ::-1]) / 2
    return symmetric[:, : GRID // 2].ravel()
