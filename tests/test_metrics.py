"""Metrics are checked against scikit-learn, including scores exactly on a threshold."""

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix, roc_auc_score

from covidray.metrics import (PAPER_THRESHOLDS, ScoreSummary, SortedAUC, is_positive,
                              metrics_report, roc_auc, summarise, sweep_csv, sweep_thresholds)


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
