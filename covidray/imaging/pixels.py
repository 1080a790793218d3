"""Pixel-level pieces shared by the image decoders (:mod:`covidray.imaging.recipe` for PNG, JPEG,
TIFF, BMP; :mod:`covidray.imaging.dicom`): the decode error, the memory bounds checked from a
header, and the min-max window for high-bit-depth data."""

from __future__ import annotations

import threading
from contextlib import contextmanager

import numpy as np
from PIL import Image

# Memory per image is bounded whatever a file claims: hospital detectors give at most
# ~4300x3500 (15 MP); decoding is refused above these, before any pixel is read.
MAX_PIXELS = 40_000_000
MAX_ASPECT_RATIO = 6


# What decoding one pixel can hold at its peak, in bytes: a 4-byte RGBA (or 32-bit) pixel,
# its composite over black and the 8-bit result, with room for numpy's integer window.
PEAK_BYTES_PER_PIXEL = 16
DECODE_BUDGET_BYTES = 700_000_000  # decoded bytes the threads of one task hold at once


class DecodeBudget:
    """The decoded pixels the loading threads of one task may hold at once: a decode
    reserves its image's peak (``PEAK_BYTES_PER_PIXEL`` x pixels, from the header) and waits
    while the others hold the rest. Memory is then bounded by pixels, not by how many
    images a batch holds; an image larger than the whole budget decodes alone."""

    def __init__(self, limit: int = DECODE_BUDGET_BYTES):
        self.limit, self.held = limit, 0
        self._changed = threading.Condition()

    @contextmanager
    def holding(self, pixels: int):
        cost = min(self.limit, pixels * PEAK_BYTES_PER_PIXEL)
        with self._changed:
            self._changed.wait_for(lambda: self.held + cost <= self.limit)
            self.held += cost
        try:
            yield
        finally:
            with self._changed:
                self.held -= cost
                self._changed.notify_all()


class DecodeError(ValueError):
    """The bytes are not a usable image; the message is the reason recorded for it."""


def check_dimensions(width: int, height: int) -> None:
    """Refuse, from the header alone, an image whose decoding would take unbounded memory."""
    if width * height > MAX_PIXELS:
        raise DecodeError(f"image too large: {width}x{height} pixels, more than the "
                          f"{MAX_PIXELS // 1_000_000} MP covidray decodes")
    if max(width, height) > MAX_ASPECT_RATIO * max(1, min(width, height)):
        raise DecodeError(f"not a chest X-ray: {width}x{height} pixels (aspect ratio above "
                          f"{MAX_ASPECT_RATIO}:1)")


WINDOW_ROWS = 256  # rows windowed at once: the arithmetic copies a strip, never the image


def min_max_to_8bit(values: np.ndarray) -> Image.Image:
    """The window for high-bit-depth data without one of its own (16-bit PNGs, DICOM
    without VOI tags): the image's own min..max onto 0..255 (:func:`window_rows`)."""
    integer = np.issubdtype(values.dtype, np.integer)
    lo, hi = (int if integer else float)(values.min()), (int if integer else float)(values.max())
    return window_rows(lambda top, bottom: values[top:bottom], values.shape, lo, hi)


def window_rows(rows, shape: tuple[int, int], lo, hi) -> Image.Image:
    """``lo..hi`` onto 0..255, ``WINDOW_ROWS`` rows at a time (``rows(top, bottom)`` gives
    them), into one 8-bit image: no full-size integer or float copy of the data. Integer
    data in exact integer arithmetic, round((v - lo) * 255 / (hi - lo)) with halves up;
    float data in float32."""
    height, width = shape
    if hi == lo:
        return Image.new("L", (width, height), 0)
    out = np.empty((height, width), dtype=np.uint8)
    for top in range(0, height, WINDOW_ROWS):
        strip = np.asarray(rows(top, min(height, top + WINDOW_ROWS)))
        if np.issubdtype(strip.dtype, np.integer):
            work = strip.astype(np.int64)
            work -= lo
            work *= 510
            work += hi - lo
            work //= 2 * (hi - lo)
        else:
            work = np.round((strip.astype(np.float32) - np.float32(lo))
                            * np.float32(255.0 / (hi - lo)))
        out[top:top + len(strip)] = work
    return Image.fromarray(out)
