"""Synthetic chest-X-ray-like images for demos and tests (no real patient data).

Each image is a dark field with a brighter torso, two darker lung fields, rib arcs and
noise. COVID images add bright, blurred patches in the lower, outer lung fields
(ground-glass-like opacities). The signal is strong enough that a head on random
ResNet18 features learns it in a few epochs, which is all a smoke test needs.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageFilter


def synthetic_xray(covid: bool, rng: np.random.Generator, size: tuple[int, int] = (256, 288)) -> Image.Image:
    width, height = size
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.full((height, width), 25.0, dtype=np.float32)
    torso = (np.abs(xx - width / 2) < width * (0.36 + 0.08 * yy / height))
    image[torso] = 120.0
    lungs = np.zeros_like(image, dtype=bool)
    for side in (-1, 1):
        cx, cy = width / 2 + side * width * 0.18, height * 0.5
        rx, ry = width * rng.uniform(0.12, 0.15), height * rng.uniform(0.28, 0.33)
        lungs |= ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 < 1
    image[lungs] = 55.0
    for rib in range(6):  # faint rib arcs
        arc = np.abs(yy - (height * (0.25 + 0.1 * rib) + 0.002 * (xx - width / 2) ** 2)) < 2.5
        image[arc & torso] += 25.0
    if covid:
        for _ in range(rng.integers(3, 6)):
            side = rng.choice([-1, 1])
            cx = width / 2 + side * width * rng.uniform(0.15, 0.26)
            cy = height * rng.uniform(0.5, 0.72)
            radius = width * rng.uniform(0.05, 0.09)
            blob = np.exp(-(((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * radius ** 2)))
            image += 85.0 * blob * lungs
    image += rng.normal(0, 8, image.shape)
    picture = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    return picture.filter(ImageFilter.GaussianBlur(1.2))


def encode(image: Image.Image, fmt: str) -> bytes:
    """PNG (8-bit), PNG16 (16-bit grayscale) or JPEG bytes of ``image``."""
    buffer = io.BytesIO()
    if fmt == "png16":
        wide = (np.asarray(image, dtype=np.uint16) * 257).astype(np.uint16)
        Image.fromarray(wide).save(buffer, format="PNG")
    elif fmt == "png":
        image.save(buffer, format="PNG")
    else:
        image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def synthetic_dataset(n_covid: int, n_non_covid: int, seed: int):
    """Yield ``(relative_path, label, patient_id, bytes)``; two images per patient, mixed formats."""
    rng = np.random.default_rng(seed)
    formats = ("jpg", "png", "png16")
    for label, count in (("covid", n_covid), ("non_covid", n_non_covid)):
        for i in range(count):
            fmt = formats[i % len(formats)]
            suffix = "png" if fmt.startswith("png") else "jpg"
            data = encode(synthetic_xray(label == "covid", rng), fmt)
            yield f"{label}/{label}-{i:05d}.{suffix}", label, f"{label}-patient-{i // 2:05d}", data
