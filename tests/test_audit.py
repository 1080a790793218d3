"""The shortcut audit and saliency: each check catches the shortcut it is built for."""

import numpy as np
import pandas as pd

from covidray import audit
from covidray.imaging.recipe import normalize


def test_border_test_catches_a_model_that_reads_a_corner_marker():
    rng = np.random.default_rng(0)
    pixels = rng.integers(60, 200, size=(40, 224, 224), dtype=np.uint8)
    targets = np.arange(40) % 2
    pixels[targets == 1, :20, :20] = 255  # a "hospital marker" in the corner of every COVID image

    def corner_model(p):  # a model that learnt the marker, not the lungs
        return p[:, :20, :20].mean(axis=(1, 2)) / 255.0

    result = audit.border_test(corner_model, pixels, targets, threshold=0.7)
    assert result["original_auc"] == 1.0
    assert result["variants"]["border"]["auc"] == 1.0  # the border alone still separates
    assert result["variants"]["lungs"]["auc"] == 0.5  # the lungs alone carry nothing
    assert result["variants"]["lungs"]["decisions_flipped"] == 0.5

    def lung_model(p):
        return p[:, 100:120, 100:120].mean(axis=(1, 2)) / 255.0

    fair = audit.border_test(lung_model, pixels, targets, threshold=0.5)
    assert fair["variants"]["lungs"]["mean_abs_score_change"] == 0.0


def test_features_that_encode_the_source_are_reported_as_such():
    rng = np.random.default_rng(1)
    n = 240
    frame = pd.DataFrame({"source": np.where(np.arange(n) < 120, "hospital-a", "hospital-b"),
                          "group": [f"p{i}" for i in range(n)],
                          "target": rng.integers(0, 2, n)})
    features = rng.standard_normal((n, 16)).astype(np.float32)
    features[:, 0] += np.where(frame["source"] == "hospital-a", 3.0, -3.0)  # the source shows
    result = audit.source_and_label_predictability(features, frame, seed=0)
    assert result["source"]["macro_auc"] > 0.95
    within = {row["source"]: row["label_auc"] for row in result["label_within_source"]}
    assert set(within) == {"hospital-a", "hospital-b"}
    assert all(0.25 < auc < 0.75 for auc in within.values())  # the label does not
    reading = audit.plain_reading({"predictability": result, "border": {
        "original_auc": 0.9, "variants": {"lungs": {"auc": 0.6, "decisions_flipped": 0.3},
                                          "border": {"auc": 0.85}}}})
    assert "far easier to read than the disease" in reading
    assert "shortcut outside the lungs" in reading


def test_saliency_sample_takes_the_most_confident_of_each_kind():
    frame = pd.DataFrame({"uri": list("abcdefgh"),
                          "score": [0.99, 0.90, 0.20, 0.95, 0.60, 0.05, 0.30, 0.10],
                          "target": [1, 1, 1, 0, 0, 0, 0, 1]})
    sample = audit.saliency_sample(frame, threshold=0.5, per_kind=2, seed=0)
    assert sample["true_positive"]["uri"].tolist() == ["a", "b"]
    assert sample["false_positive"]["uri"].tolist() == ["d", "e"]
    assert sample["false_negative"]["uri"].tolist() == ["h", "c"]


def test_grad_cam_maps_are_normalised_and_the_central_share_is_measured():
    from covidray.model import build_model

    pixels = np.random.default_rng(2).integers(0, 255, size=(2, 224, 224), dtype=np.uint8)
    maps = audit.grad_cam(build_model("none"), pixels)
    assert maps.shape == (2, 224, 224) and maps.min() >= 0 and maps.max() <= 1
    centre = np.zeros((1, 224, 224), np.float32)
    centre[0, 100:120, 100:120] = 1
    corner = np.zeros((1, 224, 224), np.float32)
    corner[0, :10, :10] = 1
    assert audit.central_share(centre)[0] == 1.0 and audit.central_share(corner)[0] == 0.0


def test_the_exported_model_gives_the_audit_its_features_in_the_scoring_pass():
    """The features output added at load time is what the last layer reads: torch's
    backbone features, and the model's own scores unchanged; an int8 export has it too."""
    from covidray.features import extract_features
    from covidray.model import build_model
    from covidray.onnx_runtime import FEATURES_OUTPUT, onnx_session, with_features_output
    from covidray.onnx_export import export_onnx, model_metadata, quantize_int8

    model = build_model("none").eval()
    exported = export_onnx(model, model_metadata(0.5, "none", {}, 0))
    inputs = normalize(np.random.default_rng(3).integers(0, 256, (6, 224, 224), dtype=np.uint8))
    plain = onnx_session(exported).run(["probabilities"], {"input": inputs})[0]
    probabilities, features = onnx_session(with_features_output(exported)).run(
        ["probabilities", FEATURES_OUTPUT], {"input": inputs})
    assert np.array_equal(probabilities, plain)
    assert features.shape == (6, 512)
    assert np.allclose(features, extract_features(model, inputs), atol=1e-4)

    int8 = quantize_int8(exported, inputs, batch=3)
    quantized = onnx_session(with_features_output(int8)).run([FEATURES_OUTPUT], {"input": inputs})[0]
    assert quantized.shape == (6, 512) and np.corrcoef(quantized.ravel(), features.ravel())[0, 1] > 0.9
