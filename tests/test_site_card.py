"""A site adopts a model on its own evidence: the site card's threshold, calibration and
refusals (pure, on generated scores), and `covidray calibrate` on the real S3 server and
Ray (generated images)."""

import uuid

import numpy as np
import pandas as pd
import pytest

from covidray.evaluation import (MIN_PER_CLASS, SampleTooSmall, build_site_card,
                                 choose_calibration)
from covidray.metrics import calibrated, summarise


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


@pytest.fixture(scope="module")
def site(storage, trained_run, ray_local):
    """`covidray calibrate` of the session's model on a generated labelled sample of 24 + 24
    (the sample is also the archive the scoring tests score)."""
    from covidray.layout import RunLayout
    from covidray.stages.calibrate import CalibrateConfig, calibrate_site

    from conftest import upload_synthetic

    root = f"{trained_run['root']}/site-{uuid.uuid4().hex[:6]}"
    model = RunLayout(trained_run["run"]).onnx
    sample = upload_synthetic(storage, f"{root}/sample", 24, 24)
    config = CalibrateConfig(model=model, labelled=sample, site="st-elsewhere",
                             output=f"{root}/sites/st-elsewhere", target_sensitivity=0.9,
                             bootstrap=100)
    return {"root": root, "model": model, "sample": sample, "config": config,
            "headline": calibrate_site(config, storage)}


def test_calibrate_writes_the_site_card_of_the_model_and_refuses_a_small_sample_first(
        storage, site, prefix):
    from covidray.model_card import model_digest
    from covidray.stages.calibrate import CalibrateConfig, calibrate_site

    from conftest import upload_synthetic

    small = upload_synthetic(storage, f"{prefix}/small", MIN_PER_CLASS - 1, 30)
    refused = CalibrateConfig(model=site["model"], labelled=small, site="tiny",
                              output=f"{prefix}/sites/tiny")
    with pytest.raises(SampleTooSmall, match=f"has {MIN_PER_CLASS - 1} COVID and 30 non-COVID"):
        calibrate_site(refused, storage)
    assert not list(storage.list_files(refused.output))  # refused before anything was written

    config, headline = site["config"], site["headline"]
    card = storage.read_json(config.layout.site_card)
    assert card["model_digest"] == model_digest(storage.read_bytes(site["model"]))
    assert (card["sample"]["images"], card["sample"]["covid"]) == (48, 24)
    assert card["operating_point"]["sensitivity"] >= 0.9
    assert headline["threshold"] == card["operating_point"]["threshold"]
    reference = storage.read_json(config.layout.drift_reference)
    assert reference["images"] == 48 and reference["model_digest"] == card["model_digest"]
    assert storage.read_bytes(config.layout.reliability_png)[:8] == b"\x89PNG\r\n\x1a\n"
    print(headline["summary"])


def test_the_site_page_shows_the_card_in_a_real_browser(storage, site, tmp_path):
    """site_report.html in headless Chromium: the card's tables as HTML tables, the ROC with
    the site's point and the reliability diagrams loaded, the limits stated."""
    from covidray.report import Table, site_blocks

    from conftest import in_a_browser

    layout = site["config"].layout
    card = storage.read_json(layout.site_card)
    shown = in_a_browser(storage.read_bytes(layout.report), tmp_path)
    tables = [b for b in site_blocks(card) if isinstance(b, Table)]
    assert [(t["header"], t["rows"]) for t in shown["tables"]] == [
        (t.header, t.rows) for t in tables]
    assert [i["loaded"] for i in shown["images"]] == [True, True]
    assert "ROC on the site's labelled sample" in shown["images"][0]["caption"]
    assert f"Threshold {card['operating_point']['threshold']:.4g}" in shown["text"]
    assert "It is not a clinical validation" in shown["text"]


def with_isotonic_map(storage, site, prefix) -> str:
    """The site's card with an isotonic map that visibly moves every score (the session's
    2-epoch model may earn no map), written under ``prefix``."""
    card = storage.read_json(site["config"].layout.site_card)
    card["calibration"]["map"] = {"method": "isotonic", "x": [0.0, 1.0], "y": [0.2, 0.6]}
    return storage.write_json(f"{prefix}/card/site_card.json", card)


def test_scoring_with_a_site_card_applies_its_threshold_map_and_reference(storage, site,
                                                                           prefix):
    from covidray.layout import ScoreLayout
    from covidray.stages.score import ScoreConfig, score_archive

    card = storage.read_json(site["config"].layout.site_card)
    threshold = card["operating_point"]["threshold"]
    output = ScoreLayout(f"{prefix}/out")
    summary = score_archive(ScoreConfig(site["sample"], site["model"], output.root,
                                        site_card=with_isotonic_map(storage, site, prefix)),
                            storage)
    assert summary["threshold"] == threshold
    assert summary["threshold_source"].startswith(f"site card {prefix}/card/site_card.json of "
                                                  "st-elsewhere")
    predictions = storage.read_parquet_dir(output.predictions)
    assert len(predictions) == 48 and (predictions["threshold"] == threshold).all()
    assert np.allclose(predictions["probability"], 0.2 + 0.4 * predictions["score"])
    assert ((predictions["score"] >= threshold)
            == (predictions["prediction"] == "covid")).all()
    # drift is judged against the site's own sample: the same 48 images, nothing drifted
    assert summary["drift"]["judged"] and summary["drift"]["drifted"] == []


def test_a_site_card_of_another_model_or_beside_a_threshold_is_refused_before_any_work(
        storage, site, prefix):
    from covidray.model_card import StaleModelCard
    from covidray.stages.score import ScoreConfig, score_archive

    card = storage.read_json(site["config"].layout.site_card)
    other = storage.write_json(f"{prefix}/other/site_card.json",
                               {**card, "model_digest": "0" * 64})
    output = f"{prefix}/out"
    with pytest.raises(StaleModelCard, match="is the site card of another model"):
        score_archive(ScoreConfig(site["sample"], site["model"], output, site_card=other),
                      storage)
    with pytest.raises(ValueError, match="--threshold and --site-card both set"):
        score_archive(ScoreConfig(site["sample"], site["model"], output, threshold=0.5,
                                  site_card=site["config"].layout.site_card), storage)
    assert not list(storage.list_files(output))


def test_a_nightly_view_moves_to_the_site_card_whole_and_stays_consistent(storage, site,
                                                                         prefix):
    """A view made without a site card, then a run with one and nothing new: every row of
    the view is re-applied at the site's threshold with the site's probability; a new
    object scored under the card joins it the same way."""
    from covidray.layout import ScoreLayout
    from covidray.metrics import predicted_labels
    from covidray.stages.score import ScoreConfig, score_archive

    archive = f"{prefix}/archive"
    for name in ("a", "b", "c"):
        storage.copy(f"{site['root']}/sample/{first_image(storage, site)}",
                     f"{archive}/covid/{name}.png")
    output = ScoreLayout(f"{prefix}/nightly")
    plain = ScoreConfig(archive, site["model"], output.root, incremental=True, threshold=0.5)
    score_archive(plain, storage)
    card = with_isotonic_map(storage, site, prefix)
    at_site = ScoreConfig(archive, site["model"], output.root, incremental=True, site_card=card)
    first = score_archive(at_site, storage)
    assert first["new"] == 0
    storage.copy(f"{archive}/covid/a.png", f"{archive}/covid/d.png")
    second = score_archive(at_site, storage)
    assert second["new"] == 1
    current = storage.read_json(output.current)
    view = pd.concat([storage.read_table(p) for p in storage.list_files(current["state"],
                                                                        (".parquet",))])
    threshold = storage.read_json(card)["operating_point"]["threshold"]
    assert len(view) == 4 and (view["threshold"] == threshold).all()
    assert np.allclose(view["probability"], 0.2 + 0.4 * view["score"])
    assert (view["prediction"] == predicted_labels(view["score"], threshold)).all()
    assert current["calibration"] and current["threshold"] == threshold


def first_image(storage, site) -> str:
    manifest = storage.read_table(site["sample"])
    return manifest["file"].iloc[0]
