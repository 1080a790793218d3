"""From X-ray file bytes to the model's input: decoding (:mod:`.decode`, :mod:`.dicom`,
:mod:`.pixels`), the one preprocessing recipe (:mod:`.recipe`), the view check
(:mod:`.views`), the image's profile (:mod:`.profile`) and the batch loader every Ray Data
pipeline maps (:mod:`.loader`)."""

from covidray.imaging.decode import decode_xray
from covidray.imaging.pixels import DecodeError
from covidray.imaging.recipe import Recipe, preprocess, to_input_pixels

__all__ = ["DecodeError", "Recipe", "decode_xray", "preprocess", "to_input_pixels"]
