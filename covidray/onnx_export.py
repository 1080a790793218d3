"""Writing an ONNX model: one self-contained file (dynamic batch, metadata inside), its
int8 variant, and the check that onnxruntime agrees with torch on real images.

The metadata (``covidray.*``) carries class names, the preprocessing recipe, the operating
threshold, the backbone and its starting weights (source, sha256, licence) and the training
config, so a scorer (:class:`covidray.onnx_runtime.OnnxScorer`) needs nothing else.
"""

from __future__ import annotations

import json
import warnings

import numpy as np

from covidray.imaging.recipe import INPUT_SIZE, PAPER_RECIPE, Recipe
from covidray.labels import LABELS, POSITIVE_LABEL
from covidray.onnx_runtime import META_PREFIX, onnx_session

# torch is imported only by the functions that export or compare with it.

PARITY_TOLERANCE = 1e-4

class ExportParityError(RuntimeError):
    """onnxruntime disagrees with torch by more than the tolerance."""


def model_metadata(threshold: float, weights: str, train_config: dict, epochs: int,
                   recipe: Recipe = PAPER_RECIPE, provenance: dict | None = None) -> dict:
    """The ONNX metadata (``covidray.*``). ``weights``: one line naming the starting
    weights; ``provenance``: :func:`covidray.model.weights_provenance` (older checkpoints
    have none: their backbone is ResNet18)."""
    provenance = provenance or {}
    return {
        "class_names": json.dumps(list(LABELS)),
        "positive_class": POSITIVE_LABEL,
        "preprocessing": json.dumps(recipe.describe(), sort_keys=True),
        "backbone": provenance.get("backbone", train_config.get("backbone", "resnet18")),
        "weights_source": provenance.get("source", weights),
        "weights_sha256": provenance.get("sha256", ""),
        "weights_licence": provenance.get("licence", ""),
        "threshold": repr(float(threshold)),
        "weights": weights,
        "epochs_trained": str(epochs),
        "train_config": json.dumps(train_config, sort_keys=True, default=str),
        "positive_rule": "probabilities[:, positive_class] >= threshold",
    }


def export_onnx(model, metadata: dict) -> bytes:
    """Serialise ``model`` (eval mode) to ONNX bytes with ``metadata`` in ``metadata_props``."""
    import torch

    from covidray.model import ScoringModel

    wrapper = ScoringModel(model.eval()).eval()
    example = torch.zeros(2, 3, INPUT_SIZE, INPUT_SIZE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            wrapper, (example,), dynamo=True, verbose=False,
            input_names=["input"], output_names=["logits", "probabilities"],
            dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    proto = program.model_proto
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = META_PREFIX + key, str(value)
    return proto.SerializeToString()


def quantize_int8(model_bytes: bytes, calibration: np.ndarray, batch: int = 16) -> bytes:
    """onnxruntime static quantization: QDQ, int8 weights per channel, uint8 activations,
    calibrated on ``calibration`` (``float32[N, 3, 224, 224]``, the recipe's inputs). The
    covidray metadata is kept, with ``quantization`` added."""
    import os
    import tempfile

    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input": calibration[i:i + batch]}
                                 for i in range(0, len(calibration), batch)])

        def get_next(self):
            return next(self.batches, None)

    source_proto = onnx.load_from_string(model_bytes)
    with tempfile.TemporaryDirectory() as tmp:
        source, prepared, target = (os.path.join(tmp, name) for name in
                                    ("fp32.onnx", "prepared.onnx", "int8.onnx"))
        with open(source, "wb") as fh:
            fh.write(model_bytes)
        quant_pre_process(source, prepared)
        quantize_static(prepared, target, Batches(), quant_format=QuantFormat.QDQ,
                        per_channel=True, weight_type=QuantType.QInt8,
                        activation_type=QuantType.QUInt8)
        proto = onnx.load(target)
    del proto.metadata_props[:]
    for entry in source_proto.metadata_props:
        proto.metadata_props.add(key=entry.key, value=entry.value)
    proto.metadata_props.add(key=META_PREFIX + "quantization",
                             value=f"int8 static (QDQ), calibrated on {len(calibration)} "
                                   "validation images")
    return proto.SerializeToString()


def parity_check(model, model_bytes: bytes, inputs: np.ndarray,
                 tolerance: float = PARITY_TOLERANCE) -> dict:
    """Run ``inputs`` through torch and onnxruntime; raise if they differ by more than ``tolerance``."""
    import torch

    from covidray.model import ScoringModel

    wrapper = ScoringModel(model.eval()).eval()
    with torch.inference_mode():
        torch_logits, torch_probs = (t.numpy() for t in wrapper(torch.from_numpy(inputs)))
    ort_logits, ort_probs = onnx_session(model_bytes).run(None, {"input": inputs})
    report = {"images": int(len(inputs)),
              "max_abs_diff_logits": float(np.max(np.abs(torch_logits - ort_logits))),
              "max_abs_diff_probabilities": float(np.max(np.abs(torch_probs - ort_probs))),
              "tolerance": tolerance}
    worst = max(report["max_abs_diff_logits"], report["max_abs_diff_probabilities"])
    report["passed"] = bool(worst <= tolerance)
    if not report["passed"]:
        raise ExportParityError(f"onnxruntime differs from torch by {worst:.3g} "
                                f"(> {tolerance:g}) on {len(inputs)} images")
    return report


