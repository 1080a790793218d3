"""ONNX export: one self-contained file, dynamic batch, metadata inside, parity-checked.

The exported graph maps ``input`` ``float32[N,3,224,224]`` (the output of
:func:`covidray.images.normalize`) to ``logits`` and ``probabilities`` ``[N, 2]``.
Its metadata carries class names, the preprocessing recipe, the operating threshold,
the starting weights and the training config, so a scorer needs nothing else.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import torch

from covidray.datasets import LABELS, POSITIVE_LABEL
from covidray.images import INPUT_SIZE, RECIPE
from covidray.layout import RunLayout
from covidray.model import load_checkpoint, model_from_checkpoint
from covidray.storage import Storage, read_table
from covidray.model import ScoringModel

PARITY_TOLERANCE = 1e-4
META_PREFIX = "covidray."


class ExportParityError(RuntimeError):
    """onnxruntime disagrees with torch by more than the tolerance."""


def model_metadata(threshold: float, weights: str, train_config: dict, epochs: int) -> dict:
    return {
        "class_names": json.dumps(list(LABELS)),
        "positive_class": POSITIVE_LABEL,
        "preprocessing": json.dumps(RECIPE, sort_keys=True),
        "threshold": repr(float(threshold)),
        "weights": weights,
        "epochs_trained": str(epochs),
        "train_config": json.dumps(train_config, sort_keys=True, default=str),
        "positive_rule": "probabilities[:, positive_class] >= threshold",
    }


def export_onnx(model: torch.nn.Module, metadata: dict) -> bytes:
    """Serialise ``model`` (eval mode) to ONNX bytes with ``metadata`` in ``metadata_props``."""
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



def read_metadata(session) -> dict:
    """The covidray metadata of an onnxruntime session, prefix stripped."""
    raw = session.get_modelmeta().custom_metadata_map
    return {k[len(META_PREFIX):]: v for k, v in raw.items() if k.startswith(META_PREFIX)}


def onnx_session(model_bytes: bytes, threads: int = 0):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def parity_check(model: torch.nn.Module, model_bytes: bytes, inputs: np.ndarray,
                 tolerance: float = PARITY_TOLERANCE) -> dict:
    """Run ``inputs`` through torch and onnxruntime; raise if they differ by more than ``tolerance``."""
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


def parity_inputs(storage: Storage, layout: RunLayout, count: int = 16) -> np.ndarray:
    """Real images for the parity check: the run's held-out images (test, then val)."""
    import pandas as pd

    from covidray.datasets import load_pixels, model_inputs

    splits = read_table(storage, layout.splits)
    held_out = pd.concat([splits[splits["split"] == "test"], splits[splits["split"] == "val"],
                          splits[splits["split"] == "train"]]).head(count * 2)
    inputs, _ = model_inputs(load_pixels({"uri": held_out["uri"].to_numpy()}, storage))
    if not len(inputs):
        raise ExportParityError("no readable image in the run's splits to check parity on")
    return inputs[:count]


def export_run(run: str, storage: Storage, output: str | None = None) -> dict:
    """Export ``<run>/model/model.pt`` to ONNX (``output`` or ``<run>/model/model.onnx``),
    check parity on real images, and write the parity report beside it."""
    layout = RunLayout(run)
    checkpoint = load_checkpoint(storage, layout.model_checkpoint)
    model = model_from_checkpoint(checkpoint)
    config = checkpoint["config"]
    metadata = model_metadata(config.get("threshold", 0.5), checkpoint["weights"], config,
                              checkpoint["epoch"] + 1)
    data = export_onnx(model, metadata)
    report = parity_check(model, data, parity_inputs(storage, layout))
    target = output or layout.onnx
    storage.write_bytes(target, data)
    report.update(model=target, bytes=len(data), metadata=metadata)
    storage.write_json(layout.export_report, report)
    return report
