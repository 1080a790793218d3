"""``covidray evaluate``: score a run's validation and test splits, then write the report.

The operating threshold is chosen on validation (the highest threshold reaching
``target_sensitivity``) and reported on test; the layout of what it writes is
:class:`covidray.layout.EvalLayout` (``<run>/eval`` by default).
"""

from __future__ import annotations

from dataclasses import dataclass

from covidray.config import option, to_dict
from covidray.datasets import split_rows
from covidray.evaluation import evaluate_split, labelled, with_columns
from covidray.layout import EvalLayout, RunLayout, ScoreLayout
from covidray.model_card import build_model_card
from covidray.report import write_report
from covidray.stages.score import ScoreConfig, score_archive
from covidray.storage import Storage

EVALUATED_SPLITS = ("val", "test")


@dataclass(frozen=True)
class EvaluateConfig:
    run: str = option("", "run directory (trained and exported)", required=True)
    eval_dir: str | None = option(None, "evaluation directory (default <run>/eval)")
    target_sensitivity: float = option(0.95, "choose the operating threshold on validation as "
                                             "the highest one reaching this sensitivity")
    bootstrap: int = option(1000, "bootstrap replicates (patients resampled) for AUC intervals")
    breakdown: str = option("source,view,sex,age_group",
                            "comma-separated manifest columns to break results down by (those "
                            "present are used)")

    @property
    def breakdown_columns(self) -> tuple[str, ...]:
        return tuple(c for c in self.breakdown.split(",") if c)

    @property
    def layout(self) -> EvalLayout:
        return EvalLayout(self.eval_dir or RunLayout(self.run).eval_dir)


def evaluate_run(config: EvaluateConfig, storage: Storage, ray_address: str | None = None) -> dict:
    """Score the run's val and test splits with its ONNX model and write the report."""
    run, layout = RunLayout(config.run), config.layout
    storage.write_json(layout.config, to_dict(config))
    splits = storage.read_table(run.splits)
    tables = {}
    for split in EVALUATED_SPLITS:
        manifest = storage.write_table(layout.manifest(split), split_rows(splits, split))
        scores = layout.scores(split)
        score_archive(ScoreConfig(archive=manifest, model=run.onnx, output=scores), storage,
                      ray_address)
        predictions = storage.read_parquet_dir(ScoreLayout(scores).predictions)
        tables[split] = labelled(with_columns(predictions, splits, config.breakdown_columns))
    columns = [c for c in config.breakdown_columns if c in tables["test"].columns]
    result = evaluate_split(tables["val"], tables["test"], config.target_sensitivity, columns,
                            config.bootstrap)
    metadata = storage.read_json(run.export_report)["metadata"]
    result.update(run=config.run, weights=metadata["weights"], eval_dir=layout.root,
                  config=to_dict(config))
    write_report(storage, layout, result, tables["test"])
    storage.write_json(run.model_card, build_model_card(run.onnx, metadata, splits, result))
    return {**headline(result, layout), "model_card": run.model_card}


def headline(result: dict, layout: EvalLayout) -> dict:
    operating = result["operating_point"]
    return {"report": layout.report_file("report.html"),
            "weights": result["weights"], "test_images": result["test_images"],
            "roc_auc": result["roc_auc"], "roc_auc_ci95": result["roc_auc_ci95"],
            "operating_threshold": operating["threshold"],
            "test_sensitivity": operating["test"]["sensitivity"],
            "test_specificity": operating["test"]["specificity"]}
