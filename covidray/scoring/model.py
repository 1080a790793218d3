"""The model a scoring run applies, read once on the driver: its bytes, which model it is,
the threshold it is applied at (and where that came from), and the reference profile its
inputs are compared with (:mod:`covidray.drift`)."""

from __future__ import annotations

from dataclasses import dataclass

from covidray.layout import drift_reference_beside, model_card_beside
from covidray.storage.location import StorageError
from covidray.model_card import SITE_CARD_KIND, StaleModelCard, model_digest, scoring_threshold
from covidray.onnx_runtime import OnnxScorer
from covidray.storage import Storage


@dataclass(frozen=True)
class ModelToScore:
    """The model a run scores with: the ONNX file's bytes (read once by the driver; Ray hands
    them to every actor), where it came from, which model it is, the threshold it is
    applied at (and where that came from), and the reference profile its inputs are
    compared with (None, and why, where there is none for this model)."""

    uri: str
    data: bytes
    digest: str  # model_digest(data), hashed once (the file is tens of MB)
    threshold: float
    threshold_source: str
    reference: dict | None = None
    no_reference: str = ""
    calibration: dict | None = None  # the site card's map (None: no site card)


def model_to_score(storage: Storage, model_uri: str, given_threshold: float | None,
                   site_card_uri: str | None = None) -> ModelToScore:
    """The model at ``model_uri`` and its threshold (``given_threshold``, else its card's,
    else its training default) and drift reference; with ``site_card_uri``, the site's
    threshold, calibration map and reference instead. A bad model, or a card of another
    model, fails here, before any work."""
    if not storage.exists(model_uri):
        raise StorageError(f"model '{model_uri}' not found: run `covidray export` first or "
                           "fix --model")
    data = storage.read_bytes(model_uri)
    metadata = OnnxScorer(data, model_uri).metadata  # loaded once: a bad model fails now
    digest = model_digest(data)
    if site_card_uri:
        return _at_site(storage, model_uri, data, digest, given_threshold, site_card_uri)
    card_uri = model_card_beside(model_uri)
    card = storage.read_json(card_uri) if storage.exists(card_uri) else None
    threshold, source = scoring_threshold(given_threshold, card, metadata, digest, card_uri)
    reference_uri = drift_reference_beside(model_uri)
    reference = storage.read_json(reference_uri) if storage.exists(reference_uri) else None
    why = ""
    if reference is None:
        why = f"drift not checked: no {reference_uri} (written by `covidray evaluate`)"
    elif reference.get("model_digest") != digest:
        reference, why = None, (f"drift not checked: {reference_uri} describes another model "
                                "(run `covidray evaluate` for this one)")
    return ModelToScore(model_uri, data, digest, threshold, source, reference, why)


def _at_site(storage: Storage, model_uri: str, data: bytes, digest: str,
             given_threshold: float | None, site_card_uri: str) -> ModelToScore:
    """The model as a site adopted it: its site card's threshold, map and reference."""
    if given_threshold is not None:
        raise ValueError("--threshold and --site-card both set the operating threshold: give "
                         "one (the site card's was chosen on the site's labelled sample)")
    if not storage.exists(site_card_uri):
        raise StorageError(f"site card '{site_card_uri}' not found: write it with `covidray "
                           "calibrate` or fix --site-card")
    card = storage.read_json(site_card_uri)
    if card.get("kind") != SITE_CARD_KIND:
        raise ValueError(f"'{site_card_uri}' is not a site card (written by `covidray "
                         "calibrate`)")
    if card["model_digest"] != digest:
        raise StaleModelCard(
            f"{site_card_uri} is the site card of another model (digest "
            f"{card['model_digest']}, made with {card['model']}); {model_uri} is {digest}. "
            f"Score with the model it was made with, or run `covidray calibrate` for this one")
    point = card["operating_point"]
    reference_uri = card.get("drift_reference", "")
    reference = storage.read_json(reference_uri) if storage.exists(reference_uri) else None
    why = "" if reference else f"drift not checked: no {reference_uri} (the site's reference)"
    return ModelToScore(model_uri, data, digest, float(point["threshold"]),
                        f"site card {site_card_uri} of {card['site']} ({point['how']})",
                        reference, why, card["calibration"]["map"])
