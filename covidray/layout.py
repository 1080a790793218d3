"""Where every artifact lives, defined once. A run directory looks like::

    <run>/train/config.json        the TrainConfig that made this run
    <run>/train/splits.parquet     every image with its train/val/test split
    <run>/train/history.json       per-epoch loss and validation metrics
    <run>/train/checkpoints/       Ray Train checkpoints (checkpoint_*/checkpoint.pt)
    <run>/train/features/<split>/  frozen-backbone features (Parquet), when only the head trains
    <run>/model/model.pt           final checkpoint {model, optimizer, epoch, config, ...}
    <run>/model/model.onnx         exported model, metadata inside
    <run>/model/export.json        ONNX parity report

and a scoring output directory::

    <out>/predictions/*.parquet    one row per scored image
    <out>/errors/*.parquet         one row per image that could not be scored, with reason
    <out>/metrics/metrics.json     sweep, confusion matrices, AUC (labelled archives)
    <out>/metrics/sweep.csv
    <out>/metrics/confusion_matrix_t0.10.png ... _operating_t0.50.png, score_histogram.png
    <out>/_SUCCESS.json            written last: counts and the list of artifacts
"""

from __future__ import annotations

from dataclasses import dataclass

from covidray.storage import join_uri


@dataclass(frozen=True)
class RunLayout:
    root: str

    def _at(self, *parts: str) -> str:
        return join_uri(self.root, *parts)

    @property
    def config(self) -> str:
        return self._at("train", "config.json")

    @property
    def splits(self) -> str:
        return self._at("train", "splits.parquet")

    @property
    def history(self) -> str:
        return self._at("train", "history.json")

    @property
    def checkpoints(self) -> str:
        return self._at("train", "checkpoints")

    def features(self, split: str) -> str:
        return self._at("train", "features", split)

    @property
    def model_checkpoint(self) -> str:
        return self._at("model", "model.pt")

    @property
    def onnx(self) -> str:
        return self._at("model", "model.onnx")

    @property
    def export_report(self) -> str:
        return self._at("model", "export.json")


CHECKPOINT_FILE = "checkpoint.pt"


@dataclass(frozen=True)
class ScoreLayout:
    root: str

    def _at(self, *parts: str) -> str:
        return join_uri(self.root, *parts)

    @property
    def predictions(self) -> str:
        return self._at("predictions")

    @property
    def errors(self) -> str:
        return self._at("errors")

    @property
    def staging(self) -> str:
        return self._at("_staging")

    @property
    def metrics_json(self) -> str:
        return self._at("metrics", "metrics.json")

    @property
    def sweep_csv(self) -> str:
        return self._at("metrics", "sweep.csv")

    def confusion_png(self, threshold: float, operating: bool = False) -> str:
        kind = "operating_" if operating else ""
        return self._at("metrics", f"confusion_matrix_{kind}t{threshold:.2f}.png")

    @property
    def histogram_png(self) -> str:
        return self._at("metrics", "score_histogram.png")

    @property
    def success(self) -> str:
        return self._at("_SUCCESS.json")
