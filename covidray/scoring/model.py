"""The model a scoring run applies, read once on the driver: its bytes, which model it is,
the threshold it is applied at (and where that came from), and the reference profile its
inputs are compared with (:mod:`covidray.drift`)."""

from __future__ import annotations

from dataclasses import dataclass

from covidray.layout import drift_reference_beside, model_card_beside
from covidray.storage.location import StorageError
from covidray.model_card import model_digest, scoring_threshold
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


def model_to_score(storage: Storage, model_uri: str, given_threshold: float | None
                   ) -> ModelToScore:
    """The model at ``model_uri`` and its threshold (``given_threshold``, else its card's,
    else its training default) and drift reference; a bad model or a card of another model
    fails here, before any work."""
    if not storage.exists(model_uri):
        raise StorageError(f"model '{model_uri}' not found: run `covidray export` first or "
                           "fix --model")
    data = storage.read_bytes(model_uri)
    metadata = OnnxScorer(data, model_uri).metadata  # loaded once: a bad model fails now
    card_uri = model_card_beside(model_uri)
    card = storage.read_json(card_uri) if storage.exists(card_uri) else None
    digest = model_digest(data)
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
