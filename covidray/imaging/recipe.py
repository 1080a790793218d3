"""The one preprocessing recipe: X-ray file bytes -> the model's input.

Training, export (parity inputs and the recipe stored in the ONNX metadata) and
scoring all call these functions and nothing else, so an image is preprocessed
identically everywhere (``test_training_export_and_scoring_preprocess_identically`` in
``tests/test_export.py`` proves it).

The recipe has two halves so that the expensive part can stream as compact uint8:
  1. :func:`to_input_pixels`: decode to 8-bit grayscale, resize the shorter side to
     224 (bilinear), centre-crop 224x224  -> ``uint8[224, 224]``;
  2. :func:`normalize` (a :class:`Recipe`): the contrast window (none in the paper), scale
     to [0, 1], repeat to 3 channels, the backbone's mean/std -> ``float32[N, 3, 224, 224]``.
     Each backbone's recipe comes from :func:`covidray.model.recipe_for`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from covidray.imaging.decode import decode_xray, to_8bit_gray

INPUT_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RECIPE_NAME = "covidray-grayscale-v1"
# How normalize() sets each image's contrast before the backbone's mean/std:
#   none: as decoded (the paper);
#   percentile: per image, the 1st..99th percentile of its pixels stretched to 0..255;
#   equalize: per image, histogram equalisation (its pixel ranks, 0..255).
# Both erase global scanner contrast, which differs by hospital and so by label here.
WINDOWS = ("none", "percentile", "equalize")


@dataclass(frozen=True)
class Recipe:
    """The second half of preprocessing, as a value: contrast window, then the backbone's
    ImageNet mean/std. Stored in every exported model (:meth:`describe`); scoring rebuilds it
    from there (:meth:`from_description`), so a model is always fed as it was trained."""

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    window: str = "none"

    def __post_init__(self):
        if self.window not in WINDOWS:
            raise ValueError(f"window must be one of {WINDOWS}, not '{self.window}'")

    def describe(self) -> dict:
        described = {
            "name": RECIPE_NAME,
            "decode": "8-bit grayscale (16-bit: min-max window; alpha: over black)",
            "resize": f"shorter side to {INPUT_SIZE}, bilinear",
            "crop": f"center {INPUT_SIZE}x{INPUT_SIZE}",
            "channels": 3,
            "scale": "1/255",
            "mean": [float(m) for m in self.mean],
            "std": [float(s) for s in self.std],
            "layout": "NCHW float32",
        }
        if self.window != "none":  # a model of the paper's recipe describes it as before
            described["window"] = self.window
        return described

    @classmethod
    def from_description(cls, described: dict, model_uri: str = "the model") -> "Recipe":
        """The recipe a model's metadata describes; refuses one this covidray cannot apply."""
        window = described.get("window", "none")
        recipe = cls(tuple(described.get("mean", ())), tuple(described.get("std", ())),
                     window if window in WINDOWS else "none")
        if described != recipe.describe():
            raise ValueError(f"'{model_uri}' was trained with preprocessing {described}, which "
                             f"this covidray ({RECIPE_NAME}, windows {', '.join(WINDOWS)}) "
                             "cannot apply: re-export or upgrade")
        return recipe

    def normalize(self, pixels: np.ndarray) -> np.ndarray:
        """``uint8[N, 224, 224]`` (or one ``[224, 224]``) -> ``float32[N, 3, 224, 224]``."""
        pixels = np.asarray(pixels)
        if pixels.ndim == 2:
            pixels = pixels[None]
        scaled = contrast_window(pixels, self.window)[:, None, :, :]
        mean = np.asarray(self.mean, dtype=np.float32).reshape(1, 3, 1, 1)
        std = np.asarray(self.std, dtype=np.float32).reshape(1, 3, 1, 1)
        return np.ascontiguousarray((np.repeat(scaled, 3, axis=1) - mean) / std,
                                    dtype=np.float32)


def contrast_window(pixels: np.ndarray, window: str) -> np.ndarray:
    """``uint8[N, H, W]`` -> ``float32[N, H, W]`` in [0, 1] under ``window`` (see WINDOWS)."""
    values = pixels.astype(np.float32)
    if window == "none" or not len(values):
        return values / np.float32(255.0)
    flat = values.reshape(len(values), -1)
    if window == "percentile":
        low, high = np.percentile(flat, [1, 99], axis=1, keepdims=True)
        stretched = (flat - low) / np.maximum(high - low, 1.0)
        return np.clip(stretched, 0, 1).reshape(values.shape).astype(np.float32)
    # equalize: each pixel's share of the image at or below its value (the histogram's CDF)
    out = np.empty_like(flat)
    for i, row in enumerate(pixels.reshape(len(pixels), -1)):
        cdf = np.cumsum(np.bincount(row, minlength=256)).astype(np.float32)
        low = cdf[row.min()]
        out[i] = (cdf[row] - low) / max(cdf[-1] - low, 1.0)
    return out.reshape(values.shape)


# The paper's recipe (ResNet18, ImageNet mean/std, no window): what models made before the
# registry were trained with.
PAPER_RECIPE = Recipe()
RECIPE = PAPER_RECIPE.describe()

def resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    scale = size / min(width, height)
    new_size = (max(size, round(width * scale)), max(size, round(height * scale)))
    if new_size == image.size:
        return image
    return image.resize(new_size, Image.Resampling.BILINEAR)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    left, top = (width - size) // 2, (height - size) // 2
    return image.crop((left, top, left + size, top + size))


def to_input_pixels(image: Image.Image) -> np.ndarray:
    """An 8-bit grayscale image -> ``uint8[224, 224]`` (resize shorter side, centre crop)."""
    if image.mode != "L":
        image = to_8bit_gray(image)
    image = center_crop(resize_shorter_side(image, INPUT_SIZE), INPUT_SIZE)
    return np.asarray(image, dtype=np.uint8)


def normalize(pixels: np.ndarray, recipe: Recipe = PAPER_RECIPE) -> np.ndarray:
    """``uint8[N, 224, 224]`` (or one ``[224, 224]``) -> ``float32[N, 3, 224, 224]``."""
    return recipe.normalize(pixels)


def preprocess(data: bytes, recipe: Recipe = PAPER_RECIPE) -> np.ndarray:
    """File bytes -> ``float32[1, 3, 224, 224]``: the whole recipe for one image."""
    return recipe.normalize(to_input_pixels(decode_xray(data)))


def model_inputs(batch: dict, recipe: Recipe = PAPER_RECIPE) -> tuple[np.ndarray, np.ndarray]:
    """A loaded batch -> (inputs for the rows that loaded, their mask).

    The single place where streamed rows become model input, for training and scoring:
    normalised ``float32[M, 3, 224, 224]`` images, or, for a batch of cached backbone
    features (frozen-backbone training), those ``float32[M, F]`` features.
    """
    ok = np.asarray(batch["error"]) == ""
    if "features" in batch:
        return np.ascontiguousarray(np.asarray(batch["features"], dtype=np.float32)[ok]), ok
    return recipe.normalize(np.asarray(batch["pixels"])[ok]), ok
