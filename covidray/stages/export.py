"""``covidray export``: a trained run's ``model.pt`` -> ``model.onnx``, parity-checked on real images."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from covidray.config import option, to_dict, validate
from covidray.imaging.loader import pixels_of
from covidray.layout import RunLayout
from covidray.imaging.recipe import Recipe
from covidray.model import checkpoint_recipe, load_checkpoint, model_from_checkpoint
from covidray.onnx_export import (ExportParityError, export_onnx, model_metadata, parity_check,
                                  quantize_int8)
from covidray.onnx_runtime import OnnxScorer
from covidray.storage import Storage

PARITY_IMAGES = 16


@dataclass(frozen=True)
class ExportConfig:
    run: str = option("", "run directory written by `covidray train`", required=True)
    onnx: str | None = option(None, "where to write the .onnx (default <run>/model/model.onnx)")
    quantize: str = option("none", "int8: onnxruntime static quantization calibrated on "
                                   "validation images (3.4x faster here, test AUC within "
                                   "0.003); the float model stays as model-fp32.onnx. Run "
                                   "`covidray evaluate` after it: the threshold is chosen on "
                                   "the int8 model's own scores", choices=("none", "int8"))
    calibration_images: int = option(200, "validation images int8 is calibrated on",
                                     bounds=(1, None))

    def __post_init__(self):
        validate(self)


def parity_inputs(storage: Storage, layout: RunLayout, recipe: Recipe,
                  count: int = PARITY_IMAGES) -> np.ndarray:
    """Real images for the parity check: the run's test images, then validation, then
    training images where the held-out ones are too few (the first ``count`` readable)."""
    splits = storage.read_table(layout.splits)
    held_out = pd.concat([splits[splits["split"] == "test"], splits[splits["split"] == "val"],
                          splits[splits["split"] == "train"]]).head(count * 2)
    pixels = pixels_of(storage, held_out["uri"].tolist(), readable_only=True)
    if not len(pixels):
        raise ExportParityError("no readable image in the run's splits to check parity on")
    return recipe.normalize(pixels[:count])


def calibration_inputs(storage: Storage, layout: RunLayout, recipe: Recipe,
                       count: int) -> np.ndarray:
    """The recipe's inputs for up to ``count`` validation images (a seeded sample)."""
    splits = storage.read_table(layout.splits)
    val = splits[(splits["split"] == "val") & (splits["copy"] == 0)]
    if val.empty:
        raise ValueError("int8 calibration needs validation images: train with --val-fraction > 0")
    sample = val.sample(n=min(count, len(val)), random_state=0)
    return recipe.normalize(pixels_of(storage, sample["uri"].tolist(), readable_only=True))


def export_run(config: ExportConfig, storage: Storage, ray_address: str | None = None) -> dict:
    """Export ``<run>/model/model.pt`` to ONNX, check parity on real images, and write the
    parity report (with this config) to ``<run>/model/export.json``. Runs in this process."""
    layout = RunLayout(config.run)
    checkpoint = load_checkpoint(storage, layout.model_checkpoint)
    model, recipe = model_from_checkpoint(checkpoint), checkpoint_recipe(checkpoint)
    train_config = checkpoint["config"]
    metadata = model_metadata(train_config["threshold"], checkpoint["weights"], train_config,
                              checkpoint["epoch"] + 1, recipe,
                              checkpoint.get("weights_provenance"))
    data = export_onnx(model, metadata)
    checked = parity_inputs(storage, layout, recipe)
    report = parity_check(model, data, checked)
    target = config.onnx or layout.onnx
    if config.quantize == "int8":
        storage.write_bytes(layout.onnx_fp32, data)
        int8 = quantize_int8(data, calibration_inputs(storage, layout, recipe,
                                                      config.calibration_images))
        report["int8"] = {"fp32_model": layout.onnx_fp32, "bytes": len(int8),
                          "calibration_images": config.calibration_images,
                          "max_abs_diff_probabilities_vs_fp32": float(np.abs(
                              OnnxScorer(data, target).probabilities(checked)
                              - OnnxScorer(int8, target).probabilities(checked)).max())}
        data = int8
    storage.write_bytes(target, data)
    report.update(model=target, bytes=len(data), metadata=metadata, config=to_dict(config))
    storage.write_json(layout.export_report, report)
    return report
