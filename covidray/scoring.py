"""Batch scoring of X-ray archives with onnxruntime on Ray Data.

Pipeline: index (manifest rows, or a listing of a prefix, streamed to Parquet) ->
:func:`covidray.datasets.load_pixels` in tasks -> :class:`OnnxScorer` in an actor pool
(model loaded once per actor) -> staged Parquet -> ``predictions/`` and ``errors/``
-> metrics (one streaming pass over the sorted scores) -> ``_SUCCESS.json`` last.
Every listed image ends in exactly one of ``predictions`` or ``errors``.
"""

from __future__ import annotations

import io
import json
import time
import uuid

import numpy as np
import pandas as pd

from covidray.datasets import (LABELS, is_manifest, iter_prefix_rows, load_pixels,
                               manifest_to_index, model_inputs, normalise_index)
from covidray.export import onnx_session, read_metadata
from covidray.images import IMAGE_SUFFIXES, RECIPE
from covidray.layout import ScoreLayout
from covidray.metrics import (PAPER_THRESHOLDS, ScoreSummary, SortedAUC, is_positive,
                              metrics_report, sweep_csv, sweep_thresholds)
from covidray.storage import Location, Storage, StorageError

PREDICTION_COLUMNS = ["uri", "label", "source", "group", "score", "prediction", "threshold"]
ERROR_COLUMNS = ["uri", "label", "source", "group", "error"]
INDEX_KEEP = ["uri", "label", "source", "group"]  # what an index row carries to the outputs
INDEX_PART_ROWS = 50_000


class OnnxScorer:
    """Ray Data callable: loaded batch -> scores. The model is read from storage once."""

    def __init__(self, model_uri: str, storage: Storage, threshold: float | None = None,
                 threads: int = 1):
        self.session = onnx_session(storage.read_bytes(model_uri), threads)
        self.metadata = read_metadata(self.session)
        check_recipe(self.metadata, model_uri)
        self.threshold = float(self.metadata["threshold"]) if threshold is None else threshold
        self.positive = json.loads(self.metadata["class_names"]).index(
            self.metadata["positive_class"])

    def __call__(self, batch: dict) -> dict:
        inputs, ok = model_inputs(batch)
        scores = np.full(len(ok), np.nan, dtype=np.float64)
        if ok.any():
            probabilities = self.session.run(["probabilities"], {"input": inputs})[0]
            scores[ok] = probabilities[:, self.positive]
        predicted = is_positive(np.nan_to_num(scores, nan=-1.0), self.threshold)
        prediction = np.where(ok, np.where(predicted, LABELS[1], LABELS[0]), None)
        return {**{c: batch[c] for c in INDEX_KEEP}, "target": batch["target"], "score": scores,
                "prediction": prediction.astype(object),
                "threshold": np.full(len(ok), self.threshold), "error": batch["error"]}


def check_recipe(metadata: dict, model_uri: str) -> None:
    """Refuse a model trained with another preprocessing recipe than this library's."""
    if "preprocessing" not in metadata:
        raise ValueError(f"'{model_uri}' has no covidray metadata: export it with `covidray export`")
    if json.loads(metadata["preprocessing"]) != RECIPE:
        raise ValueError(f"'{model_uri}' was trained with preprocessing {metadata['preprocessing']}"
                         f", this covidray uses {RECIPE['name']}: re-export or upgrade")


def write_prefix_index(storage: Storage, archive: str, staging: str) -> int:
    """List the image files under ``archive`` into Parquet parts (bounded memory); returns count."""
    listed, part, rows = 0, 0, []
    for row in iter_prefix_rows(storage, archive):
        rows.append(row)
        listed += 1
        if len(rows) == INDEX_PART_ROWS:
            _write_index_part(storage, staging, part, rows)
            part, rows = part + 1, []
    if rows:
        _write_index_part(storage, staging, part, rows)
    return listed


def _write_index_part(storage: Storage, staging: str, part: int, rows: list[dict]) -> None:
    frame = normalise_index(pd.DataFrame(rows, columns=["uri", "label"]))[INDEX_KEEP]
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    storage.write_bytes(f"{staging}/index/part-{part:05d}.parquet", buffer.getvalue())


def archive_index(storage: Storage, archive: str, staging: str):
    """A Ray Dataset of index rows (uri, label, source) for a manifest or a prefix."""
    import ray.data

    if is_manifest(archive):
        location = Location.parse(archive)
        reader = ray.data.read_parquet if archive.lower().endswith(".parquet") else ray.data.read_csv
        raw = reader(location.fs_path, filesystem=storage.filesystem(location))
        return raw.map_batches(lambda frame: manifest_to_index(frame, archive)[INDEX_KEEP],
                               batch_format="pandas")
    if not write_prefix_index(storage, archive, staging):
        raise StorageError(f"no images found under '{archive}' "
                           f"(looked for {', '.join(IMAGE_SUFFIXES)})")
    location = Location.parse(f"{staging}/index")
    return ray.data.read_parquet(location.fs_path, filesystem=storage.filesystem(location))


def loaded_images(index, storage: Storage, batch_size: int, data_cpus: float):
    """Index rows -> rows with pixels and error: the scoring pipeline before the model."""
    return index.map_batches(load_pixels, fn_kwargs={"storage": storage}, batch_format="numpy",
                             batch_size=batch_size, num_cpus=data_cpus)


def score_archive(archive: str, model_uri: str, output: str, storage: Storage,
                  threshold: float | None = None, batch_size: int = 32,
                  actors: int | None = None, ray_address: str | None = None) -> dict:
    """Score every image in ``archive``; write predictions, errors and metrics under ``output``.

    Returns the summary also written to ``<output>/_SUCCESS.json``.
    """
    from covidray.cluster import connect_ray, plan_resources

    started = time.time()
    layout = ScoreLayout(output)
    storage.check(archive)
    storage.check(output, writable=True)
    if not storage.exists(model_uri):
        raise StorageError(f"model '{model_uri}' not found: run `covidray export` first or fix --model")
    # Load once here so a bad model fails before any work is scheduled.
    threshold = OnnxScorer(model_uri, storage, threshold).threshold
    # A re-run unpublishes the previous result first: readers wait for the new marker.
    storage.delete(layout.success)

    ray = connect_ray(ray_address)
    import ray.data
    from ray.data.expressions import col

    plan = plan_resources(ray.cluster_resources())
    pool = actors or plan.scoring_actors
    staging = f"{layout.staging}/{uuid.uuid4().hex[:8]}"
    index = archive_index(storage, archive, staging)

    def fs(uri):
        location = Location.parse(uri)
        return location.fs_path, storage.filesystem(location)

    results_path, results_fs = fs(f"{staging}/results")
    (loaded_images(index, storage, batch_size, plan.data_cpus)
          .map_batches(OnnxScorer, fn_constructor_kwargs={"model_uri": model_uri,
                                                          "storage": storage,
                                                          "threshold": threshold},
                       batch_format="numpy", batch_size=batch_size, num_cpus=plan.data_cpus,
                       compute=ray.data.ActorPoolStrategy(min_size=1, max_size=pool))
          .write_parquet(results_path, filesystem=results_fs))

    results = ray.data.read_parquet(results_path, filesystem=results_fs)
    scored = results.filter(expr=col("error") == "")
    failed = results.filter(expr=col("error") != "")
    for dataset, target, columns in ((scored, layout.predictions, PREDICTION_COLUMNS),
                                     (failed, layout.errors, ERROR_COLUMNS)):
        storage.delete_prefix(target)  # a re-run replaces, never mixes with, older parts
        path, filesystem = fs(target)
        dataset.select_columns(columns).write_parquet(path, filesystem=filesystem)
    listed, n_scored, n_failed = index.count(), scored.count(), failed.count()
    if not n_failed:
        _write_empty(storage, f"{layout.errors}/part-empty.parquet", ERROR_COLUMNS)
    if not n_scored:
        _write_empty(storage, f"{layout.predictions}/part-empty.parquet", PREDICTION_COLUMNS)

    summary = {"archive": archive, "model": model_uri, "output": output,
               "listed": int(listed), "scored": int(n_scored), "failed": int(n_failed),
               "threshold": threshold, "predictions": layout.predictions, "errors": layout.errors}
    labelled = scored.filter(expr=col("target") >= 0).select_columns(["score", "target"])
    if labelled.count():
        summary["metrics"] = publish_metrics(storage, layout, labelled.sort("score"), threshold)
    storage.delete_prefix(staging)
    summary["seconds"] = round(time.time() - started, 1)
    summary["reconciled"] = summary["listed"] == summary["scored"] + summary["failed"]
    storage.write_json(layout.success, summary)
    if not summary["reconciled"]:
        raise RuntimeError(f"listed {listed} != scored {n_scored} + failed {n_failed}")
    return summary


def publish_metrics(storage: Storage, layout: ScoreLayout, sorted_scores, threshold: float) -> dict:
    """Fold a score-sorted Dataset of (score, target) into the metrics files; returns headline figures."""
    from covidray.figures import confusion_matrix_png, score_histogram_png

    summary = ScoreSummary(np.asarray(sorted({*sweep_thresholds().tolist(), threshold})))
    auc = SortedAUC()
    for batch in sorted_scores.iter_batches(batch_size=65_536, batch_format="numpy"):
        summary.add(batch["score"], batch["target"])
        auc.add(batch["score"], batch["target"])
    report = metrics_report(summary, auc.value(), threshold)
    storage.write_json(layout.metrics_json, report)
    storage.write_bytes(layout.sweep_csv, sweep_csv(report).encode(), "text/csv")
    for threshold_key, entry in report["confusion_matrices"].items():
        operating = threshold_key == "operating"
        title = f"{'Operating point' if operating else 'Paper threshold'}: score >= {entry['threshold']:.2f}"
        storage.write_bytes(layout.confusion_png(entry["threshold"], operating),
                            confusion_matrix_png(entry["matrix"], entry["threshold"], title),
                            "image/png")
    storage.write_bytes(layout.histogram_png, score_histogram_png(report), "image/png")
    return {"images": report["images"], "roc_auc": report["roc_auc"],
            "paper_thresholds": {k: {"sensitivity": v["sensitivity"],
                                     "specificity": v["specificity"]}
                                 for k, v in report["paper_thresholds"].items()},
            "metrics_json": layout.metrics_json, "paper_threshold_list": list(PAPER_THRESHOLDS)}


def _write_empty(storage: Storage, uri: str, columns: list[str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    types = {"score": pa.float64(), "threshold": pa.float64()}
    schema = pa.schema([(c, types.get(c, pa.string())) for c in columns])
    buffer = io.BytesIO()
    pq.write_table(schema.empty_table(), buffer)
    storage.write_bytes(uri, buffer.getvalue())
