"""Does a scoring run's input still look like the data the model was validated on?

``covidray evaluate`` keeps a **reference profile** beside the model card
(``drift_reference.json``, :func:`make_reference`): on the validation split, each number of
:mod:`covidray.imaging.profile` and the score as shares of fixed bins (edges at the reference's
quintiles), the categorical mixes (photometric interpretation, manufacturer, view), the
error reasons, and the validation scores themselves (so the positive rate can be read at
any threshold).

Every scoring run folds its rows into a :class:`DriftTally` as they arrive (bounded memory,
no second pass over the images) and :func:`compare` judges it against the reference:

* a number or the score: the population stability index over the reference's bins,
  ``PSI = sum((run - ref) * ln(run / ref))`` (shares smoothed by half a count per bin);
  flagged at ``psi_limit`` or more (0.25 is the usual "significant shift") *and* where
  chance would not give it: PSI is Jeffreys' divergence, and ``PSI * n m / (n + m)`` is
  about chi-square with (bins - 1) degrees of freedom for two samples of one population,
  so a PSI whose p-value is not below :data:`SIGNIFICANCE` is sampling noise (a night of 40
  images reaches 0.25 by chance alone);
* a categorical mix or the error reasons: the largest difference of one value's share,
  flagged at ``share_limit`` or more where a chi-square test of the two mixes agrees;
* the positive rate at the run's threshold: flagged when the validation rate lies outside
  the run's Wilson interval at the same significance (99.9%).

A run with fewer than ``min_images`` scored images is not judged (too few to tell).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from covidray.metrics import is_positive, wilson_interval
from covidray.imaging.profile import NUMBERS

QUANTILES = (0.2, 0.4, 0.6, 0.8)  # bin edges: the reference's quintiles
CATEGORIES = ("photometric", "manufacturer", "view_position")
SMOOTHING = 0.5  # counts added to every bin before shares are compared
SIGNIFICANCE = 0.001  # a statistic past its limit counts only if chance gives it this rarely
Z_SIGNIFICANT = 3.290527  # two-sided normal quantile of SIGNIFICANCE
REFERENCE_KIND = "covidray drift reference"


def bin_index(edges: list[float], values: np.ndarray) -> np.ndarray:
    """Bins ``0 .. 2 * len(edges)``: below the first edge, at it, between it and the next,
    ...: a value equal to an edge has its own bin (a constant reference stays one bin)."""
    edges = np.asarray(edges, dtype=np.float64)
    return np.searchsorted(edges, values, "left") + np.searchsorted(edges, values, "right")


def _shares(counts: np.ndarray) -> np.ndarray:
    smoothed = np.asarray(counts, dtype=np.float64) + SMOOTHING
    return smoothed / smoothed.sum()


def psi(reference_counts, run_counts) -> float:
    ref, run = _shares(reference_counts), _shares(run_counts)
    return float(((run - ref) * np.log(run / ref)).sum())


def psi_p_value(value: float, reference_counts, run_counts) -> float:
    """How often two samples of one population (of these sizes) give a PSI this large."""
    from scipy.stats import chi2

    ref, run = np.asarray(reference_counts), np.asarray(run_counts)
    n, m = ref.sum(), run.sum()
    bins = int(((ref + run) > 0).sum())
    if not n or not m or bins < 2:
        return 1.0
    return float(chi2.sf(value * n * m / (n + m), bins - 1))


def mix_p_value(reference: dict[str, int], run: dict[str, int]) -> float:
    """The chi-square test of two categorical mixes (1.0 where there is one category)."""
    from scipy.stats import chi2_contingency

    values = sorted(set(reference) | set(run))
    if len(values) < 2:
        return 1.0
    table = np.asarray([[reference.get(v, 0) for v in values], [run.get(v, 0) for v in values]])
    return float(chi2_contingency(table + SMOOTHING).pvalue)


def error_reason(error: str) -> str:
    """The kind of an error row's reason: its text before the first ':' (``"read failed"``,
    ``"corrupt or truncated image"``, ...)."""
    return str(error).split(":", 1)[0][:60]


def _mix(values) -> dict[str, int]:
    return {str(k): int(v) for k, v in pd.Series(values, dtype=object).fillna("")
            .astype(str).value_counts().items()}


def make_reference(predictions: pd.DataFrame, errors: pd.DataFrame, threshold: float,
                   model_digest: str, made_from: str) -> dict:
    """The reference profile of a scored split (its ``predictions`` and ``errors`` tables)."""
    numbers = {}
    for name in (*NUMBERS, "score"):
        values = predictions[name].to_numpy(np.float64) if name in predictions else np.zeros(0)
        values = values[np.isfinite(values)]
        if not len(values):
            continue
        edges = sorted(set(np.quantile(values, QUANTILES).tolist()))
        numbers[name] = {"edges": edges,
                         "counts": np.bincount(bin_index(edges, values),
                                               minlength=2 * len(edges) + 1).tolist()}
    scores = predictions["score"].to_numpy(np.float64)
    return {"kind": REFERENCE_KIND, "model_digest": model_digest, "made_from": made_from,
            "images": int(len(predictions)), "failed": int(len(errors)),
            "threshold": float(threshold), "numbers": numbers,
            "categories": {c: _mix(predictions[c]) for c in CATEGORIES if c in predictions},
            "errors": _mix(errors["error"].map(error_reason)) if len(errors) else {},
            "scores": sorted(float(s) for s in scores[np.isfinite(scores)])}


class DriftTally:
    """A run's rows folded into the reference's bins and mixes, batch by batch."""

    def __init__(self, reference: dict, threshold: float):
        self.reference, self.threshold = reference, threshold
        self.numbers = {name: np.zeros(2 * len(spec["edges"]) + 1, dtype=np.int64)
                        for name, spec in reference["numbers"].items()}
        self.categories = {c: {} for c in reference["categories"]}
        self.errors: dict[str, int] = {}
        self.scored = self.failed = self.positives = 0

    def add(self, batch: pd.DataFrame) -> None:
        ok = (batch["error"] == "").to_numpy()
        scored = batch[ok]
        self.scored += len(scored)
        self.failed += int((~ok).sum())
        for name, counts in self.numbers.items():
            if name not in scored:
                continue
            values = scored[name].to_numpy(np.float64)
            values = values[np.isfinite(values)]
            counts += np.bincount(bin_index(self.reference["numbers"][name]["edges"], values),
                                  minlength=len(counts))
        for column, mix in self.categories.items():
            for value, count in _mix(scored[column]).items() if column in scored else ():
                mix[value] = mix.get(value, 0) + count
        for reason, count in _mix(batch.loc[~ok, "error"].map(error_reason)).items():
            self.errors[reason] = self.errors.get(reason, 0) + count
        self.positives += int(is_positive(scored["score"].to_numpy(np.float64),
                                          self.threshold).sum())


def _share_difference(reference: dict[str, int], run: dict[str, int]) -> tuple[float, str]:
    ref_total, run_total = sum(reference.values()) or 1, sum(run.values()) or 1
    worst, which = 0.0, ""
    for value in sorted(set(reference) | set(run)):
        difference = abs(run.get(value, 0) / run_total - reference.get(value, 0) / ref_total)
        if difference > worst:
            worst, which = difference, value
    return worst, which


def compare(tally: DriftTally, psi_limit: float, share_limit: float, min_images: int) -> dict:
    """What ``drift.json`` holds: each quantity's statistic, limit and verdict, and
    ``drifted``, the quantities flagged (empty when none, or when too few images)."""
    reference = tally.reference
    quantities = {}
    for name, counts in tally.numbers.items():
        value = psi(reference["numbers"][name]["counts"], counts)
        p_value = psi_p_value(value, reference["numbers"][name]["counts"], counts)
        quantities[name] = {"statistic": "psi", "value": round(value, 4), "limit": psi_limit,
                            "p_value": p_value,
                            "drifted": value >= psi_limit and p_value < SIGNIFICANCE,
                            "bins": reference["numbers"][name]["edges"],
                            "reference_counts": reference["numbers"][name]["counts"],
                            "run_counts": counts.tolist()}
    mixes = {**{c: (reference["categories"][c], tally.categories[c]) for c in tally.categories},
             "error_reasons": (reference["errors"], tally.errors)}
    for name, (ref_mix, run_mix) in mixes.items():
        if not sum(run_mix.values()):
            continue
        value, which = _share_difference(ref_mix, run_mix)
        p_value = mix_p_value(ref_mix, run_mix)
        quantities[name] = {"statistic": "largest share difference", "value": round(value, 4),
                            "limit": share_limit, "p_value": p_value,
                            "drifted": value >= share_limit and p_value < SIGNIFICANCE,
                            "most_changed": which, "reference": ref_mix, "run": run_mix}
    scores = np.asarray(reference["scores"])
    expected = float(is_positive(scores, tally.threshold).mean()) if len(scores) else None
    if expected is not None and tally.scored:
        low, high = wilson_interval(tally.positives, tally.scored, Z_SIGNIFICANT)
        quantities["positive_rate"] = {
            "statistic": "positive rate", "value": round(tally.positives / tally.scored, 4),
            "reference": round(expected, 4), "interval": [round(low, 4), round(high, 4)],
            "threshold": tally.threshold,
            "drifted": not low <= expected <= high}
    judged = tally.scored >= min_images
    drifted = [n for n, q in quantities.items() if q["drifted"]] if judged else []
    return {"drifted": drifted, "judged": judged, "images": tally.scored,
            "failed": tally.failed, "min_images": min_images,
            "reference": {k: reference[k] for k in ("made_from", "model_digest", "images")},
            "quantities": quantities}


def verdict(drift: dict) -> str:
    """One line for the run's log and summary."""
    if not drift.get("judged", False):
        return (drift.get("why") or f"drift not judged: {drift['images']} images scored, fewer "
                f"than --drift-min-images {drift['min_images']}")
    if not drift["drifted"]:
        return f"no drift: {drift['images']} images look like the reference"
    shown = ", ".join(f"{n} {drift['quantities'][n]['value']:g}" for n in drift["drifted"])
    return f"DRIFT in {len(drift['drifted'])} quantities: {shown}"


def history_row(summary: dict) -> dict:
    """A nightly run's line in the output's drift history: when, how many images, what
    drifted, and each quantity's statistic."""
    drift = summary["drift"]
    return {"run": summary["run"], "images": summary.get("new", summary["scored"]),
            "judged": drift["judged"], "drifted": ";".join(drift["drifted"]),
            **{name: value for name, value in drift["values"].items()}}


class DriftDetected(RuntimeError):
    """``--fail-on-drift``: the run published its results, and its inputs drifted."""
