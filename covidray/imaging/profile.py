"""What an image looked like to the model: the per-image statistics that ride in every scored
row, so that a scoring run can say whether its inputs still look like the validation data
(:mod:`covidray.drift`) without a second pass over the images.

From the file: its size and bit depth, and its photometric interpretation (DICOM's tag, or
the PNG/JPEG/TIFF mode). From the model input (the recipe's ``uint8[224, 224]``): the mean,
spread and percentiles of its intensity and the share of it near black or near white (a
proxy for collimation, borders and burnt-in regions). All computed from one 256-bin
histogram of the 224x224 input: microseconds beside the decode.
"""

from __future__ import annotations

import numpy as np

INPUT_STATISTICS = ("input_mean", "input_std", "input_p05", "input_p50", "input_p95",
                    "near_black", "near_white")
FILE_NUMBERS = ("width", "height", "bit_depth")
NUMBERS = (*FILE_NUMBERS, *INPUT_STATISTICS)  # float columns, NaN where the image failed
PROFILE_COLUMNS = [*NUMBERS, "photometric"]  # what loading an image adds to its row
NEAR_BLACK, NEAR_WHITE = 10, 245  # 8-bit input values at or beyond which a pixel counts

_BIT_DEPTH = {"1": 1, "L": 8, "LA": 8, "P": 8, "PA": 8, "RGB": 8, "RGBA": 8, "CMYK": 8,
              "YCbCr": 8, "I;16": 16, "I;16B": 16, "I;16L": 16, "I": 32, "F": 32}


def picture_bit_depth(mode: str) -> int:
    """Bits per sample of a PIL image mode (0 where unknown)."""
    return _BIT_DEPTH.get(mode, 0)


def input_statistics(pixels: np.ndarray) -> dict[str, float]:
    """The :data:`INPUT_STATISTICS` of one model input ``uint8[224, 224]``."""
    counts = np.bincount(pixels.ravel(), minlength=256).astype(np.float64)
    total = counts.sum()
    values = np.arange(256, dtype=np.float64)
    mean = float((counts * values).sum() / total)
    spread = float(np.sqrt(max(0.0, (counts * (values - mean) ** 2).sum() / total)))
    cumulative = np.cumsum(counts) / total
    p05, p50, p95 = (float(np.searchsorted(cumulative, q)) for q in (0.05, 0.5, 0.95))
    return {"input_mean": mean, "input_std": spread, "input_p05": p05, "input_p50": p50,
            "input_p95": p95, "near_black": float(cumulative[NEAR_BLACK]),
            "near_white": float(counts[NEAR_WHITE:].sum() / total)}


def image_profile(width: int, height: int, bit_depth: int, photometric: str,
                  pixels: np.ndarray) -> dict:
    """Every :data:`PROFILE_COLUMNS` value of one loaded image."""
    return {"width": float(width), "height": float(height), "bit_depth": float(bit_depth),
            "photometric": photometric, **input_statistics(pixels)}


def empty_profile() -> dict:
    """The profile of a row that did not load: no numbers, no photometric."""
    return {**dict.fromkeys(NUMBERS, np.nan), "photometric": ""}
