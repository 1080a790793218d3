"""DICOM chest X-rays -> the 8-bit grayscale image the one recipe starts from, plus the
identity and acquisition tags that travel with each prediction.

The steps follow the DICOM standard's display pipeline (PS3.3 C.11): stored values
(``BitsStored`` and ``PixelRepresentation`` respected by pydicom) -> modality rescale
(slope / intercept or a Modality LUT) -> VOI: the VOI LUT, else the first window
centre / width (linear), else the min-max window that 16-bit PNGs get -> MONOCHROME1
inverted (so bone is bright in every image) -> 8-bit. Compressed transfer syntaxes
(JPEG 2000, JPEG lossless / baseline, JPEG-LS, RLE) decode through the pylibjpeg plugins
or GDCM. Anything else -- another photometric interpretation, no pixel data, several
frames, a transfer syntax no installed decoder reads -- raises
:class:`~covidray.imaging.pixels.DecodeError` with the reason, which lands in the errors table.

Patient identifiers (name, ID, birth date) are never read into outputs.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from covidray.imaging.pixels import DecodeError, check_dimensions, min_max_to_8bit

# Columns every loaded row carries (empty for files without the tag, or not DICOM).
DICOM_COLUMNS = ("study_uid", "sop_uid", "view_position", "modality", "manufacturer")
_TAGS = {"study_uid": "StudyInstanceUID", "sop_uid": "SOPInstanceUID",
         "view_position": "ViewPosition", "modality": "Modality", "manufacturer": "Manufacturer"}
MONOCHROME = ("MONOCHROME1", "MONOCHROME2")


def is_dicom(data: bytes) -> bool:
    """A DICOM Part 10 file: 128-byte preamble, then ``DICM``."""
    return len(data) >= 132 and data[128:132] == b"DICM"


def dicom_pixels(data: bytes) -> int:
    """Rows x Columns of a DICOM file, read from its header (its pixel data skipped)."""
    import pydicom

    dataset = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    return int(dataset.get("Rows", 0) or 0) * int(dataset.get("Columns", 0) or 0)


def read_dicom(data: bytes) -> tuple[Image.Image, dict]:
    """DICOM Part 10 bytes -> (8-bit ``L`` image, ``{column: value}`` for :data:`DICOM_COLUMNS`,
    with ``bit_depth`` (BitsStored) and ``photometric``)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        dataset = pydicom.dcmread(io.BytesIO(data))
    except (InvalidDicomError, EOFError, ValueError, OSError, KeyError) as exc:
        raise DecodeError(f"unreadable DICOM file: {exc}") from None
    tags = {column: str(dataset.get(keyword, "") or "").strip()
            for column, keyword in _TAGS.items()}
    if "PixelData" not in dataset:
        raise DecodeError("DICOM file has no pixel data (PixelData missing)")
    photometric = str(dataset.get("PhotometricInterpretation", "")).strip()
    if photometric not in MONOCHROME:
        raise DecodeError(f"unsupported DICOM photometric interpretation '{photometric or 'none'}'"
                          " (covidray reads MONOCHROME1 and MONOCHROME2 X-rays)")
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise DecodeError(f"multi-frame DICOM ({frames} frames): one radiograph per file expected")
    check_dimensions(int(dataset.get("Columns", 0)), int(dataset.get("Rows", 0)))
    try:
        stored = dataset.pixel_array
    except Exception as exc:  # no decoder for the transfer syntax, or corrupt pixel data
        syntax = dataset.file_meta.get("TransferSyntaxUID", "unknown")
        name = getattr(syntax, "name", str(syntax))
        raise DecodeError(f"cannot decode DICOM pixel data ({name}): "
                          f"{type(exc).__name__}: {exc}") from None
    tags.update(bit_depth=int(dataset.get("BitsStored", 0) or 0), photometric=photometric)
    return _display(stored, dataset, photometric == "MONOCHROME1"), tags


def _display(stored: np.ndarray, dataset, monochrome1: bool) -> Image.Image:
    from pydicom.pixels import apply_voi_lut

    values = _modality(stored, dataset)
    if "VOILUTSequence" in dataset:
        values = apply_voi_lut(values, dataset, prefer_lut=True)
    elif "WindowCenter" in dataset and "WindowWidth" in dataset:
        return Image.fromarray(_linear_window(values, dataset, monochrome1))
    if monochrome1:  # inverted before the min-max window: exactly the MONOCHROME2 image
        values = _invert(values)
    return min_max_to_8bit(values)


def _modality(stored: np.ndarray, dataset) -> np.ndarray:
    """Modality rescale; integer when it is a whole shift (no float copy of 16-bit data)."""
    if "ModalityLUTSequence" in dataset:
        from pydicom.pixels import apply_modality_lut

        return apply_modality_lut(stored, dataset)
    slope = float(dataset.get("RescaleSlope", 1) or 1)
    intercept = float(dataset.get("RescaleIntercept", 0) or 0)
    if slope == 1 and intercept.is_integer():
        return stored.astype(np.int32) + np.int32(intercept) if intercept else stored
    return stored.astype(np.float32) * np.float32(slope) + np.float32(intercept)


def _first(value) -> float:
    return float(value[0] if isinstance(value, (list, tuple)) or hasattr(value, "__len__")
                 and not isinstance(value, str) else value)


def _linear_window(values: np.ndarray, dataset, monochrome1: bool) -> np.ndarray:
    """DICOM's linear VOI function (PS3.3 C.11.2.1.2.1) onto 0..255, in float32."""
    centre, width = _first(dataset.WindowCenter), max(1.0, _first(dataset.WindowWidth))
    scaled = (values.astype(np.float32) - np.float32(centre - 0.5)) / np.float32(width - 1) + 0.5
    np.clip(scaled, 0.0, 1.0, out=scaled)
    if monochrome1:
        scaled = 1.0 - scaled
    return np.round(scaled * 255.0).astype(np.uint8)


def _invert(values: np.ndarray) -> np.ndarray:
    lo, hi = values.min(), values.max()
    if np.issubdtype(values.dtype, np.integer):
        return (values.astype(np.int64 if values.itemsize > 2 else np.int32) * -1) + (int(lo) + int(hi))
    return (lo + hi) - values
