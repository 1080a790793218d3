"""The one preprocessing recipe: X-ray file bytes -> the model's input.

Training, export (parity inputs and the recipe stored in the ONNX metadata) and
scoring all call these functions and nothing else, so an image is preprocessed
identically everywhere (``test_training_export_and_scoring_preprocess_identically`` in
``tests/test_pipeline.py`` proves it).

The recipe has two halves so that the expensive part can stream as compact uint8:
  1. :func:`to_input_pixels`: decode to 8-bit grayscale, resize the shorter side to
     224 (bilinear), centre-crop 224x224  -> ``uint8[224, 224]``;
  2. :func:`normalize`: scale to [0, 1], repeat to 3 channels, ImageNet mean/std
     -> ``float32[N, 3, 224, 224]``.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from covidray.dicom import DICOM_COLUMNS, dicom_pixels, is_dicom, read_dicom
from covidray.pixels import DecodeError, check_dimensions, min_max_to_8bit
from covidray.profile import picture_bit_depth

INPUT_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom")
# Stored in every exported model; scoring refuses a model whose recipe differs.
RECIPE = {
    "name": "covidray-grayscale-v1",
    "decode": "8-bit grayscale (16-bit: min-max window; alpha: over black)",
    "resize": f"shorter side to {INPUT_SIZE}, bilinear",
    "crop": f"center {INPUT_SIZE}x{INPUT_SIZE}",
    "channels": 3,
    "scale": "1/255",
    "mean": list(IMAGENET_MEAN),
    "std": list(IMAGENET_STD),
    "layout": "NCHW float32",
}

# A truncated file must fail loudly, never be silently padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False


def decode_xray(data: bytes) -> Image.Image:
    """Decode DICOM or PNG/JPEG/TIFF/BMP bytes (8/16-bit gray, RGB, RGBA, palette) to an
    8-bit ``L`` image."""
    return decode_with_tags(data)[0]


def declared_pixels(data: bytes) -> int:
    """How many pixels the file says it holds, from its header alone (0 where the header
    cannot be read: decoding then says why)."""
    try:
        if is_dicom(data):
            return dicom_pixels(data)
        width, height = Image.open(io.BytesIO(data)).size
        return width * height
    except Exception:
        return 0


def decode_with_tags(data: bytes) -> tuple[Image.Image, dict]:
    """:func:`decode_xray`, with the DICOM tags of :data:`DICOM_COLUMNS` (empty strings for
    other formats), the file's ``bit_depth`` and its ``photometric`` interpretation (DICOM's,
    else the PIL mode it was stored in)."""
    if not data:
        raise DecodeError("empty file (0 bytes)")
    if is_dicom(data):
        return read_dicom(data)
    image, mode = _decode_picture(data)
    return image, {**dict.fromkeys(DICOM_COLUMNS, ""), "bit_depth": picture_bit_depth(mode),
                   "photometric": mode}


def _decode_picture(data: bytes) -> tuple[Image.Image, str]:
    """Picture bytes -> (8-bit ``L`` image, the mode they were stored in)."""
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
        check_dimensions(*image.size)
        image.load()
    except DecodeError:
        raise
    except UnidentifiedImageError:
        raise DecodeError("not an image: format not recognised") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise DecodeError(f"corrupt or truncated image: {exc}") from None
    except Image.DecompressionBombError as exc:
        raise DecodeError(f"image too large: {exc}") from None
    return _to_8bit_gray(image), image.mode


def _to_8bit_gray(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return min_max_to_8bit(np.asarray(image))
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image if image.mode == "L" else image.convert("L")


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
        image = _to_8bit_gray(image)
    image = center_crop(resize_shorter_side(image, INPUT_SIZE), INPUT_SIZE)
    return np.asarray(image, dtype=np.uint8)


_MEAN = np.asarray(IMAGENET_MEAN, dtype=np.float32).reshape(1, 3, 1, 1)
_STD = np.asarray(IMAGENET_STD, dtype=np.float32).reshape(1, 3, 1, 1)


def normalize(pixels: np.ndarray) -> np.ndarray:
    """``uint8[N, 224, 224]`` (or one ``[224, 224]``) -> ``float32[N, 3, 224, 224]``."""
    pixels = np.asarray(pixels)
    if pixels.ndim == 2:
        pixels = pixels[None]
    scaled = pixels.astype(np.float32)[:, None, :, :] / np.float32(255.0)
    return np.ascontiguousarray((np.repeat(scaled, 3, axis=1) - _MEAN) / _STD, dtype=np.float32)


def preprocess(data: bytes) -> np.ndarray:
    """File bytes -> ``float32[1, 3, 224, 224]``: the whole recipe for one image."""
    return normalize(to_input_pixels(decode_xray(data)))


def model_inputs(batch: dict) -> tuple[np.ndarray, np.ndarray]:
    """A loaded batch -> (inputs for the rows that loaded, their mask).

    The single place where streamed rows become model input, for training and scoring:
    normalised ``float32[M, 3, 224, 224]`` images, or, for a batch of cached backbone
    features (frozen-backbone training), those ``float32[M, F]`` features.
    """
    ok = np.asarray(batch["error"]) == ""
    if "features" in batch:
        return np.ascontiguousarray(np.asarray(batch["features"], dtype=np.float32)[ok]), ok
    return normalize(np.asarray(batch["pixels"])[ok]), ok
