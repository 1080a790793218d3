"""Which view an X-ray is: the model is trained on frontal (PA/AP) chest X-rays and must not
score a lateral one as if it were frontal.

The DICOM ``ViewPosition`` tag decides (PA, AP -> frontal; LL, RL, LATERAL -> lateral).
Without the tag (a DICOM file that lacks it, or a PNG/JPEG) the image itself is checked:
a frontal chest X-ray is roughly left-right symmetric, so an image whose two halves do
not mirror each other (:data:`FRONTAL_SYMMETRY_MIN`) is flagged. That check is weak --
on 300 real frontal images of ``../shared/data/cxr`` about 1% fall below it -- so it only
flags; tagged laterals are what ``views="frontal"`` skips.
"""

from __future__ import annotations

import numpy as np

FRONTAL = frozenset({"PA", "AP", "APS", "AP SUPINE", "PA ERECT", "AP ERECT"})
LATERAL = frozenset({"LL", "RL", "LAT", "LATERAL", "LLD", "RLD"})
VIEW_POLICIES = ("frontal", "all")  # frontal: tagged laterals go to errors; all: score them too
FRONTAL_SYMMETRY_MIN = 0.0


def lr_symmetry(pixels: np.ndarray) -> float:
    """Correlation of the left half of a ``uint8[224, 224]`` image with its mirrored right half."""
    size = pixels.shape[1]
    margin, middle = size // 14, size // 2
    left = pixels[margin:-margin, margin:middle].astype(np.float32)
    right = pixels[margin:-margin, middle:size - margin][:, ::-1].astype(np.float32)
    left -= left.mean()
    right -= right.mean()
    denominator = float(np.sqrt((left * left).sum() * (right * right).sum()))
    return float((left * right).sum()) / denominator if denominator > 0 else 0.0


def view_check(view_position: str, pixels: np.ndarray) -> tuple[bool, str]:
    """``(lateral, note)``: ``lateral`` when the tag says so; ``note`` is ``""`` for an image
    taken as frontal, else why it is not (reported in the ``view_check`` column)."""
    tag = (view_position or "").strip().upper()
    if tag in LATERAL:
        return True, f"lateral view (ViewPosition {tag})"
    if tag in FRONTAL:
        return False, ""
    if tag:
        return False, f"unrecognised ViewPosition '{tag}': scored as frontal"
    symmetry = lr_symmetry(pixels)
    if symmetry < FRONTAL_SYMMETRY_MIN:
        return False, (f"no ViewPosition and not frontal-looking (left-right symmetry "
                       f"{symmetry:.2f} < {FRONTAL_SYMMETRY_MIN})")
    return False, ""
