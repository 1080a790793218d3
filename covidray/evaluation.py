"""The evaluation a screening threshold is chosen from: pure functions over score tables.

Inputs are the predictions tables that ``covidray score`` writes (one row per image:
``score``, ``label``, plus ``group`` -- the patient unit -- and grouping columns such as
``source``). The operating point is chosen on the validation table and only reported
on the test table. Intervals: Wilson for proportions, a patient-level (cluster) bootstrap
for AUCs.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from sklearn.calibration import calibration_curve
from sklearn.metrics import average_precision_score, brier_score_loss

from covidray.config import DEFAULT_SEED
from covidray.labels import LABELS, POSITIVE_LABEL
from covidray.metrics import (PAPER_THRESHOLDS, POSITIVE_RULE, ConfusionCounts, is_positive,
                              json_number, json_numbers, roc_auc, summarise, wilson_interval)

def average_precision(scores, targets) -> float:
    """Area under the precision-recall curve (scikit-learn's average precision); NaN
    without a positive."""
    targets = np.asarray(targets)
    if not (targets == 1).any():
        return math.nan
    return float(average_precision_score(targets, np.asarray(scores, float)))


def bootstrap_interval(frame: pd.DataFrame, statistic, replicates: int, seed: int,
                       level: float = 0.95) -> tuple[float, float] | None:
    """Percentile interval of ``statistic(scores, targets)``, resampling patients (``group``)."""
    groups = frame["group"].astype(str).to_numpy()
    unique, inverse = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inverse == i) for i in range(len(unique))]
    scores, targets = frame["score"].to_numpy(float), frame["target"].to_numpy()
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(replicates):
        chosen = np.concatenate([members[i] for i in rng.integers(0, len(unique), len(unique))])
        t = targets[chosen]
        if (t == 1).any() and (t == 0).any():
            values.append(statistic(scores[chosen], t))
    if len(values) < replicates / 2:
        return None
    tail = (1 - level) / 2 * 100
    return (float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail)))


def labelled(predictions: pd.DataFrame) -> pd.DataFrame:
    """Scored rows with a known label, with ``target`` (1 = covid) and ``group`` columns."""
    frame = predictions[predictions["label"].isin(LABELS)].copy()
    frame["target"] = (frame["label"] == POSITIVE_LABEL).astype(int)
    if "group" not in frame.columns:
        frame["group"] = frame["uri"]
    return frame.reset_index(drop=True)


def with_columns(predictions: pd.DataFrame, index: pd.DataFrame, columns) -> pd.DataFrame:
    """Predictions joined (on ``uri``) with the index's grouping ``columns`` that it lacks;
    a missing value becomes its own group, ``"unknown"``."""
    extra = [c for c in columns if c in index.columns and c not in predictions.columns]
    if extra:
        predictions = predictions.merge(index[["uri", *extra]].drop_duplicates("uri"),
                                        on="uri", how="left")
    present = [c for c in columns if c in predictions.columns]
    predictions = predictions.copy()
    predictions[present] = (predictions[present].astype(object).fillna("unknown").astype(str)
                            .replace("", "unknown"))
    return predictions


def threshold_for_sensitivity(scores, targets, target_sensitivity: float) -> float:
    """The highest threshold whose sensitivity (score >= threshold) reaches the target."""
    positives = np.sort(np.asarray(scores, float)[np.asarray(targets) == 1])[::-1]
    if not len(positives):
        raise ValueError("no COVID images in the validation set: cannot choose a threshold")
    needed = math.ceil(target_sensitivity * len(positives) - 1e-12)
    return float(positives[max(needed, 1) - 1])


def counts_with_intervals(counts: ConfusionCounts) -> dict:
    """Counts, rates and Wilson intervals at one threshold."""
    sens_ci = wilson_interval(counts.tp, counts.tp + counts.fn)
    spec_ci = wilson_interval(counts.tn, counts.tn + counts.fp)
    rates = [[_rate(counts.tn, counts.tn + counts.fp), _rate(counts.fp, counts.tn + counts.fp)],
             [_rate(counts.fn, counts.tp + counts.fn), _rate(counts.tp, counts.tp + counts.fn)]]
    return {**json_numbers(counts.to_dict()), "sensitivity_ci95": sens_ci, "specificity_ci95": spec_ci,
            "matrix": counts.matrix, "matrix_rates": rates}


def calibration(scores, targets, bins: int = 10) -> dict:
    """Reliability diagram data (equal-width bins; scikit-learn's calibration curve) and the
    Brier score."""
    scores, targets = np.asarray(scores, float), np.asarray(targets, int)
    if not len(scores):
        return {"brier": None, "bins": []}
    fraction, mean = calibration_curve(targets, scores, n_bins=bins, strategy="uniform")
    edges = np.linspace(0, 1, bins + 1)
    counts = np.bincount(np.searchsorted(edges[1:-1], scores), minlength=bins)  # as sklearn bins
    filled = iter(zip(mean, fraction))  # calibration_curve lists only the non-empty bins
    rows = []
    for b in range(bins):
        m, f = next(filled) if counts[b] else (None, None)
        rows.append({"bin_low": float(edges[b]), "bin_high": float(edges[b + 1]),
                     "images": int(counts[b]), "mean_score": None if m is None else float(m),
                     "fraction_covid": None if f is None else float(f)})
    return {"brier": float(brier_score_loss(targets, scores)), "bins": rows}


def breakdown(test: pd.DataFrame, column: str, threshold: float) -> list[dict]:
    """Per value of ``column``: counts, AUC where both classes exist, and rates at the threshold."""
    rows = []
    for value, part in test.groupby(column, dropna=False):
        both = part["target"].nunique() == 2
        at = summarise(part["score"], part["target"], [threshold]).counts_at(threshold)
        rows.append({column: str(value), "images": int(len(part)),
                     "covid": int(part["target"].sum()),
                     "non_covid": int((part["target"] == 0).sum()),
                     "roc_auc": roc_auc(part["score"], part["target"]) if both else None,
                     "sensitivity": json_number(at.sensitivity),
                     "sensitivity_ci95": wilson_interval(at.tp, at.tp + at.fn),
                     "specificity": json_number(at.specificity),
                     "specificity_ci95": wilson_interval(at.tn, at.tn + at.fp),
                     "mean_score": float(part["score"].mean())})
    return rows


def evaluate_split(val: pd.DataFrame, test: pd.DataFrame, target_sensitivity: float,
                   breakdown_columns: list[str], bootstrap: int, seed: int = DEFAULT_SEED) -> dict:
    """Everything the report shows. ``val`` and ``test`` are :func:`labelled` tables."""
    threshold = threshold_for_sensitivity(val["score"], val["target"], target_sensitivity)
    val_at = summarise(val["score"], val["target"], [threshold]).counts_at(threshold)
    thresholds = sorted({*PAPER_THRESHOLDS, threshold})
    summary = summarise(test["score"], test["target"], thresholds)
    scores, targets = test["score"].to_numpy(float), test["target"].to_numpy()
    return {
        "test_images": int(len(test)), "test_covid": int(targets.sum()),
        "test_non_covid": int((targets == 0).sum()), "test_patients": int(test["group"].nunique()),
        "roc_auc": roc_auc(scores, targets),
        "roc_auc_ci95": bootstrap_interval(test, roc_auc, bootstrap, seed),
        "average_precision": average_precision(scores, targets),
        "average_precision_ci95": bootstrap_interval(test, average_precision, bootstrap, seed),
        "bootstrap": {"replicates": bootstrap, "unit": "patient (group)", "seed": seed},
        "paper_thresholds": {f"{t:.2f}": counts_with_intervals(summary.counts_at(t))
                             for t in PAPER_THRESHOLDS},
        "operating_point": {
            "chosen_on": "val", "target_sensitivity": target_sensitivity, "threshold": threshold,
            "val": counts_with_intervals(val_at),
            "test": counts_with_intervals(summary.counts_at(threshold))},
        "calibration": calibration(scores, targets),
        "breakdown": {column: breakdown(test, column, threshold) for column in breakdown_columns
                      if column in test.columns},
        "positive_rule": POSITIVE_RULE,
        "predicted_positive_at_threshold": int(is_positive(scores, threshold).sum()),
    }


def _rate(numerator: int, denominator: int):
    return numerator / denominator if denominator else None



