"""A site adopts a model on its own evidence: the site card's threshold, calibration and
refusals (pure, on generated scores), and `covidray calibrate` on the real S3 server and
Ray (generated images)."""

import numpy as np
import pandas as pd
import pytest

from covidray.evaluation import (MIN_PER_CLASS, SampleTooSmall, build_site_card, calibrated,
                                 choose_calibration)
from covidray.metrics import summarise


def sample_of(scores, targets, groups=None) -> pd.DataFrame:
    n = len(scores)
    return pd.DataFrame({"score": scores, "target": targets,
                         "group": groups if groups is not None else [f"p{i}" for i in range(n)],
                         "source": np.where(np.arange(n) % 2, "ward", "icu")})


def card_of(frame, target=0.95, **kwargs):
    return build_site_card(frame, 0, site="st-elsewhere", model_uri="s3://m/model.onnx",
                           digest="abc", labelled_uri="s3://site/sample.csv",
                           target_sensitivity=target, breakdown_columns=["source"],
                           bootstrap=kwargs.get("bootstrap", 200), seed=0)


def test_the_site_threshold_reaches_the_target_sensitivity_and_is_the_highest_that_does():
    rng = np.random.default_rng(1)
    targets = np.r_[np.ones(60, int), np.zeros(140, int)]
    scores = np.clip(rng.normal(0.35 + 0.3 * targets, 0.15), 0, 1)
    for target in (0.8, 0.9, 0.95):
        card = card_of(sample_of(scores, targets), target)
        point = card["operating_point"]
        assert point["sensitivity"] >= target
        above = np.nextafter(point["threshold"], 1)  # any higher threshold falls short
        assert summarise(scores, targets, [above]).counts_at(above).sensitivity < target
        assert point["sensitivity_ci95"][0] < point["sensitivity"] < point["sensitivity_ci95"][1]
    assert card["roc_auc_ci95"][0] < card["roc_auc"] < card["roc_auc_ci95"][1]
    assert [row["source"] for row in card["by"]["source"]] == ["icu", "ward"]
    assert (card["sample"]["covid"], card["sample"]["non_covid"]) == (60, 140)


def test_calibration_lowers_the_brier_score_of_a_miscalibrated_model_on_rows_it_never_saw():
    """A model whose scores are the true probability to the power 4 (far too low): the map
    is chosen and fitted on one half of the site's sample and judged on the other half."""
    rng = np.random.default_rng(2)
    truth = rng.uniform(0, 1, 1200)
    targets = (rng.uniform(0, 1, 1200) < truth).astype(int)
    scores = truth ** 4
    fit, held = slice(0, 600), slice(600, None)
    mapping, measured, _ = choose_calibration(scores[fit], targets[fit],
                                              [f"p{i}" for i in range(600)], seed=0)
    assert mapping["method"] in ("platt", "isotonic")
    assert measured[mapping["method"]]["log_loss"] < measured["none"]["log_loss"]

    def brier(p):
        return float(np.mean((p - targets[held]) ** 2))
    raw, after = brier(scores[held]), brier(calibrated(mapping, scores[held]))
    assert after < 0.85 * raw, (raw, after)
    # a map keeps the order of the scores (the AUC is the model's, not the map's)
    ordered = np.sort(scores[held])
    assert np.all(np.diff(calibrated(mapping, ordered)) >= -1e-12)


def test_a_well_calibrated_model_keeps_its_scores_where_no_map_beats_them():
    rng = np.random.default_rng(3)
    truth = rng.uniform(0.05, 0.95, 400)
    targets = (rng.uniform(0, 1, 400) < truth).astype(int)
    mapping, measured, held = choose_calibration(truth, targets, [f"p{i}" for i in range(400)],
                                                 seed=0)
    if mapping["method"] == "none":
        assert np.array_equal(held, truth)
    else:  # a map may win by a hair; it must then really be lower held out
        assert measured[mapping["method"]]["log_loss"] < measured["none"]["log_loss"]


@pytest.mark.parametrize("covid, non_covid", [(MIN_PER_CLASS - 1, 40), (40, 0)])
def test_too_small_and_one_class_samples_are_refused_with_the_minimum_stated(covid, non_covid):
    targets = np.r_[np.ones(covid, int), np.zeros(non_covid, int)]
    frame = sample_of(np.linspace(0, 1, len(targets)), targets)
    with pytest.raises(SampleTooSmall) as refused:
        card_of(frame)
    assert str(refused.value) == (
        f"the labelled sample s3://site/sample.csv (scored images) has {covid} COVID and "
        f"{non_covid} non-COVID images; a site card needs at least {MIN_PER_CLASS} of each (an "
        "AUC, a threshold and a calibration map from fewer would be noise): label more of the "
        "site's studies")


def test_calibrate_writes_the_site_card_of_the_model_and_refuses_a_small_sample_first(
        storage, trained_run, prefix, ray_local):
    from covidray.layout import RunLayout
    from covidray.model_card import model_digest
    from covidray.stages.calibrate import CalibrateConfig, calibrate_site

    from conftest import upload_synthetic

    model = RunLayout(trained_run["run"]).onnx
    small = upload_synthetic(storage, f"{prefix}/small", MIN_PER_CLASS - 1, 30)
    refused = CalibrateConfig(model=model, labelled=small, site="tiny",
                              output=f"{prefix}/sites/tiny")
    with pytest.raises(SampleTooSmall, match=f"has {MIN_PER_CLASS - 1} COVID and 30 non-COVID"):
        calibrate_site(refused, storage)
    assert not list(storage.list_files(refused.output))  # refused before anything was written

    sample = upload_synthetic(storage, f"{prefix}/sample", 24, 24)
    config = CalibrateConfig(model=model, labelled=sample, site="st-elsewhere",
                             output=f"{prefix}/sites/st-elsewhere", target_sensitivity=0.9,
                             bootstrap=100)
    headline = calibrate_site(config, storage)
    card = storage.read_json(config.layout.site_card)
    assert card["model_digest"] == model_digest(storage.read_bytes(model))
    assert (card["sample"]["images"], card["sample"]["covid"]) == (48, 24)
    assert card["operating_point"]["sensitivity"] >= 0.9
    assert headline["threshold"] == card["operating_point"]["threshold"]
    reference = storage.read_json(config.layout.drift_reference)
    assert reference["images"] == 48 and reference["model_digest"] == card["model_digest"]
    assert storage.read_bytes(config.layout.reliability_png)[:8] == b"\x89PNG\r\n\x1a\n"
    print(headline["summary"])
