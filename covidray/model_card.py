"""The model card: what a model is, how it was made and checked, and its operating point.

``covidray evaluate`` writes it beside ``model.onnx`` (MONAI-bundle style); ``covidray
score`` reads the operating threshold from it, so the threshold validated on held-out
data is the one nightly scoring applies.
"""

from __future__ import annotations

import hashlib
import json

import pandas as pd

from covidray.labels import LABELS, POSITIVE_LABEL
from covidray.metrics import POSITIVE_RULE

INTENDED_USE = ("Research and triage support on chest X-rays only: ranks images for review. "
                "Not a diagnostic device; not validated for clinical decisions. Check the "
                "threshold on validation data from the site that uses it.")


SITE_CARD_KIND = "covidray site card"  # a site's card (covidray calibrate), beside its sample


class StaleModelCard(ValueError):
    """The model card beside a model describes another model: its threshold was validated on
    that model's scores, not this one's."""


def model_digest(model_bytes: bytes) -> str:
    """Which model this is: the first 16 hex digits of the SHA-256 of the ``.onnx`` file. The
    model card and the nightly state record it; scoring checks both against it."""
    return hashlib.sha256(model_bytes).hexdigest()[:16]


def data_summary(splits: pd.DataFrame) -> dict:
    """Images per split, label and source (original images, no augmented copies)."""
    originals = splits[splits.get("copy", 0) == 0] if "copy" in splits else splits
    summary = {}
    for (split, source, label), count in originals.groupby(
            ["split", "source", "label"], dropna=False).size().items():
        summary.setdefault(str(split), {}).setdefault(str(source), {})[str(label)] = int(count)
    return summary


def build_model_card(model_uri: str, digest: str, metadata: dict, splits: pd.DataFrame,
                     result: dict) -> dict:
    """The card of the exported model ``model_uri`` (``digest``: its :func:`model_digest`,
    which scoring checks) from its ONNX ``metadata``, the run's ``splits`` and an evaluation
    ``result`` (:func:`covidray.evaluation.evaluate_split`)."""
    operating = result["operating_point"]
    return {
        "model": model_uri,
        "model_digest": digest,
        "architecture": f"{metadata.get('backbone', 'resnet18')}, 2-class head",
        "inputs": {"name": "input", "shape": ["N", 3, 224, 224], "dtype": "float32",
                   "preprocessing": json.loads(metadata["preprocessing"])},
        "outputs": {"logits": ["N", 2], "probabilities": ["N", 2],
                    "classes": list(LABELS), "score": f"probabilities[:, {POSITIVE_LABEL}]"},
        "starting_weights": {"backbone": metadata.get("backbone", "resnet18"),
                             "weights": json.loads(metadata.get("train_config", "{}"))
                             .get("weights"),  # the option: imagenet, none, a file
                             "description": metadata.get("weights"),
                             "source": metadata.get("weights_source"),
                             "sha256": metadata.get("weights_sha256"),
                             "licence": metadata.get("weights_licence")},
        "epochs_trained": metadata.get("epochs_trained"),
        "training_data": data_summary(splits),
        "operating_point": {
            "threshold": operating["threshold"], "rule": POSITIVE_RULE,
            "chosen_on": operating["chosen_on"],
            "how": f"highest threshold whose {operating['chosen_on']} sensitivity reaches "
                   f"{operating['target_sensitivity']}",
            "val": _rates(operating["val"]), "test": _rates(operating["test"])},
        "metrics": {"split": "test", "images": result["test_images"],
                    "roc_auc": result["roc_auc"], "roc_auc_ci95": result["roc_auc_ci95"],
                    "average_precision": result["average_precision"],
                    "paper_thresholds": {k: _rates(v)
                                         for k, v in result["paper_thresholds"].items()},
                    "by_source": result["breakdown"].get("source")},
        "intended_use": INTENDED_USE,
    }


def _rates(entry: dict) -> dict:
    return {k: entry.get(k) for k in ("threshold", "sensitivity", "sensitivity_ci95",
                                      "specificity", "specificity_ci95", "tp", "fp", "tn", "fn")}


def scoring_threshold(given: float | None, card: dict | None, metadata: dict,
                      digest: str, card_uri: str = "the model card") -> tuple[float, str]:
    """The threshold a scoring run applies, and where it came from: the command line, else
    the model card's validated operating point, else the training default in the model.

    A card written for another model (re-exported, quantized, or retrained since it was
    evaluated; ``digest`` is this model's :func:`model_digest`) raises
    :class:`StaleModelCard`: its threshold was chosen on another model's scores, and falling
    back to the training default would change the operating point just as silently."""
    if given is not None:
        return float(given), "--threshold"
    if card is not None:
        if card.get("model_digest") != digest:
            raise StaleModelCard(
                f"{card_uri} describes another model (digest {card.get('model_digest')}; this "
                f"model's is {digest}): it was re-exported, quantized or retrained after "
                "`covidray evaluate` chose that threshold. Run `covidray evaluate --run RUN` "
                "for this model, or pass --threshold")
        point = card["operating_point"]
        return float(point["threshold"]), f"model card ({point['how']})"
    return float(metadata["threshold"]), ("model metadata: the training default, not validated "
                                          "(run `covidray evaluate` to write a model card)")
