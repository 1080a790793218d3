"""Decoding what X-ray archives contain, and refusing what is not an image."""

import io

import numpy as np
import pytest
from PIL import Image

from covidray.imaging.recipe import (IMAGENET_MEAN, IMAGENET_STD, INPUT_SIZE, normalize,
                                     preprocess, to_input_pixels)
from covidray.imaging.pixels import DecodeError
from covidray.imaging.decode import decode_xray


def encoded(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def gradient(width=300, height=260) -> np.ndarray:
    return np.tile(np.linspace(0, 255, width, dtype=np.float64), (height, 1))


def test_16_bit_grayscale_is_windowed_to_full_8_bit_range():
    wide = (1000 + gradient() * 10).astype(np.uint16)  # values 1000..3550 of 65535
    image = decode_xray(encoded(Image.fromarray(wide)))
    values = np.asarray(image)
    assert image.mode == "L"
    assert values.min() == 0 and values.max() == 255


def test_rgba_is_composited_over_black():
    rgba = np.zeros((40, 40, 4), dtype=np.uint8)
    rgba[..., :3] = 200
    rgba[:, :20, 3] = 255  # left half opaque, right half transparent
    values = np.asarray(decode_xray(encoded(Image.fromarray(rgba, "RGBA"))))
    assert values[:, :20].min() == 200 and values[:, 20:].max() == 0


@pytest.mark.parametrize("mode,fmt", [("RGB", "JPEG"), ("L", "JPEG"), ("P", "PNG"), ("L", "PNG"),
                                      ("RGB", "TIFF"), ("L", "BMP")])
def test_common_formats_decode_to_8_bit_gray(mode, fmt):
    image = Image.fromarray(gradient().astype(np.uint8)).convert(mode)
    decoded = decode_xray(encoded(image, fmt))
    assert decoded.mode == "L" and decoded.size == (300, 260)
    assert abs(float(np.asarray(decoded).mean()) - 127.5) < 3


def test_truncated_jpeg_is_refused_with_reason():
    data = encoded(Image.fromarray(gradient().astype(np.uint8)), "JPEG")
    with pytest.raises(DecodeError, match="truncated"):
        decode_xray(data[: len(data) // 2])


def test_empty_file_is_refused_with_reason():
    with pytest.raises(DecodeError, match="empty file"):
        decode_xray(b"")


def test_text_file_is_refused_with_reason():
    with pytest.raises(DecodeError, match="not an image"):
        decode_xray(b"just some text, named .png")


def test_input_pixels_resize_shorter_side_and_centre_crop():
    array = np.zeros((300, 600), dtype=np.uint8)
    array[:, 150:450] = 255  # the centre square survives the crop
    pixels = to_input_pixels(Image.fromarray(array))
    assert pixels.shape == (INPUT_SIZE, INPUT_SIZE) and pixels.dtype == np.uint8
    assert pixels[:, 2:-2].min() == 255


def test_normalize_repeats_gray_and_applies_imagenet_statistics():
    pixels = np.zeros((2, INPUT_SIZE, INPUT_SIZE), dtype=np.uint8)
    pixels[1] = 255
    x = normalize(pixels)
    assert x.shape == (2, 3, INPUT_SIZE, INPUT_SIZE) and x.dtype == np.float32
    for channel in range(3):
        assert x[0, channel, 0, 0] == pytest.approx(-IMAGENET_MEAN[channel] / IMAGENET_STD[channel])
        assert x[1, channel, 5, 5] == pytest.approx((1 - IMAGENET_MEAN[channel]) / IMAGENET_STD[channel])


def test_preprocess_is_decode_then_pixels_then_normalize():
    data = encoded(Image.fromarray(gradient().astype(np.uint8)), "PNG")
    assert np.array_equal(preprocess(data), normalize(to_input_pixels(decode_xray(data))))


def test_16_bit_window_rounds_exactly():
    values = np.array([[1000, 1001, 1002, 3000]], dtype=np.uint16).repeat(4, axis=0)
    out = np.asarray(decode_xray(encoded(Image.fromarray(values))))[0]
    expected = np.floor((values[0].astype(float) - 1000) * 255 / 2000 + 0.5).astype(np.uint8)
    assert out.tolist() == expected.tolist()


@pytest.mark.parametrize("size,reason", [((1, 60000), "aspect ratio"),
                                         ((7000, 7000), "image too large")])
def test_images_that_would_take_unbounded_memory_are_refused_from_the_header(size, reason):
    """A tiny file may claim a huge or absurdly thin image: refused before decoding."""
    import resource

    data = encoded(Image.new("L", size, 0))
    assert len(data) < 200_000
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(DecodeError, match=reason):
        decode_xray(data)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 100
