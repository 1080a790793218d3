"""``covidray score``: score an X-ray archive with onnxruntime on Ray Data.

Pipeline: index (manifest rows, or a listing of a prefix, streamed to Parquet) ->
:func:`covidray.datasets.load_pixels` in tasks -> :class:`covidray.onnx_model.OnnxScorer`
in an actor pool (model loaded once per actor) -> staged Parquet -> ``predictions/`` and
``errors/`` -> metrics (one streaming pass over the sorted scores) -> ``_SUCCESS.json``
last. Every listed image ends in exactly one of ``predictions`` or ``errors``.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

import numpy as np
import pandas as pd

from covidray.config import option, to_dict
from covidray.datasets import (ARCHIVE_COLUMNS, is_manifest, iter_prefix_rows, load_pixels,
                               manifest_to_index, normalise_index)
from covidray.images import IMAGE_SUFFIXES
from covidray.labels import LABELS, label_index
from covidray.layout import ScoreLayout, model_card_beside
from covidray.metrics import (PAPER_THRESHOLDS, ScoreSummary, SortedAUC, metrics_report,
                              sweep_csv, sweep_thresholds)
from covidray.model_card import scoring_threshold
from covidray.onnx_model import OnnxScorer
from covidray.storage import Location, Storage, StorageError

PREDICTION_COLUMNS = [*ARCHIVE_COLUMNS, "score", "prediction", "threshold"]
ERROR_COLUMNS = [*ARCHIVE_COLUMNS, "error"]
INDEX_PART_ROWS = 50_000


@dataclass(frozen=True)
class ScoreConfig:
    archive: str = option("", "a prefix of images (labels from <p>/<label>/ folders when "
                              "present) or a manifest .csv/.parquet", required=True)
    model: str = option("", "model.onnx written by `covidray export`", required=True)
    output: str = option("", "scoring output directory (s3://... or a path)", required=True)
    threshold: float | None = option(None, "operating threshold (default: the model card's, "
                                           "chosen on validation by `covidray evaluate`; "
                                           "else the model's training default)")
    batch_size: int = option(32, "images per inference batch")
    actors: int | None = option(None, "most onnxruntime actors (default: sized from the "
                                      "cluster)")
    allow_local_paths: bool = option(False, "let a manifest held in object storage name local "
                                            "paths, opened on the workers")


def snapshot_index(storage: Storage, archive: str, staging: str,
                   allow_local_paths: bool = False) -> int:
    """Read the archive's index once, into Parquet parts under ``<staging>/index`` that this
    run owns; returns how many images it lists. A manifest is read in chunks and a prefix
    listed page by page (bounded memory), and every row is validated here, on the driver,
    before any cluster work: a bad manifest fails with one line."""
    listed = 0
    for part, frame in enumerate(_index_chunks(storage, archive, allow_local_paths)):
        storage.write_table(f"{staging}/index/part-{part:05d}.parquet", frame[ARCHIVE_COLUMNS])
        listed += len(frame)
    if not listed:
        raise StorageError(f"no images found in '{archive}' "
                           f"(looked for {', '.join(IMAGE_SUFFIXES)})")
    return listed


def _index_chunks(storage: Storage, archive: str, allow_local_paths: bool):
    if is_manifest(archive):
        for chunk in _manifest_chunks(storage, archive):
            yield manifest_to_index(chunk, archive, allow_local_paths)
        return
    rows = []
    for row in iter_prefix_rows(storage, archive):
        rows.append(row)
        if len(rows) == INDEX_PART_ROWS:
            yield normalise_index(pd.DataFrame(rows, columns=["uri", "label"]))
            rows = []
    if rows:
        yield normalise_index(pd.DataFrame(rows, columns=["uri", "label"]))


def _manifest_chunks(storage: Storage, manifest: str):
    """A manifest as DataFrames of at most INDEX_PART_ROWS rows, every value text."""
    import pyarrow.parquet as pq

    location = Location.parse(manifest)
    with storage.filesystem(location).open_input_file(location.fs_path) as fh:
        if manifest.lower().endswith(".parquet"):
            for batch in pq.ParquetFile(fh).iter_batches(batch_size=INDEX_PART_ROWS):
                yield batch.to_pandas()
        else:
            yield from pd.read_csv(fh, dtype=str, keep_default_na=False, na_values=[""],
                                   chunksize=INDEX_PART_ROWS)


def staged_index(storage: Storage, staging: str):
    """The run's own index snapshot as a Ray Dataset."""
    import ray.data

    location = Location.parse(f"{staging}/index")
    return ray.data.read_parquet(location.fs_path, filesystem=storage.filesystem(location))


def loaded_images(index, storage: Storage, batch_size: int, data_cpus: float):
    """Index rows -> rows with pixels and error: the scoring pipeline before the model."""
    return index.map_batches(load_pixels, fn_kwargs={"storage": storage}, batch_format="numpy",
                             batch_size=batch_size, num_cpus=data_cpus)


def score_archive(config: ScoreConfig, storage: Storage, ray_address: str | None = None) -> dict:
    """Score every image in ``config.archive``; write predictions, errors and metrics under
    ``config.output``. Returns the summary also written to ``<output>/_SUCCESS.json``.

    ``_SUCCESS.json`` is published only for a complete, reconciled result (every listed
    image in predictions or errors); any failure leaves no marker and raises.
    """
    from covidray.cluster import connect_ray, plan_resources

    started = time.time()
    archive, model_uri, output = config.archive, config.model, config.output
    layout = ScoreLayout(output)
    storage.check(archive)
    storage.check(output, writable=True)
    if not storage.exists(model_uri):
        raise StorageError(f"model '{model_uri}' not found: run `covidray export` first or fix --model")
    # Load once here so a bad model fails before any work is scheduled.
    metadata = OnnxScorer(model_uri, storage).metadata
    card_uri = model_card_beside(model_uri)
    card = storage.read_json(card_uri) if storage.exists(card_uri) else None
    threshold, threshold_source = scoring_threshold(config.threshold, card, metadata)
    print(f"threshold {threshold:.4g} from {threshold_source}")
    # A re-run unpublishes the previous result first (readers wait for the new marker) and
    # removes its metrics, so nothing of the old run stands beside the new one.
    storage.delete(layout.success)
    storage.delete_prefix(layout.metrics)
    storage.write_json(layout.config, to_dict(config))
    staging = layout.staging_run(uuid.uuid4().hex[:8])
    try:
        listed = snapshot_index(storage, archive, staging, config.allow_local_paths)
        ray = connect_ray(ray_address)
        plan = plan_resources(ray.cluster_resources())
        results = f"{staging}/results"
        run_inference(storage, staged_index(storage, staging), results, model_uri, threshold,
                      config.batch_size, config.actors or plan.scoring_actors,
                      plan.inference_threads, plan.data_cpus)
        counts = publish_results(storage, results, layout)
        if listed != counts["scored"] + counts["failed"]:
            raise RuntimeError(f"not published: listed {listed} != scored {counts['scored']} + "
                               f"failed {counts['failed']}")
        summary = {"archive": archive, "model": model_uri, "output": output, "listed": listed,
                   "scored": counts["scored"], "failed": counts["failed"],
                   "threshold": threshold, "threshold_source": threshold_source,
                   "predictions": layout.predictions,
                   "errors": layout.errors, "reconciled": True}
        if counts["labelled"]:
            summary["metrics"] = publish_metrics(storage, layout, threshold)
    finally:
        storage.delete_prefix(staging)
    summary["seconds"] = round(time.time() - started, 1)
    storage.write_json(layout.success, summary)
    return summary


def run_inference(storage: Storage, index, results: str, model_uri: str, threshold: float,
                  batch_size: int, actors: int, threads: int, data_cpus: float) -> None:
    """The one Ray Data execution: index -> decode (tasks) -> onnxruntime (actors) -> Parquet."""
    import ray.data

    location = Location.parse(results)
    (loaded_images(index, storage, batch_size, data_cpus)
        .map_batches(OnnxScorer, fn_constructor_kwargs={"model_uri": model_uri,
                                                        "storage": storage,
                                                        "threshold": threshold,
                                                        "threads": threads,
                                                        "keep": tuple(ARCHIVE_COLUMNS)},
                     batch_format="numpy", batch_size=batch_size, num_cpus=data_cpus,
                     compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors))
        .write_parquet(location.fs_path, filesystem=storage.filesystem(location)))


def publish_results(storage: Storage, results: str, layout: ScoreLayout) -> dict:
    """Split the staged result parts into ``predictions/`` and ``errors/``, part by part
    (one part in memory at a time); returns the counts."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    counts = {"scored": 0, "failed": 0, "labelled": 0}
    for target in (layout.predictions, layout.errors):
        storage.delete_prefix(target)  # a re-run replaces, never mixes with, older parts
    for number, part in enumerate(storage.list_files(results, (".parquet",))):
        location = Location.parse(part)
        table = pq.read_table(location.fs_path, filesystem=storage.filesystem(location))
        ok = pc.equal(table["error"], "")
        for target, rows, columns, key in ((layout.predictions, table.filter(ok),
                                            PREDICTION_COLUMNS, "scored"),
                                           (layout.errors, table.filter(pc.invert(ok)),
                                            ERROR_COLUMNS, "failed")):
            if rows.num_rows:
                storage.write_table(f"{target}/part-{number:05d}.parquet",
                                    rows.select(columns).to_pandas())
            counts[key] += rows.num_rows
        counts["labelled"] += int(pc.sum(pc.and_(ok, pc.greater_equal(table["target"], 0)))
                                  .as_py() or 0)
    for target, key, columns in ((layout.predictions, "scored", PREDICTION_COLUMNS),
                                 (layout.errors, "failed", ERROR_COLUMNS)):
        if not counts[key]:  # readers always find a table with the right columns
            _write_empty(storage, f"{target}/part-empty.parquet", columns)
    return counts


def publish_metrics(storage: Storage, layout: ScoreLayout, threshold: float) -> dict:
    """Fold the labelled predictions, sorted by score (a Ray sort), into the metrics files;
    returns headline figures."""
    import ray.data
    from ray.data.expressions import col

    from covidray.figures import confusion_matrix_png, score_histogram_png

    location = Location.parse(layout.predictions)
    sorted_scores = (ray.data.read_parquet(location.fs_path,
                                           filesystem=storage.filesystem(location))
                     .select_columns(["score", "label"])
                     .filter(expr=col("label").is_in(list(LABELS)))
                     .sort("score"))
    summary = ScoreSummary(np.asarray(sorted({*sweep_thresholds().tolist(), threshold})))
    auc = SortedAUC()
    for batch in sorted_scores.iter_batches(batch_size=65_536, batch_format="numpy"):
        targets = label_index(batch["label"])
        summary.add(batch["score"], targets)
        auc.add(batch["score"], targets)
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
    floats = {"score", "threshold"}
    storage.write_table(uri, pd.DataFrame({c: pd.Series(dtype=float if c in floats else object)
                                           for c in columns}))
