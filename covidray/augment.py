"""Augmentation with the Augmentor library, repeatable per image.

Augmentor draws from Python's and NumPy's global random state, so each image is
augmented under its own seed derived from (run seed, image URI, copy number), one image at
a time in a process (loading augments a batch in threads, which would otherwise draw from
each other's seeds): the same run gives the same images whatever worker, batch or thread
an image lands in.

Augmentation runs on the decoded image downscaled to a working size (Augmentor costs
~60 ms on a 1024 px image and ~5 ms at 256 px); :func:`covidray.imaging.recipe.to_input_pixels`
then brings the result to the model's input, exactly as for an unaugmented image.
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass

import numpy as np
from PIL import Image

from covidray.config import option, seeded_hash, validate
from covidray.imaging.recipe import INPUT_SIZE, resize_shorter_side

WORKING_SIZE = 256  # shorter side while augmenting
_GLOBAL_RANDOM = threading.Lock()  # held while an image is augmented under its own seed


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and strengths of each Augmentor operation (0 disables one); the
    defaults are the paper's: rotation, horizontal and vertical flips, random resized crop."""

    rotate_probability: float = option(0.7, "augmentation: probability of a rotation",
                                       bounds=(0, 1))
    max_rotation_degrees: int = option(10, "augmentation: largest rotation, degrees",
                                       bounds=(0, 25))
    flip_horizontal_probability: float = option(0.5, "augmentation: probability of a "
                                                     "horizontal flip", bounds=(0, 1))
    flip_vertical_probability: float = option(0.5, "augmentation: probability of a vertical "
                                                   "flip", bounds=(0, 1))
    crop_probability: float = option(0.5, "augmentation: probability of a random resized crop",
                                     bounds=(0, 1))
    crop_area: float = option(0.85, "augmentation: the crop keeps this fraction of the area",
                              bounds=(0.1, 1))
    distortion_probability: float = option(0.3, "augmentation: probability of a small elastic "
                                                "distortion", bounds=(0, 1))
    distortion_magnitude: int = option(2, "augmentation: strength of that distortion",
                                       bounds=(1, None))

    def __post_init__(self):
        validate(self)


def image_seed(seed: int, uri: str, copy: int) -> int:
    """The seed of one augmented copy of one image."""
    return seeded_hash(seed, f"{uri}:{copy}")


class Augmenter:
    """``augmenter(image, uri, copy)`` -> augmented PIL image, deterministic for its arguments."""

    def __init__(self, config: AugmentConfig, seed: int):
        import Augmentor

        self.config = config
        self.seed = seed
        pipeline = Augmentor.Pipeline()
        c = config
        if c.rotate_probability > 0:
            pipeline.rotate(c.rotate_probability, c.max_rotation_degrees, c.max_rotation_degrees)
        if c.flip_horizontal_probability > 0:
            pipeline.flip_left_right(c.flip_horizontal_probability)
        if c.flip_vertical_probability > 0:
            pipeline.flip_top_bottom(c.flip_vertical_probability)
        if c.crop_probability > 0:
            pipeline.crop_random(c.crop_probability, c.crop_area)
        if c.distortion_probability > 0:
            pipeline.random_distortion(c.distortion_probability, 4, 4, c.distortion_magnitude)
        self._transform = pipeline.torch_transform()

    def __call__(self, image: Image.Image, uri: str, copy: int) -> Image.Image:
        seed = image_seed(self.seed, uri, copy)
        working = resize_shorter_side(image, max(WORKING_SIZE, INPUT_SIZE)) \
            if min(image.size) > WORKING_SIZE else image
        with _GLOBAL_RANDOM:
            py_state, np_state = random.getstate(), np.random.get_state()
            random.seed(seed)
            np.random.seed(seed % (2**32))
            try:
                return self._transform(working)
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)
