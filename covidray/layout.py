"""Where every artifact lives, defined once. Each directory a stage writes has a layout:
:class:`RunLayout` (``covidray train --run``), :class:`ScoreLayout` (``covidray score
--output``, nightly parts and the cumulative view included), :class:`EvalLayout`
(``covidray evaluate``), :class:`DataLayout` (``covidray upload``) and :class:`DemoLayout`.
``docs/outputs.md`` describes what each file holds.
"""

from __future__ import annotations

from dataclasses import dataclass

from covidray.storage.location import Location, join_uri, parent_uri

CHECKPOINT_FILE = "checkpoint.pt"
EMPTY_PART = "part-empty.parquet"


def part_name(number: int, run_id: str | None = None) -> str:
    """The file name of a table's ``number``-th Parquet part: ``part-00000.parquet``, or
    ``<run>-00000.parquet`` for a result part a run wrote (so a part says which run made
    it, :func:`written_by`)."""
    return f"{run_id or 'part'}-{number:05d}.parquet"


def written_by(name: str, run_id: str) -> bool:
    """Whether the part file ``name`` is one that run ``run_id`` wrote (:func:`part_name`)."""
    return name.startswith(run_id + "-")


def model_card_beside(model_uri: str) -> str:
    """The model card travels with the model: ``model_card.json`` in the same folder."""
    return join_uri(parent_uri(model_uri), "model_card.json")


def drift_reference_beside(model_uri: str) -> str:
    """The reference profile scoring compares its inputs with, beside the model card."""
    return join_uri(parent_uri(model_uri), "drift_reference.json")


def _run_folder_of(uri: str, folder: str, name: str) -> str | None:
    """``RUN`` where ``uri`` is ``<folder>/RUN/<name>``, else None."""
    location = Location.parse(uri)
    if location.name != name or location.parent.parent.uri != Location.parse(folder).uri:
        return None
    return location.parent.name


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
    def drift_reference(self) -> str:
        return drift_reference_beside(self.onnx)

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
    def run_record(self) -> str:
        """Which run and which model made this result (run, model, model_digest)."""
        return self._at("run.json")

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
        """Everything a run in progress writes before it publishes."""
        return self._at("_staging", run_id)

    def staged(self, run_id: str, table: str = "index") -> str:
        """A staged table of a run: its index snapshot (``index``), what is left to score
        (``todo``), or the view's rows it keeps (``kept``)."""
        return self._at("_staging", run_id, table)

    def staged_result(self, run_id: str) -> "ScoreLayout":
        """Where a whole run writes its result until it is complete (a scoring output)."""
        return ScoreLayout(self._at("_staging", run_id, "result"))

    def ready_marker(self, run_id: str) -> str:
        """Written in a whole run's staging once its result is complete, before the swap:
        the run's summary, so that whoever finishes the swap writes the right marker."""
        return self._at("_staging", run_id, "ready.json")

    def run_of_ready_marker(self, uri: str) -> str | None:
        """The run whose :meth:`ready_marker` ``uri`` is, else None."""
        return _run_folder_of(uri, self.staging, "ready.json")

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
    def drift_json(self) -> str:
        """This run's inputs against the model's reference profile."""
        return self._at("metrics", "drift.json")

    @property
    def drift_png(self) -> str:
        return self._at("metrics", "drift.png")

    @property
    def drift_history(self) -> str:
        """Nightly runs: one row of drift figures per run (a table over the nights)."""
        return self._at("drift", "history.csv")

    @property
    def drift_history_png(self) -> str:
        return self._at("drift", "history.png")

    @property
    def success(self) -> str:
        return self._at("_SUCCESS.json")

    def empty_part(self, folder: str) -> str:
        """The part a run writes into ``predictions`` or ``errors`` when it has no row for
        it, so readers always find a table with the right columns."""
        return join_uri(folder, EMPTY_PART)

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

    def run_of_part_config(self, uri: str) -> str | None:
        """The run whose part's ``config.json`` ``uri`` is, else None."""
        return _run_folder_of(uri, self.runs, "config.json")

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
class SiteLayout(_Layout):
    """What ``covidray calibrate`` writes for one site (``--output``)."""

    @property
    def config(self) -> str:
        return self._at("config.json")

    @property
    def site_card(self) -> str:
        return self._at("site_card.json")

    @property
    def drift_reference(self) -> str:
        """The site's own reference profile: its labelled sample's."""
        return self._at("drift_reference.json")

    @property
    def sample_scores(self) -> str:
        """The scoring output of the labelled sample (a :class:`ScoreLayout` root)."""
        return self._at("sample")

    @property
    def reliability_png(self) -> str:
        return self._at("reliability.png")

    @property
    def site_roc_png(self) -> str:
        return self._at("site_roc.png")

    @property
    def report(self) -> str:
        """The site card as one page: text, tables and both figures."""
        return self._at("site_report.html")


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
