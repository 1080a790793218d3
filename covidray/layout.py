"""Where every artifact lives, defined once. Each directory a stage writes has a layout.

A **run directory** (``covidray train --run``)::

    <run>/train/config.json        the TrainConfig that made this run
    <run>/train/splits.parquet     every image with its train/val/test split
    <run>/train/history.json       per-epoch loss and validation metrics
    <run>/train/placement.json     which node each training worker ran on (latest attempt)
    <run>/train/checkpoints/       Ray Train checkpoints (checkpoint_*/checkpoint.pt)
    <run>/train/features/<split>/  frozen-backbone features (Parquet), when only the head trains
    <run>/model/model.pt           final checkpoint {model, optimizer, epoch, config, ...}
    <run>/model/model.onnx         exported model, metadata inside
    <run>/model/model-fp32.onnx    the float model, when model.onnx is the int8 one
    <run>/model/export.json        ONNX parity report, with the ExportConfig
    <run>/model/model_card.json    written by `covidray evaluate`: recipe, data, metrics and
                                   the operating threshold that `covidray score` uses
    <run>/protocol.json            the ProtocolConfig, when `covidray protocol` made the run
    <run>/eval/                    the default evaluation directory (below)

a **scoring output** (``covidray score --output``)::

    <output>/config.json             the ScoreConfig of the latest run
    <output>/predictions/*.parquet   one row per scored image
    <output>/errors/*.parquet        one row per image that could not be scored, with reason
    <output>/metrics/metrics.json    sweep, confusion matrices, AUC (labelled archives)
    <output>/metrics/sweep.csv
    <output>/metrics/confusion_matrix_t0.10.png ... _operating_t0.50.png, score_histogram.png
    <output>/_SUCCESS.json           written last: counts and where the results are
    <output>/_LEASE.json             held by the run in progress
    <output>/_staging/<run>/         the run in progress: its index snapshot, and its result
                                     (result/) until it is complete and copied into place
                                     (ready.json: complete, being swapped in)
  and with ``--incremental`` (nightly runs) the same per run, plus the cumulative view:
    <output>/runs/<run>/...          one dated part per run (config, predictions, errors, ...)
    <output>/state/<run>/*.parquet   the cumulative view: one row per object listed now, its
                                     latest result (uri, etag, size, run, label, source,
                                     score, prediction, threshold, error) at the latest
                                     run's threshold, URI-sorted
    <output>/_CURRENT.json           archive, model, views, threshold, committed runs and the
                                     latest state: what readers use

an **evaluation directory** (``covidray evaluate``; ``<run>/eval`` by default)::

    <eval>/config.json               the EvaluateConfig
    <eval>/{val,test}-manifest.parquet, <eval>/{val,test}/   each split, scored (as above)
    <eval>/report/                   report.html, summary.md, report.json, *.png

a **dataset** staged by ``covidray upload`` (``<data>/manifest.csv``, ``upload.json``) and
the **demo's work directory** (``<workdir>/data``, ``run``, ``scores/test`` ...).
"""

from __future__ import annotations

from dataclasses import dataclass

from covidray.storage import join_uri

CHECKPOINT_FILE = "checkpoint.pt"


def model_card_beside(model_uri: str) -> str:
    """The model card travels with the model: ``model_card.json`` in the same folder."""
    folder = model_uri.rsplit("/", 1)[0] if "/" in model_uri else "."
    return join_uri(folder, "model_card.json")


@dataclass(frozen=True)
class _Layout:
    root: str

    def _at(self, *parts: str) -> str:
        return join_uri(self.root, *parts)


@dataclass(frozen=True)
class RunLayout(_Layout):
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
    def placement(self) -> str:
        return self._at("train", "placement.json")

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
    def onnx_fp32(self) -> str:
        """The float model, kept beside an int8 ``model.onnx`` (``export --quantize int8``)."""
        return self._at("model", "model-fp32.onnx")

    @property
    def export_report(self) -> str:
        return self._at("model", "export.json")

    @property
    def model_card(self) -> str:
        return model_card_beside(self.onnx)

    @property
    def protocol_config(self) -> str:
        return self._at("protocol.json")

    @property
    def eval_dir(self) -> str:
        return self._at("eval")


@dataclass(frozen=True)
class ScoreLayout(_Layout):
    @property
    def config(self) -> str:
        return self._at("config.json")

    @property
    def predictions(self) -> str:
        return self._at("predictions")

    @property
    def errors(self) -> str:
        return self._at("errors")

    @property
    def staging(self) -> str:
        return self._at("_staging")

    def staging_run(self, run_id: str) -> str:
        return self._at("_staging", run_id)

    @property
    def metrics(self) -> str:
        return self._at("metrics")

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

    # --- incremental (nightly) scoring: dated run parts and the cumulative view ----------
    @property
    def lease(self) -> str:
        return self._at("_LEASE.json")

    @property
    def current(self) -> str:
        """The cumulative view readers use: committed run parts and the state table."""
        return self._at("_CURRENT.json")

    @property
    def runs(self) -> str:
        return self._at("runs")

    def run_part(self, run_id: str) -> str:
        """One run's part (itself laid out as a scoring output)."""
        return self._at("runs", run_id)

    @property
    def states(self) -> str:
        return self._at("state")

    def state(self, run_id: str) -> str:
        """The state table after ``run_id`` (the cumulative view): every object scored so
        far with its latest result, URI-sorted."""
        return self._at("state", run_id)


@dataclass(frozen=True)
class EvalLayout(_Layout):
    @property
    def config(self) -> str:
        return self._at("config.json")

    def manifest(self, split: str) -> str:
        return self._at(f"{split}-manifest.parquet")

    def scores(self, split: str) -> str:
        """The scoring output of one split (a :class:`ScoreLayout` root)."""
        return self._at(split)

    @property
    def report(self) -> str:
        return self._at("report")

    def report_file(self, name: str) -> str:
        return self._at("report", name)


@dataclass(frozen=True)
class DataLayout(_Layout):
    """A labelled dataset staged in storage: images plus one manifest."""

    @property
    def manifest(self) -> str:
        return self._at("manifest.csv")

    @property
    def config(self) -> str:
        return self._at("upload.json")

    def image(self, relative: str) -> str:
        return self._at(relative)


@dataclass(frozen=True)
class DemoLayout(_Layout):
    @property
    def config(self) -> str:
        return self._at("demo.json")

    @property
    def data(self) -> str:
        return self._at("data")

    @property
    def run(self) -> str:
        return self._at("run")

    @property
    def scores(self) -> str:
        return self._at("scores", "test")

    @property
    def test_archive(self) -> str:
        return self._at("test-archive.csv")

    def unreadable(self, name: str) -> str:
        return self._at("unreadable", name)
