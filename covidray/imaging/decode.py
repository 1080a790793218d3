"""X-ray file bytes -> an 8-bit grayscale picture: DICOM (:mod:`.dicom`), PNG, JPEG, TIFF
or BMP at 8 or 16 bits, gray, RGB, RGBA or palette; with the file's tags and bit depth.
Every failure is a :class:`~covidray.imaging.pixels.DecodeError` that says why."""

from __future__ import annotations

import io

from PIL import Image, ImageChops, ImageFile, UnidentifiedImageError

from covidray.imaging.dicom import DICOM_COLUMNS, dicom_pixels, is_dicom, read_dicom
from covidray.imaging.pixels import DecodeError, check_dimensions, window_rows
from covidray.imaging.profile import picture_bit_depth

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom")

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
    return to_8bit_gray(image), image.mode


HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I", "F")


def to_8bit_gray(image: Image.Image) -> Image.Image:
    """Any decoded picture -> 8-bit ``L``, holding at most one more 8-bit plane of it at a
    time beside the decoded image: high bit depths windowed min..max a strip at a time;
    transparency composited over black as gray x alpha (never a second RGBA copy)."""
    if image.mode in HIGH_BIT_MODES:
        lo, hi = image.getextrema()
        width = image.width
        return window_rows(lambda top, bottom: image.crop((0, top, width, bottom)),
                           (image.height, width), lo, hi)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode == "PA":
        image = image.convert("LA")
    if image.mode in ("RGBA", "LA"):
        return ImageChops.multiply(image.convert("L"), image.getchannel("A"))
    return image if image.mode == "L" else image.convert("L")
