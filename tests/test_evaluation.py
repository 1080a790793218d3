"""The evaluation report: intervals, operating point from validation, breakdowns."""

import uuid

import numpy as np
import pandas as pd
import pytest
from sklearn.calibration import calibration_curve
from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score

from covidray.evaluation import (average_precision, bootstrap_interval, breakdown, calibration,
                                 evaluate_split, labelled, threshold_for_sensitivity,
                                 with_columns)
from covidray.figures import histograms_by_png
from covidray.layout import EvalLayout, RunLayout, ScoreLayout
from covidray.metrics import is_positive
from covidray.imaging.recipe import RECIPE
from covidray.stages.evaluate import EvaluateConfig, evaluate_run
from covidray.stages.score import ScoreConfig, score_archive

from conftest import in_a_browser, upload_synthetic



def frame(n=300, seed=0):
    rng = np.random.default_rng(seed)
    target = rng.integers(0, 2, n)
    score = np.clip(rng.normal(0.35 + 0.3 * target, 0.2), 0, 1).round(2)  # many ties
    return pd.DataFrame({"uri": [f"s3://b/{i}.png" for i in range(n)], "score": score,
                         "label": np.where(target == 1, "covid", "non_covid"),
                         "group": [f"p{i // 3}" for i in range(n)],
                         "source": np.where(np.arange(n) % 5 == 0, "hospital-a", "hospital-b")})


def test_average_precision_matches_sklearn_with_ties():
    data = labelled(frame())
    assert average_precision(data["score"], data["target"]) == pytest.approx(
        average_precision_score(data["target"], data["score"]), abs=1e-12)


def test_threshold_for_sensitivity_is_the_highest_reaching_the_target():
    data = labelled(frame())
    for target in (0.8, 0.9, 0.95, 1.0):
        t = threshold_for_sensitivity(data["score"], data["target"], target)
        positives = data.loc[data["target"] == 1, "score"]
        assert is_positive(positives, t).mean() >= target
        higher = positives[positives > t]
        if len(higher):
            assert is_positive(positives, higher.min()).mean() < target


def test_bootstrap_resamples_whole_patients():
    data = labelled(frame())  # every patient has exactly 3 images
    whole_patients = bootstrap_interval(data, lambda s, t: float(len(s) % 3 == 0), 200, seed=0)
    assert whole_patients == (1.0, 1.0)
    low, high = bootstrap_interval(data, lambda s, t: roc_auc_score(t, s), 300, seed=0)
    assert low < roc_auc_score(data["target"], data["score"]) < high


def test_brier_and_reliability_bins():
    data = labelled(frame())
    result = calibration(data["score"], data["target"])
    assert result["brier"] == pytest.approx(brier_score_loss(data["target"], data["score"]))
    assert sum(b["images"] for b in result["bins"]) == len(data)
    filled = [b for b in result["bins"] if b["images"]]
    fraction, mean = calibration_curve(data["target"], data["score"], n_bins=10)
    assert [b["fraction_covid"] for b in filled] == pytest.approx(fraction.tolist())
    assert [b["mean_score"] for b in filled] == pytest.approx(mean.tolist())


def test_breakdown_gives_auc_only_where_both_classes_exist():
    data = labelled(frame())
    data.loc[data["source"] == "hospital-a", "target"] = 1
    rows = {r["source"]: r for r in breakdown(data, "source", 0.5)}
    assert rows["hospital-a"]["roc_auc"] is None and rows["hospital-a"]["specificity"] is None
    part = data[data["source"] == "hospital-b"]
    assert rows["hospital-b"]["roc_auc"] == pytest.approx(roc_auc_score(part["target"], part["score"]))


def test_grouping_columns_join_from_the_index_and_missing_values_form_a_group():
    predictions = frame(6)
    index = pd.DataFrame({"uri": predictions["uri"], "sex": ["F", "M", None, "F", np.nan, "M"]})
    joined = labelled(with_columns(predictions, index, ["source", "sex", "absent"]))
    assert sorted(joined["sex"].unique()) == ["F", "M", "unknown"]
    assert histograms_by_png(joined, "sex").startswith(b"\x89PNG")
    assert {r["sex"] for r in breakdown(joined, "sex", 0.5)} == {"F", "M", "unknown"}


def test_operating_point_comes_from_validation_not_test():
    val, test = labelled(frame(seed=1)), labelled(frame(seed=2))
    result = evaluate_split(val, test, 0.9, ["source"], bootstrap=50)
    point = result["operating_point"]
    assert point["chosen_on"] == "val"
    assert point["threshold"] == threshold_for_sensitivity(val["score"], val["target"], 0.9)
    assert point["val"]["sensitivity"] >= 0.9
    test_at = is_positive(test.loc[test["target"] == 1, "score"], point["threshold"]).mean()
    assert point["test"]["sensitivity"] == pytest.approx(test_at)


def degenerate(sources: dict[str, tuple[int, int, float]], seed: int = 0) -> pd.DataFrame:
    """A labelled table: per source (covid images, non_covid images, score of every image)."""
    rows = []
    for source, (covid, non_covid, score) in sources.items():
        for i, label in enumerate(["covid"] * covid + ["non_covid"] * non_covid):
            rows.append({"uri": f"s3://b/{source}/{i}.png", "score": score, "label": label,
                         "group": f"{source}-{i}", "source": source})
    return labelled(pd.DataFrame(rows))


@pytest.mark.parametrize("test_sources", [
    # 10 of 10 COVID found, 0 of 7 flagged, a single image, and a source of no known value
    {"all-found": (10, 0, 0.9), "none-flagged": (0, 7, 0.1), "single": (1, 0, 0.05),
     "unknown": (2, 2, 0.5)},
    {"only-covid": (13, 0, 0.8)},  # one class in the whole test split: no ROC, no AUC
    {"one-image": (0, 1, 0.3)},
], ids=["subgroups-at-0-and-1", "one-class", "one-image"])
def test_degenerate_subgroups_still_give_a_whole_report(tmp_path, test_sources):
    """Rates of exactly 0 or 1, intervals of zero width, one class, one image: every figure
    and table is written, every interval holds its point, and n/a stands where a number is
    undefined (before: 'xerr' must not contain negative values)."""
    from covidray.figures import forest_png
    from covidray.report import write_report
    from covidray.storage import Storage

    val = degenerate({"a": (10, 10, 0.7), "b": (5, 5, 0.2)})
    test = degenerate(test_sources)
    result = evaluate_split(val, test, 0.9, ["source"], bootstrap=20)
    result.update(run="degenerate", weights="none", drift={"quantities": {}, "judged": False,
                                                            "images": 0, "why": "not judged"})
    for row in result["breakdown"]["source"]:
        for measure in ("sensitivity", "specificity"):
            if row[measure] is None:
                assert row[f"{measure}_ci95"] is None
                continue
            low, high = row[f"{measure}_ci95"]
            assert 0 <= low <= row[measure] <= high <= 1, (row, measure)
    layout = EvalLayout(str(tmp_path / "eval"))
    forest = forest_png(result["breakdown"], result["operating_point"]["threshold"])
    write_report(Storage(), layout, result, test, {"forest.png": forest})
    report = tmp_path / "eval" / "report"
    pngs = sorted(p.name for p in report.glob("*.png"))
    assert "forest.png" in pngs and "roc_pr.png" in pngs and "calibration.png" in pngs
    assert all((report / name).read_bytes().startswith(b"\x89PNG") for name in pngs)
    summary = (report / "summary.md").read_text()
    assert "## By source" in summary and "nan" not in summary.lower()
    if test["target"].nunique() < 2:
        assert "ROC AUC n/a" in summary


def test_figures_draw_a_missing_value_a_zero_width_interval_and_no_subgroup_at_all():
    from covidray.figures import calibration_png, forest_png, histograms_by_png, roc_pr_png

    rows = [{"source": "missing", "images": 0, "sensitivity": None, "sensitivity_ci95": None,
             "specificity": float("nan"), "specificity_ci95": None},
            {"source": "zero-width", "images": 3, "sensitivity": 1.0,
             "sensitivity_ci95": (1.0, 1.0), "specificity": 0.5, "specificity_ci95": None},
            {"source": "rounded", "images": 10, "sensitivity": 1.0,
             "sensitivity_ci95": (0.72, 0.9999999999999999), "specificity": 0.0,
             "specificity_ci95": (5.6e-17, 0.35)}]  # what the unclamped interval gave
    for breakdown_rows in ({"source": rows}, {}, {"source": []}):
        assert forest_png(breakdown_rows, 0.5).startswith(b"\x89PNG")
    empty = labelled(frame(0))
    assert histograms_by_png(empty, "source").startswith(b"\x89PNG")
    assert roc_pr_png([], [], float("nan"), float("nan")).startswith(b"\x89PNG")
    assert calibration_png(calibration([], [])).startswith(b"\x89PNG")


@pytest.fixture(scope="module")
def evaluated(storage, trained_run, ray_local):
    """``covidray evaluate`` on a copy of the shared run (its model card stays with the copy)."""
    run = f"{trained_run['root']}/evaluated-run"
    storage.copy_prefix(trained_run["run"], run)
    layout = EvalLayout(f"{trained_run['root']}/eval")
    config = EvaluateConfig(run=run, eval_dir=layout.root, target_sensitivity=0.9, bootstrap=100)
    return {"run": run, "layout": layout, "headline": evaluate_run(config, storage)}


def test_evaluate_writes_its_report_when_a_source_has_every_covid_found_and_none_flagged(
        storage, trained_run, ray_local):
    """The real-data crash, on generated images: the test split's 'all-found' source holds
    10 COVID images the model all calls positive, 'none-flagged' 7 non-COVID images it all
    calls negative (sensitivity 10/10, specificity 7/7: intervals whose closed form rounds
    past 1.0). ``covidray evaluate`` writes the report and the forest plot."""
    root = f"{trained_run['root']}/degenerate-{uuid.uuid4().hex[:6]}"
    run = RunLayout(f"{root}/run")
    storage.copy_prefix(trained_run["run"], run.root)
    manifest = upload_synthetic(storage, f"{root}/data", 30, 30, seed=5)
    first = ScoreLayout(f"{root}/first-look")
    score_archive(ScoreConfig(archive=manifest, model=run.onnx, output=first.root,
                              threshold=0.5), storage)
    scored = storage.read_parquet_dir(first.predictions)
    patients = scored.groupby("group").agg(label=("label", "first"), low=("score", "min"),
                                           high=("score", "max"))  # 2 images per patient
    covid, non_covid = (patients[patients["label"] == label] for label in ("covid", "non_covid"))

    def split_at(patient):
        """Val's COVID images are ``patient``'s two, so the threshold chosen at sensitivity
        0.9 is its lower score: COVID patients wholly at or above it and non-COVID ones
        wholly below it form the test sources."""
        threshold = covid.loc[patient, "low"]
        found = covid[(covid["low"] >= threshold) & (covid.index != patient)].index[:5]
        flagged_none = non_covid[non_covid["high"] < threshold].index[:4]
        return min(len(found) / 5, len(flagged_none) / 4), patient, found, flagged_none

    enough, patient, found, flagged_none = max((split_at(p) for p in covid.index),
                                               key=lambda option: option[0])
    assert enough >= 1, "the session's model does not separate the synthetic classes at all"
    val_patients = non_covid.index.difference(flagged_none).union([patient])
    rows = scored[["uri", "label", "source", "group"]].assign(patient_id=scored["group"], copy=0)
    rows["split"] = np.where(rows["group"].isin(found.union(flagged_none)), "test",
                             np.where(rows["group"].isin(val_patients), "val", "train"))
    rows.loc[rows["group"].isin(found), "source"] = "all-found"
    rows.loc[rows["group"].isin(flagged_none), "source"] = "none-flagged"
    rows = rows.drop(rows[rows["source"] == "none-flagged"].index[-1:])  # 7 of them, not 8
    storage.write_table(run.splits, rows)

    layout = EvalLayout(f"{root}/eval")
    evaluate_run(EvaluateConfig(run=run.root, eval_dir=layout.root, target_sensitivity=0.9,
                                bootstrap=50, saliency=0, audit=False), storage)
    report = storage.read_json(layout.report_file("report.json"))
    sources = {row["source"]: row for row in report["breakdown"]["source"]}
    assert (sources["all-found"]["images"], sources["all-found"]["sensitivity"]) == (10, 1.0)
    assert (sources["none-flagged"]["images"], sources["none-flagged"]["specificity"]) == (7, 1.0)
    assert sources["all-found"]["sensitivity_ci95"][1] == 1.0
    assert sources["none-flagged"]["specificity_ci95"][1] == 1.0
    assert storage.read_bytes(layout.report_file("forest.png")).startswith(b"\x89PNG")
    assert ">forest.png<" in storage.read_bytes(layout.report_file("report.html")).decode()


def test_evaluate_run_writes_a_report_that_matches_its_predictions(storage, evaluated):
    layout, headline = evaluated["layout"], evaluated["headline"]
    report = storage.read_json(layout.report_file("report.json"))
    test, val = (labelled(storage.read_parquet_dir(ScoreLayout(layout.scores(split)).predictions))
                 for split in ("test", "val"))
    assert set(test["group"]).isdisjoint(val["group"])  # patient-disjoint splits
    assert report["roc_auc"] == pytest.approx(roc_auc_score(test["target"], test["score"]))
    assert report["operating_point"]["threshold"] == threshold_for_sensitivity(
        val["score"], val["target"], 0.9)
    for key, entry in report["paper_thresholds"].items():
        predicted = is_positive(test["score"], float(key))
        assert entry["tp"] == int((predicted & (test["target"] == 1)).sum())
        assert entry["fp"] == int((predicted & (test["target"] == 0)).sum())
    assert headline["weights"] == "resnet18: random initialisation (no pretrained weights)"
    assert headline["report"] == layout.report_file("report.html")
    page = storage.read_bytes(layout.report_file("report.html")).decode()
    assert page.count("data:image/png;base64,") >= 10
    summary = storage.read_bytes(layout.report_file("summary.md")).decode()
    assert "| 0.15 |" in summary and "## By source" in summary
    assert storage.read_bytes(layout.report_file("calibration.png")).startswith(b"\x89PNG")
    # Both splits were scored by the run's own exported model, and the config was stored.
    for split in ("val", "test"):
        success = storage.read_json(ScoreLayout(layout.scores(split)).success)
        assert success["model"] == RunLayout(evaluated["run"]).onnx and success["reconciled"]
    assert storage.read_json(layout.config)["bootstrap"] == 100


def test_the_report_shows_subgroups_saliency_and_the_shortcut_audit(storage, evaluated):
    layout = evaluated["layout"]
    report = storage.read_json(layout.report_file("report.json"))
    for row in report["breakdown"]["source"]:
        if row["sensitivity"] is not None:  # the forest plot's intervals hold their point
            low, high = row["sensitivity_ci95"]
            assert low <= row["sensitivity"] <= high
    names = ["forest.png", "audit.png",
             *(f"saliency_{split}_{kind}.png" for split in ("val", "test")
               for kind in ("true_positive", "false_positive", "false_negative")),
             "saliency_test_true_positive_maps.png"]  # the maps alone, no X-ray pixels
    for name in names:
        assert storage.read_bytes(layout.report_file(name)).startswith(b"\x89PNG"), name
    page = storage.read_bytes(layout.report_file("report.html")).decode()
    assert all(f">{name}<" in page for name in names)
    test = labelled(storage.read_parquet_dir(ScoreLayout(layout.scores("test")).predictions))
    sampled = report["saliency"]["test"]
    threshold = report["operating_point"]["threshold"]
    expected_tp = test[(test["target"] == 1) & (test["score"] >= threshold)]
    assert len(sampled["true_positive"]["images"]) == min(4, len(expected_tp))
    assert sampled["true_positive"]["scores"] == sorted(sampled["true_positive"]["scores"],
                                                        reverse=True)
    audit = report["audit"]
    # The synthetic sources are the labels ('synthetic-covid' / '-non_covid'): no source holds
    # both classes, and the reading says that the label cannot be separated from the source.
    assert audit["predictability"]["label_within_source"] == []
    assert "cannot be separated" in audit["reading"]
    assert audit["border"]["original_auc"] == pytest.approx(report["roc_auc"], abs=1e-4)
    assert "## Shortcut audit" in storage.read_bytes(layout.report_file("summary.md")).decode()


def test_the_report_page_renders_its_tables_and_figures_in_a_real_browser(storage, evaluated,
                                                                          tmp_path):
    """report.html opened in headless Chromium: every table of the summary is an HTML table
    with its rows, every figure loads and has its caption, and no Markdown source shows."""
    from covidray.report import Table, summary_blocks

    layout = evaluated["layout"]
    shown = in_a_browser(storage.read_bytes(layout.report_file("report.html")), tmp_path)
    tables = [b for b in summary_blocks(storage.read_json(layout.report_file("report.json")))
              if isinstance(b, Table)]
    assert [(t["header"], t["rows"]) for t in shown["tables"]] == [
        (t.header, t.rows) for t in tables]
    assert len(shown["images"]) >= 10 and all(i["loaded"] for i in shown["images"])
    assert all(i["caption"].strip() for i in shown["images"])
    assert shown["pre"] == 0 and "|---|" not in shown["text"] and "## " not in shown["text"]


def test_the_model_card_carries_the_validated_threshold_to_scoring(storage, evaluated, prefix):
    run = RunLayout(evaluated["run"])
    card = storage.read_json(run.model_card)
    report = storage.read_json(evaluated["layout"].report_file("report.json"))
    assert card["operating_point"]["threshold"] == report["operating_point"]["threshold"]
    assert card["operating_point"]["chosen_on"] == "val"
    assert card["inputs"]["preprocessing"] == RECIPE and "Not a diagnostic" in card["intended_use"]
    assert sum(card["training_data"]["train"][s].get("covid", 0)
               for s in card["training_data"]["train"]) > 0

    archive = evaluated["layout"].manifest("test")
    by_card = score_archive(ScoreConfig(archive, run.onnx, f"{prefix}/card"), storage)
    assert by_card["threshold"] == card["operating_point"]["threshold"]
    assert by_card["threshold_source"].startswith("model card")
    predictions = storage.read_parquet_dir(ScoreLayout(f"{prefix}/card").predictions)
    assert (predictions["threshold"] == card["operating_point"]["threshold"]).all()
    overridden = score_archive(ScoreConfig(archive, run.onnx, f"{prefix}/given", threshold=0.3),
                               storage)
    assert (overridden["threshold"], overridden["threshold_source"]) == (0.3, "--threshold")


def test_a_model_card_of_another_model_stops_scoring_and_leaves_the_last_result(
        storage, evaluated, prefix):
    """Re-exported after `evaluate` (another model.onnx beside the old card): the card's
    threshold was validated on the old model's scores, so scoring refuses it, before the
    output is touched, rather than apply it or fall back to the training default."""
    import onnx

    from covidray.model_card import StaleModelCard, model_digest

    run = RunLayout(evaluated["run"])
    card = storage.read_json(run.model_card)
    assert card["model_digest"] == model_digest(storage.read_bytes(run.onnx))
    model, output = f"{prefix}/model/model.onnx", f"{prefix}/out"
    storage.write_bytes(model, storage.read_bytes(run.onnx))
    storage.write_bytes(f"{prefix}/model/model_card.json", storage.read_bytes(run.model_card))
    archive = evaluated["layout"].manifest("test")
    first = score_archive(ScoreConfig(archive, model, output), storage)
    assert first["threshold_source"].startswith("model card")

    proto = onnx.load_from_string(storage.read_bytes(run.onnx))  # "re-exported": new bytes
    proto.metadata_props.add(key="covidray.note", value="exported again")
    storage.write_bytes(model, proto.SerializeToString())
    with pytest.raises(StaleModelCard, match=r"describes another model .* pass --threshold"):
        score_archive(ScoreConfig(archive, model, output), storage)
    assert storage.read_json(ScoreLayout(output).success)["run"] == first["run"]
    given = score_archive(ScoreConfig(archive, model, output, threshold=0.3), storage)
    assert (given["threshold_source"], given["scored"]) == ("--threshold", first["scored"])
