"""Metrics are checked against scikit-learn, including scores exactly on a threshold."""

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix, roc_auc_score

from covidray import drift, evaluation
from covidray.metrics import (PAPER_THRESHOLDS, Z_95, ScoreSummary, SortedAUC, decimal,
                              is_positive, metrics_report, percent, roc_auc, summarise, sweep_csv,
                              sweep_thresholds, wilson_interval)


@pytest.fixture
def scores_and_targets():
    rng = np.random.default_rng(7)
    targets = rng.integers(0, 2, 500)
    scores = np.clip(rng.normal(0.3 + 0.4 * targets, 0.2), 0, 1)
    # Scores that sit exactly on sweep thresholds, and ties across classes.
    scores[:40] = np.round(rng.choice(sweep_thresholds(), 40), 2)
    scores[40:60] = 0.25
    return scores, targets


def test_sweep_contains_grid_and_paper_thresholds():
    thresholds = sweep_thresholds()
    assert len(thresholds) == 101
    assert thresholds[0] == 0.0 and thresholds[-1] == 1.0
    for t in PAPER_THRESHOLDS:
        assert np.isclose(thresholds, t).sum() == 1


def test_sweep_counts_match_sklearn_at_every_threshold(scores_and_targets):
    scores, targets = scores_and_targets
    summary = summarise(scores, targets)
    for counts in summary.sweep():
        predicted = is_positive(scores, counts.threshold).astype(int)
        expected = confusion_matrix(targets, predicted, labels=[0, 1])
        assert counts.matrix == expected.tolist(), counts.threshold


def test_score_equal_to_threshold_is_positive():
    summary = summarise([0.10, 0.0999999], [1, 1], [0.10])
    assert summary.counts_at(0.10).tp == 1 and summary.counts_at(0.10).fn == 1


def test_batches_add_up_to_the_whole(scores_and_targets):
    scores, targets = scores_and_targets
    whole = summarise(scores, targets)
    parts = ScoreSummary().add(scores[:123], targets[:123]) + \
        ScoreSummary().add(scores[123:], targets[123:])
    assert [c.to_dict() for c in parts.sweep()] == [c.to_dict() for c in whole.sweep()]
    assert (parts.histogram_covid == whole.histogram_covid).all()


def test_auc_matches_sklearn_with_ties(scores_and_targets):
    scores, targets = scores_and_targets
    assert roc_auc(scores, targets) == pytest.approx(roc_auc_score(targets, scores), abs=1e-12)


def test_sorted_auc_over_batches_matches_whole(scores_and_targets):
    scores, targets = scores_and_targets
    order = np.argsort(scores, kind="stable")
    auc = SortedAUC()
    for chunk in np.array_split(order, 7):  # batch edges fall inside runs of tied scores
        auc.add(scores[chunk], targets[chunk])
    assert auc.value() == pytest.approx(roc_auc_score(targets, scores), abs=1e-12)


def test_sorted_auc_rejects_unsorted_batches():
    auc = SortedAUC().add([0.5, 0.6], [0, 1])
    with pytest.raises(ValueError, match="ascending"):
        auc.add([0.1], [1])


def test_sensitivity_specificity_ratios():
    summary = summarise([0.9, 0.8, 0.2, 0.1, 0.7], [1, 1, 1, 0, 0], [0.5])
    at = summary.counts_at(0.5)
    assert (at.tp, at.fn, at.tn, at.fp) == (2, 1, 1, 1)
    assert at.sensitivity == pytest.approx(2 / 3)
    assert at.specificity == pytest.approx(1 / 2)
    assert at.precision == pytest.approx(2 / 3)
    assert at.npv == pytest.approx(1 / 2)
    assert at.f1 == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))


def test_report_has_paper_and_operating_matrices(scores_and_targets):
    scores, targets = scores_and_targets
    report = metrics_report(summarise(scores, targets), roc_auc(scores, targets), 0.5)
    assert set(report["confusion_matrices"]) == {"0.10", "0.15", "0.20", "0.25", "operating"}
    expected = confusion_matrix(targets, is_positive(scores, 0.15).astype(int), labels=[0, 1])
    assert report["confusion_matrices"]["0.15"]["matrix"] == expected.tolist()
    assert sum(row["paper"] for row in report["sweep"]) == 4
    csv = sweep_csv(report).splitlines()
    assert csv[0].startswith("threshold,tp,fp,tn,fn,sensitivity,specificity")
    assert len(csv) == 102


def test_undefined_ratio_is_none_in_report():
    report = metrics_report(summarise([0.2, 0.4], [0, 0]), roc_auc([0.2, 0.4], [0, 0]), 0.5)
    assert report["roc_auc"] is None
    assert report["paper_thresholds"]["0.10"]["sensitivity"] is None


def test_wilson_interval_holds_its_estimate_for_every_count_up_to_500():
    """Every k of n, 1 <= n <= 500: 0 <= lower <= k/n <= upper <= 1, at 95% and at the drift
    watch's z. Unclamped, 10 of 10 gives an upper bound below 1.0 and 0 of 7 a lower bound
    above 0.0, and the forest plot refused the negative error bar."""
    for z in (Z_95, drift.Z_SIGNIFICANT):
        for n in range(1, 501):
            for k in range(n + 1):
                lower, upper = wilson_interval(k, n, z)
                assert 0.0 <= lower <= k / n <= upper <= 1.0, (k, n, z, lower, upper)
    assert wilson_interval(10, 10)[1] == 1.0 and wilson_interval(0, 7)[0] == 0.0


def test_wilson_interval_known_values_and_refusals():
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(0, 0) is None
    for bad in ((11, 10), (-1, 10)):
        with pytest.raises(ValueError, match="not a proportion"):
            wilson_interval(*bad)


def test_one_wilson_interval_serves_evaluation_and_drift():
    assert evaluation.wilson_interval is wilson_interval
    assert drift.wilson_interval is wilson_interval
    assert not hasattr(drift, "wilson")


def test_numbers_as_text_say_n_a_for_a_missing_value():
    assert percent(0.9534) == "95.3%" and decimal(0.91234) == "0.912"
    for missing in (None, float("nan"), np.float64("nan")):
        assert percent(missing) == "n/a" and decimal(missing) == "n/a"
