"""The evaluation a screening threshold is chosen from: pure functions over score tables.

Inputs are the predictions tables that ``covidray score`` writes (one row per image:
``score``, ``label``, plus ``group`` -- the patient unit -- and grouping columns such as
``source``). The operating point is chosen on the validation table and only reported
on the test table. Intervals: Wilson for proportions, a patient-level (cluster) bootstrap
for AUCs.

A **site card** is the same measured at a site adopting a model, on the site's own
labelled sample (thresholds and probabilities do not travel between hospitals): the AUC
there with its interval (and per source / view where the sample has them), the threshold
reaching the sensitivity the site needs, and a calibration map (Platt or isotonic, chosen
by held-out log-loss within the sample) that turns the model's scores into probabilities
for that site. ``covidray calibrate`` (:mod:`covidray.stages.calibrate`) writes it and
scoring applies it (:func:`covidray.metrics.calibrated`).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from sklearn.calibration import calibration_curve
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, brier_score_loss, log_loss
from sklearn.model_selection import StratifiedGroupKFold

from covidray.config import DEFAULT_SEED
from covidray.labels import LABELS, POSITIVE_LABEL
from covidray.model_card import SITE_CARD_KIND
from covidray.metrics import (PAPER_THRESHOLDS, POSITIVE_RULE, SCORE_EDGE, ConfusionCounts,
                              calibrated, is_positive, json_number, json_numbers, logit, roc_auc,
                              summarise, wilson_interval)

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


# --- the site card ----------------------------------------------------------------------
MIN_PER_CLASS = 20  # scored images of each class a site card needs
CALIBRATION_FOLDS = 5
NOT_PROVEN = ("A site card measures one model on one labelled sample of one site's images. "
              "It is not a clinical validation: the sample's size bounds what it can show "
              "(see the intervals), the threshold is chosen and measured on the same sample "
              "(its sensitivity there is optimistic), and the site's case mix, devices and "
              "labelling can change after it was made (the drift watch compares each run "
              "with this sample).")


class SampleTooSmall(ValueError):
    """A labelled sample too small, or of one class, to adopt a model on."""


def require_enough(targets, where: str) -> None:
    """Refuse a sample with fewer than :data:`MIN_PER_CLASS` images of either class."""
    targets = np.asarray(targets)
    covid, non_covid = int((targets == 1).sum()), int((targets == 0).sum())
    if min(covid, non_covid) < MIN_PER_CLASS:
        raise SampleTooSmall(
            f"{where} has {covid} COVID and {non_covid} non-COVID images; a site card needs "
            f"at least {MIN_PER_CLASS} of each (an AUC, a threshold and a calibration map "
            "from fewer would be noise): label more of the site's studies")


def fit_platt(scores, targets) -> dict:
    """Platt scaling: a logistic regression on the score's logit."""
    model = LogisticRegression(C=1e6, max_iter=1000).fit(logit(scores)[:, None], targets)
    return {"method": "platt", "slope": float(model.coef_[0, 0]),
            "intercept": float(model.intercept_[0])}


def fit_isotonic(scores, targets) -> dict:
    """Isotonic regression: a non-decreasing step map, linear between its knots."""
    model = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip")
    model.fit(np.asarray(scores, float), np.asarray(targets, float))
    return {"method": "isotonic", "x": model.X_thresholds_.tolist(),
            "y": model.y_thresholds_.tolist()}


FITS = {"platt": fit_platt, "isotonic": fit_isotonic}


def choose_calibration(scores, targets, groups, seed: int) -> tuple[dict, dict, np.ndarray]:
    """Platt and isotonic maps, each fitted on 4/5 of the sample's patients and measured on
    the rest (stratified, grouped folds); the one of lower held-out log-loss is fitted on
    the whole sample, or none where neither beats the raw scores. Returns (the map, the
    held-out log-loss and Brier of raw, Platt and isotonic, the chosen map's held-out
    probabilities)."""
    scores, targets = np.asarray(scores, float), np.asarray(targets, int)
    held = {"none": scores.copy(), **{name: np.zeros(len(scores)) for name in FITS}}
    patients = len(set(groups))
    if patients < CALIBRATION_FOLDS:
        raise SampleTooSmall(f"the labelled sample holds {patients} patients (group); "
                             f"calibrating needs at least {CALIBRATION_FOLDS}, one per fold")
    folds = StratifiedGroupKFold(n_splits=CALIBRATION_FOLDS, shuffle=True, random_state=seed)
    for train, test in folds.split(scores, targets, groups):
        for name, fit in FITS.items():
            held[name][test] = calibrated(fit(scores[train], targets[train]), scores[test])
    measured = {name: {"log_loss": float(log_loss(targets,
                                                  np.clip(p, SCORE_EDGE, 1 - SCORE_EDGE))),
                       "brier": float(brier_score_loss(targets, p))}
                for name, p in held.items()}
    best = min(FITS, key=lambda name: measured[name]["log_loss"])
    if measured[best]["log_loss"] >= measured["none"]["log_loss"]:
        best = "none"
    mapping = FITS[best](scores, targets) if best in FITS else {"method": "none"}
    return mapping, measured, held[best]


def build_site_card(sample: pd.DataFrame, failed: int, *, site: str, model_uri: str,
                    digest: str, labelled_uri: str, target_sensitivity: float,
                    breakdown_columns, bootstrap: int, seed: int) -> dict:
    """The site card of a scored labelled sample (:func:`covidray.evaluation.labelled`
    rows: ``score``, ``target``, ``group``, and the breakdown columns it has); ``failed``:
    the sample's images that could not be scored."""
    require_enough(sample["target"], f"the labelled sample {labelled_uri} (scored images)")
    scores, targets = sample["score"].to_numpy(float), sample["target"].to_numpy(int)
    threshold = threshold_for_sensitivity(scores, targets, target_sensitivity)
    mapping, measured, held_out = choose_calibration(scores, targets,
                                                     sample["group"].astype(str), seed)
    at = summarise(scores, targets, [threshold]).counts_at(threshold)
    return {
        "kind": SITE_CARD_KIND, "site": site, "model": model_uri, "model_digest": digest,
        "sample": {"manifest": labelled_uri, "images": int(len(sample)),
                   "covid": int(targets.sum()), "non_covid": int((targets == 0).sum()),
                   "patients": int(sample["group"].nunique()), "failed": int(failed)},
        "roc_auc": roc_auc(scores, targets),
        "roc_auc_ci95": bootstrap_interval(sample, roc_auc, bootstrap, seed),
        "bootstrap": {"replicates": bootstrap, "unit": "patient (group)", "seed": seed},
        "by": {column: breakdown(sample, column, threshold) for column in breakdown_columns
               if column in sample.columns and sample[column].nunique() > 1},
        "operating_point": {
            "threshold": threshold, "target_sensitivity": target_sensitivity,
            "how": f"highest threshold whose sensitivity on the site's sample reaches "
                   f"{target_sensitivity:g} (measured on that same sample: optimistic)",
            **counts_with_intervals(at)},
        "calibration": {
            "map": mapping,
            "chosen_by": f"held-out log-loss, {CALIBRATION_FOLDS} folds of the sample's "
                         "patients (stratified); none where neither map beats the raw scores",
            "held_out": measured,
            "reliability_raw": calibration(scores, targets),
            "reliability_calibrated": calibration(held_out, targets)},
        "positive_rule": POSITIVE_RULE,
        "not_proven": NOT_PROVEN,
    }
