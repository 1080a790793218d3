"""``covidray export``: a trained run's ``model.pt`` -> ``model.onnx``, parity-checked on real images."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from covidray.config import option, to_dict
from covidray.datasets import load_pixels, model_inputs
from covidray.layout import RunLayout
from covidray.model import load_checkpoint, model_from_checkpoint
from covidray.onnx_model import ExportParityError, export_onnx, model_metadata, parity_check
from covidray.storage import Storage

PARITY_IMAGES = 16


@dataclass(frozen=True)
class ExportConfig:
    run: str = option("", "run directory written by `covidray train`", required=True)
    onnx: str | None = option(None, "where to write the .onnx (default <run>/model/model.onnx)")


def parity_inputs(storage: Storage, layout: RunLayout, count: int = PARITY_IMAGES) -> np.ndarray:
    """Real images for the parity check: the run's held-out images (test, then val)."""
    splits = storage.read_table(layout.splits)
    held_out = pd.concat([splits[splits["split"] == "test"], splits[splits["split"] == "val"],
                          splits[splits["split"] == "train"]]).head(count * 2)
    inputs, _ = model_inputs(load_pixels({"uri": held_out["uri"].to_numpy()}, storage))
    if not len(inputs):
        raise ExportParityError("no readable image in the run's splits to check parity on")
    return inputs[:count]


def export_run(config: ExportConfig, storage: Storage, ray_address: str | None = None) -> dict:
    """Export ``<run>/model/model.pt`` to ONNX, check parity on real images, and write the
    parity report (with this config) to ``<run>/model/export.json``. Runs in this process."""
    layout = RunLayout(config.run)
    checkpoint = load_checkpoint(storage, layout.model_checkpoint)
    model = model_from_checkpoint(checkpoint)
    train_config = checkpoint["config"]
    metadata = model_metadata(train_config["threshold"], checkpoint["weights"], train_config,
                              checkpoint["epoch"] + 1)
    data = export_onnx(model, metadata)
    report = parity_check(model, data, parity_inputs(storage, layout))
    target = config.onnx or layout.onnx
    storage.write_bytes(target, data)
    report.update(model=target, bytes=len(data), metadata=metadata, config=to_dict(config))
    storage.write_json(layout.export_report, report)
    return report
