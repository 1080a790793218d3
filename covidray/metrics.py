"""Threshold-sweep metrics, confusion matrices and ROC AUC for a binary COVID score.

One rule decides "positive" everywhere: :func:`is_positive` (``score >= threshold``).
Everything here is order-free and summable over batches, except :class:`SortedAUC`,
which consumes scores in ascending order, so an archive of any size is evaluated in
one streaming pass with bounded memory (Ray sorts; the driver folds batches).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from covidray.labels import LABELS

PAPER_THRESHOLDS = (0.10, 0.15, 0.20, 0.25)
HISTOGRAM_BINS = 50
Z_95 = 1.959963984540054  # two-sided normal quantile of a 95% interval
POSITIVE_RULE = "score >= threshold"  # what is_positive decides, as every output states it


def is_positive(scores, threshold: float) -> np.ndarray:
    """The decision rule: an image is called COVID when its score is >= the threshold."""
    return np.asarray(scores) >= threshold


def predicted_labels(scores, threshold: float) -> np.ndarray:
    """The label :func:`is_positive` gives each score: ``covid`` or ``non_covid``."""
    return np.where(is_positive(scores, threshold), LABELS[1], LABELS[0])


SCORE_EDGE = 1e-6  # scores are clipped to [SCORE_EDGE, 1 - SCORE_EDGE] before their logit


def logit(scores) -> np.ndarray:
    clipped = np.clip(np.asarray(scores, float), SCORE_EDGE, 1 - SCORE_EDGE)
    return np.log(clipped / (1 - clipped))


def calibrated(mapping: dict | None, scores) -> np.ndarray:
    """A site's probabilities of ``scores`` under the calibration map of its site card
    (:func:`covidray.evaluation.choose_calibration`: Platt, isotonic or none); NaN without
    a site card. The map never reorders scores: the decision rule stays on the score."""
    scores = np.asarray(scores, float)
    method = mapping["method"] if mapping else None
    if method is None:
        return np.full(scores.shape, np.nan)
    if method == "platt":
        return 1 / (1 + np.exp(-(mapping["slope"] * logit(scores) + mapping["intercept"])))
    if method == "isotonic":
        return np.interp(scores, mapping["x"], mapping["y"])
    if method == "none":
        return scores.copy()
    raise ValueError(f"unknown calibration method '{method}' in the site card")


def sweep_thresholds() -> np.ndarray:
    """0.00..1.00 in steps of 0.01, plus the paper's thresholds (which lie on that grid)."""
    grid = {round(i / 100, 2) for i in range(101)} | set(PAPER_THRESHOLDS)
    return np.asarray(sorted(grid), dtype=np.float64)


def wilson_interval(successes: int, total: int, z: float = Z_95) -> tuple[float, float] | None:
    """Wilson score interval of the proportion ``successes / total`` (``z``: the two-sided
    normal quantile, 95% by default); None when ``total`` is 0.

    The one interval for a proportion in covidray (evaluation, drift). It always holds its
    own estimate and lies in [0, 1]: the closed form rounds past the estimate at the edges
    (10 of 10 gives an upper bound of 1 - 1e-16, 0 of 7 a lower bound of 6e-17), which a
    plot's error bars and an "is the reference inside" check must never see.
    """
    if total == 0:
        return None
    if not 0 <= successes <= total:
        raise ValueError(f"wilson_interval: {successes} successes of {total} is not a proportion")
    p = successes / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    return (min(max(0.0, centre - half), p), max(min(1.0, centre + half), p))


def _ratio(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else math.nan


@dataclass(frozen=True)
class ConfusionCounts:
    """Counts at one threshold; the matrix is laid out like scikit-learn's (rows = truth)."""

    threshold: float
    tp: int
    fp: int
    tn: int
    fn: int

    @property
    def sensitivity(self) -> float:
        return _ratio(self.tp, self.tp + self.fn)

    @property
    def specificity(self) -> float:
        return _ratio(self.tn, self.tn + self.fp)

    @property
    def precision(self) -> float:
        return _ratio(self.tp, self.tp + self.fp)

    @property
    def npv(self) -> float:
        return _ratio(self.tn, self.tn + self.fn)

    @property
    def f1(self) -> float:
        return _ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn)

    @property
    def matrix(self) -> list[list[int]]:
        """``[[TN, FP], [FN, TP]]``: rows true non_covid/covid, columns predicted."""
        return [[self.tn, self.fp], [self.fn, self.tp]]

    def to_dict(self) -> dict:
        return {"threshold": self.threshold, "tp": self.tp, "fp": self.fp, "tn": self.tn,
                "fn": self.fn, "sensitivity": self.sensitivity, "specificity": self.specificity,
                "precision": self.precision, "npv": self.npv, "f1": self.f1}


@dataclass
class ScoreSummary:
    """Counts of positives/negatives at or above each threshold, plus a score histogram.

    Add batches in any order with :meth:`add`; combine partial summaries with ``+``.
    """

    thresholds: np.ndarray = field(default_factory=sweep_thresholds)
    positives_at_or_above: np.ndarray | None = None
    negatives_at_or_above: np.ndarray | None = None
    histogram_covid: np.ndarray | None = None
    histogram_non_covid: np.ndarray | None = None
    n_positive: int = 0
    n_negative: int = 0

    def __post_init__(self):
        zeros = lambda n: np.zeros(n, dtype=np.int64)  # noqa: E731
        if self.positives_at_or_above is None:
            self.positives_at_or_above = zeros(len(self.thresholds))
            self.negatives_at_or_above = zeros(len(self.thresholds))
            self.histogram_covid = zeros(HISTOGRAM_BINS)
            self.histogram_non_covid = zeros(HISTOGRAM_BINS)

    def add(self, scores, targets) -> "ScoreSummary":
        """``targets``: 1 = covid, 0 = non_covid (other values are ignored)."""
        scores = np.asarray(scores, dtype=np.float64)
        targets = np.asarray(targets)
        edges = np.linspace(0.0, 1.0, HISTOGRAM_BINS + 1)
        for target, at_or_above, histogram in (
                (1, self.positives_at_or_above, self.histogram_covid),
                (0, self.negatives_at_or_above, self.histogram_non_covid)):
            selected = scores[targets == target]
            # For each threshold t: how many scores are positive under is_positive(., t).
            at_or_above += np.asarray([is_positive(selected, t).sum() for t in self.thresholds])
            histogram += np.histogram(np.clip(selected, 0.0, 1.0), bins=edges)[0]
        self.n_positive += int((targets == 1).sum())
        self.n_negative += int((targets == 0).sum())
        return self

    def __add__(self, other: "ScoreSummary") -> "ScoreSummary":
        assert np.array_equal(self.thresholds, other.thresholds)
        return ScoreSummary(self.thresholds,
                            self.positives_at_or_above + other.positives_at_or_above,
                            self.negatives_at_or_above + other.negatives_at_or_above,
                            self.histogram_covid + other.histogram_covid,
                            self.histogram_non_covid + other.histogram_non_covid,
                            self.n_positive + other.n_positive, self.n_negative + other.n_negative)

    def counts_at(self, threshold: float) -> ConfusionCounts:
        """Counts at any threshold on the sweep grid."""
        matches = np.flatnonzero(np.isclose(self.thresholds, threshold, rtol=0, atol=1e-12))
        if not len(matches):
            raise KeyError(f"threshold {threshold} is not in this summary's thresholds")
        i = matches[0]
        tp, fp = int(self.positives_at_or_above[i]), int(self.negatives_at_or_above[i])
        return ConfusionCounts(float(self.thresholds[i]), tp, fp, self.n_negative - fp,
                               self.n_positive - tp)

    def sweep(self) -> list[ConfusionCounts]:
        return [self.counts_at(t) for t in self.thresholds]


def summarise(scores, targets, thresholds=None) -> ScoreSummary:
    """A :class:`ScoreSummary` of in-memory scores (the thresholds default to the sweep)."""
    thresholds = sweep_thresholds() if thresholds is None else np.asarray(sorted(thresholds), float)
    return ScoreSummary(thresholds).add(scores, targets)


class SortedAUC:
    """Exact ROC AUC (Mann-Whitney, ties count one half) over batches in ascending score order."""

    def __init__(self):
        self._negatives_below = 0  # negatives with a strictly lower score than the current tie
        self._tie_score = -math.inf
        self._tie_pos = 0
        self._tie_neg = 0
        self._pairs = 0.0  # correctly ordered (positive, negative) pairs, ties as 0.5
        self.n_positive = 0
        self.n_negative = 0

    def add(self, scores, targets) -> "SortedAUC":
        scores = np.asarray(scores, dtype=np.float64)
        targets = np.asarray(targets)
        keep = (targets == 0) | (targets == 1)
        scores, targets = scores[keep], targets[keep]
        if len(scores) and (scores[0] < self._tie_score or np.any(np.diff(scores) < 0)):
            raise ValueError("SortedAUC needs scores in ascending order across all batches")
        values, starts = np.unique(scores, return_index=True)
        bounds = np.append(starts, len(scores))
        for value, lo, hi in zip(values, bounds[:-1], bounds[1:]):
            pos = int((targets[lo:hi] == 1).sum())
            neg = (hi - lo) - pos
            if value != self._tie_score:
                self._close_tie()
                self._tie_score = value
            self._tie_pos += pos
            self._tie_neg += neg
        return self

    def _close_tie(self):
        self._pairs += self._tie_pos * (self._negatives_below + 0.5 * self._tie_neg)
        self._negatives_below += self._tie_neg
        self.n_positive += self._tie_pos
        self.n_negative += self._tie_neg
        self._tie_pos = self._tie_neg = 0

    def value(self) -> float:
        self._close_tie()
        if not self.n_positive or not self.n_negative:
            return math.nan
        return float(self._pairs / (self.n_positive * self.n_negative))


def roc_auc(scores, targets) -> float:
    """ROC AUC of in-memory scores (scikit-learn); NaN unless both classes are present.
    Archive-sized data streams through :class:`SortedAUC` instead."""
    from sklearn.metrics import roc_auc_score

    targets = np.asarray(targets)
    keep = (targets == 0) | (targets == 1)
    if len(np.unique(targets[keep])) < 2:
        return math.nan
    return float(roc_auc_score(targets[keep], np.asarray(scores, dtype=np.float64)[keep]))


def metrics_report(summary: ScoreSummary, auc: float, operating_threshold: float) -> dict:
    """Everything the scoring job publishes about a labelled archive, JSON-ready."""
    paper = {f"{t:.2f}": summary.counts_at(t) for t in PAPER_THRESHOLDS}
    operating = summary.counts_at(operating_threshold)
    edges = np.linspace(0.0, 1.0, HISTOGRAM_BINS + 1)
    return {
        "positive_rule": POSITIVE_RULE,
        "images": summary.n_positive + summary.n_negative,
        "covid": summary.n_positive,
        "non_covid": summary.n_negative,
        "roc_auc": json_number(auc),
        "operating_threshold": operating_threshold,
        "paper_thresholds": {k: json_numbers(v.to_dict()) for k, v in paper.items()},
        "confusion_matrices": {
            **{k: {"threshold": v.threshold, "matrix": v.matrix} for k, v in paper.items()},
            "operating": {"threshold": operating.threshold, "matrix": operating.matrix},
        },
        "confusion_matrix_layout": "[[TN, FP], [FN, TP]]: rows true non_covid/covid, "
                                   "columns predicted non_covid/covid",
        "sweep": [dict(json_numbers(c.to_dict()), paper=bool(np.isclose(c.threshold, PAPER_THRESHOLDS).any()))
                  for c in summary.sweep()],
        "histogram": {"edges": edges.round(4).tolist(),
                      "covid": summary.histogram_covid.tolist(),
                      "non_covid": summary.histogram_non_covid.tolist()},
    }


def sweep_csv(report: dict) -> str:
    columns = ["threshold", "tp", "fp", "tn", "fn", "sensitivity", "specificity", "precision",
               "npv", "f1", "paper"]
    lines = [",".join(columns)]
    for row in report["sweep"]:
        lines.append(",".join("" if row[c] is None else f"{row[c]:.2f}" if c == "threshold"
                              else str(row[c]) for c in columns))
    return "\n".join(lines) + "\n"


def json_number(value):
    """A number as JSON can hold it: NaN (an undefined rate) becomes None."""
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def json_numbers(row: dict) -> dict:
    """:func:`json_number` of every value of ``row``."""
    return {k: json_number(v) for k, v in row.items()}


def percent(value) -> str:
    """A rate as people read it: ``0.953`` -> ``95.3%``; None or NaN -> ``n/a``."""
    return "n/a" if json_number(value) is None else f"{100 * value:.1f}%"


def decimal(value, spec: str = ".3f") -> str:
    """A statistic (AUC, Brier score) as text: ``format(value, spec)``; None or NaN -> ``n/a``."""
    return "n/a" if json_number(value) is None else format(value, spec)
