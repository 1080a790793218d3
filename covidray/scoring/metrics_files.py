"""A labelled scoring output's metrics files: ``metrics.json``, ``sweep.csv``, a confusion
matrix per paper threshold and at the operating point, and the score histogram
(:class:`covidray.layout.ScoreLayout` says where). The evaluation report
(:mod:`covidray.report`) is the other page of figures; both render
:func:`covidray.metrics.metrics_report`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from covidray.labels import LABELS, label_index
from covidray.layout import ScoreLayout
from covidray.metrics import (PAPER_THRESHOLDS, ScoreSummary, SortedAUC, metrics_report,
                              sweep_csv, sweep_thresholds)
from covidray.scoring.merge import SORTED_BATCH_ROWS
from covidray.scoring.parts import RESULT_PART_ROWS, parquet_parts_under
from covidray.storage import Storage


def publish_metrics(storage: Storage, layout: ScoreLayout, threshold: float,
                    scored: int) -> dict:
    """Fold the labelled predictions, sorted by score, into the metrics files; returns
    headline figures."""
    from covidray.figures import confusion_matrix_png, score_histogram_png

    summary = ScoreSummary(np.asarray(sorted({*sweep_thresholds().tolist(), threshold})))
    auc = SortedAUC()
    for batch in sorted_labelled_scores(storage, layout, scored):
        targets = label_index(batch["label"])
        summary.add(batch["score"], targets)
        auc.add(batch["score"], targets)
    report = metrics_report(summary, auc.value(), threshold)
    storage.write_json(layout.metrics_json, report)
    storage.write_bytes(layout.sweep_csv, sweep_csv(report).encode(), "text/csv")
    for threshold_key, entry in report["confusion_matrices"].items():
        operating = threshold_key == "operating"
        title = (f"{'Operating point' if operating else 'Paper threshold'}: "
                 f"score >= {entry['threshold']:.2f}")
        storage.write_bytes(layout.confusion_png(entry["threshold"], operating),
                            confusion_matrix_png(entry["matrix"], entry["threshold"], title),
                            "image/png")
    storage.write_bytes(layout.histogram_png, score_histogram_png(report), "image/png")
    return {"images": report["images"], "roc_auc": report["roc_auc"],
            "paper_thresholds": {k: {"sensitivity": v["sensitivity"],
                                     "specificity": v["specificity"]}
                                 for k, v in report["paper_thresholds"].items()},
            "metrics_json": layout.metrics_json, "paper_threshold_list": list(PAPER_THRESHOLDS)}


def sorts_on_driver(scored: int) -> bool:
    """Whether the metrics' sort of ``scored`` predictions runs on the driver, or (more than
    the part writer holds anyway) as a Ray sort."""
    return scored <= RESULT_PART_ROWS


def sorted_labelled_scores(storage: Storage, layout: ScoreLayout, scored: int):
    """Batches of ``score`` and ``label`` of the labelled predictions, in score order. Up to
    RESULT_PART_ROWS predictions (what the part writer holds anyway) are sorted here on the
    driver; more by a Ray sort, so the driver never holds a large archive's results (and a
    small one skips the sort's seconds of fixed cost)."""
    if sorts_on_driver(scored):
        frames = [storage.read_table(part)[["score", "label"]]
                  for part in storage.list_files(layout.predictions, (".parquet",))]
        frame = pd.concat(frames, ignore_index=True)
        frame = frame[frame["label"].isin(LABELS)].sort_values("score", kind="stable")
        yield {"score": frame["score"].to_numpy(float), "label": frame["label"].to_numpy()}
        return
    from ray.data.expressions import col

    yield from (parquet_parts_under(storage, [layout.predictions], ["score", "label"])
                .filter(expr=col("label").is_in(list(LABELS)))
                .sort("score").iter_batches(batch_size=SORTED_BATCH_ROWS, batch_format="numpy"))
