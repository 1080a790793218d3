"""Drift watch: the per-image profile, the reference kept beside the model, and each scoring
run (whole and nightly) judged against it, on the real S3 server and Ray."""

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from covidray.cli import main
from covidray.drift import DriftTally, bin_index, compare, make_reference, psi
from covidray.layout import RunLayout, ScoreLayout, drift_reference_beside
from covidray.imaging.profile import input_statistics
from covidray.stages.score import ScoreConfig, score_archive
from covidray.synthetic import encode, synthetic_xray

# --- the pieces, pure --------------------------------------------------------------------


def test_input_statistics_are_those_of_the_pixels():
    pixels = np.random.default_rng(0).integers(0, 256, (224, 224)).astype(np.uint8)
    stats = input_statistics(pixels)
    assert stats["input_mean"] == pytest.approx(pixels.mean())
    assert stats["input_std"] == pytest.approx(pixels.std())
    for name, q in (("input_p05", 5), ("input_p50", 50), ("input_p95", 95)):
        assert abs(stats[name] - np.percentile(pixels, q)) <= 1, name
    assert stats["near_black"] == pytest.approx((pixels <= 10).mean())
    assert stats["near_white"] == pytest.approx((pixels >= 245).mean())


def test_a_value_at_a_bin_edge_has_its_own_bin_so_a_constant_reference_still_tells():
    assert bin_index([8.0], np.array([7.0, 8.0, 16.0])).tolist() == [0, 1, 2]
    assert psi([0, 10, 0], [0, 10, 0]) == pytest.approx(0.0)
    assert psi([0, 10, 0], [0, 0, 10]) > 1


def frame_of(rows: int, rng, shift: float = 0.0) -> pd.DataFrame:
    values = rng.normal(100 + shift, 20, rows)
    return pd.DataFrame({"input_mean": values, "score": rng.uniform(0, 1, rows), "error": "",
                         "photometric": "L"})


def test_the_same_distribution_is_not_flagged_and_a_shifted_one_is():
    rng = np.random.default_rng(1)
    reference = make_reference(frame_of(400, rng), pd.DataFrame({"error": []}), 0.5, "d", "t")
    for shift, flagged in ((0.0, []), (40.0, ["input_mean"])):
        tally = DriftTally(reference, 0.5)
        tally.add(frame_of(200, rng, shift))
        assert compare(tally, 0.25, 0.15, 30)["drifted"] == flagged


@pytest.mark.parametrize("rate", [0.0, 1.0])
def test_a_run_at_the_reference_rate_of_zero_or_one_is_not_flagged(rate):
    """Every image positive (or none), as in the reference: the Wilson interval of 10 of 10
    must hold 1.0 exactly (the closed form rounds it to 1 - 1e-16)."""
    rng = np.random.default_rng(3)
    threshold = 0.0 if rate == 1.0 else 1.5  # all scores lie in [0, 1)
    reference = make_reference(frame_of(400, rng), pd.DataFrame({"error": []}), threshold, "d",
                               "t")
    for rows in (10, 13, 25, 41):
        tally = DriftTally(reference, threshold)
        tally.add(frame_of(rows, rng))
        positive_rate = compare(tally, 0.25, 0.15, 5)["quantities"]["positive_rate"]
        assert positive_rate["value"] == rate and not positive_rate["drifted"], rows


# --- scoring runs on the real server and cluster -------------------------------------------

SIZE = (160, 192)


def images(rng, count: int, covid_share: float = 0.5, change=None, fmt: str = "png"):
    """``count`` synthetic X-rays, ``change`` applied to each (a PIL image -> PIL image)."""
    out = []
    for i in range(count):
        image = synthetic_xray(i < covid_share * count, rng, size=SIZE)
        out.append(encode(change(image) if change else image, fmt))
    return out


def archive_of(storage, root: str, data: list[bytes]) -> str:
    uris = [storage.write_bytes(f"{root}/img-{i:04d}.png", d) for i, d in enumerate(data)]
    return storage.write_table(f"{root}/manifest.csv", pd.DataFrame({"uri": uris}))


@pytest.fixture(scope="module")
def watched(storage, trained_run, ray_local):
    """A copy of the session's model with a reference profile made from 100 scored images,
    its threshold at their median score (a validation positive rate of one half)."""
    root = f"{trained_run['root']}/drift-{np.random.default_rng().integers(1 << 30)}"
    model = storage.copy(RunLayout(trained_run["run"]).onnx, f"{root}/model/model.onnx")
    reference_archive = archive_of(storage, f"{root}/reference", images(
        np.random.default_rng(11), 100))
    output = ScoreLayout(f"{root}/reference-scores")
    first = score_archive(ScoreConfig(reference_archive, model, output.root, threshold=0.5),
                          storage)
    assert not first["drift"]["judged"]  # no reference yet: said, not judged
    predictions = storage.read_parquet_dir(output.predictions)
    threshold = float(np.median(predictions["score"]))
    storage.write_json(drift_reference_beside(model), make_reference(
        predictions, storage.read_parquet_dir(output.errors), threshold, first["model_digest"],
        reference_archive))
    return {"root": root, "model": model, "threshold": threshold, "predictions": predictions}


def drifted(storage, watched, name: str, data: list[bytes]) -> list[str]:
    archive = archive_of(storage, f"{watched['root']}/{name}", data)
    output = f"{watched['root']}/{name}-scores"
    summary = score_archive(ScoreConfig(archive, watched["model"], output,
                                        threshold=watched["threshold"]), storage)
    drift = storage.read_json(ScoreLayout(output).drift_json)
    assert summary["drift"]["drifted"] == drift["drifted"] and drift["judged"]
    assert storage.read_bytes(ScoreLayout(output).drift_png).startswith(b"\x89PNG")
    assert storage.read_json(ScoreLayout(output).success)["drift"]["verdict"]
    return drift["drifted"]


def test_an_archive_like_the_reference_is_not_flagged(storage, watched):
    assert drifted(storage, watched, "same", images(np.random.default_rng(12), 60)) == []


@pytest.mark.parametrize("case, change, quantity", [
    ("inverted", lambda im: Image.eval(im, lambda v: 255 - v), "input_mean"),
    ("low-contrast", lambda im: Image.eval(im, lambda v: 100 + v // 5), "input_std"),
    ("black-border", lambda im: Image.fromarray(np.pad(np.asarray(im), 48)).resize(SIZE),
     "near_black"),
])
def test_a_changed_image_pipeline_is_flagged_by_the_quantity_it_moves(storage, watched, case,
                                                                      change, quantity):
    assert quantity in drifted(storage, watched, case,
                               images(np.random.default_rng(13), 60, change=change))


def test_another_scanner_is_flagged_by_its_bit_depth_and_size(storage, watched):
    rng = np.random.default_rng(14)
    scanner = [encode(synthetic_xray(i % 2 == 0, rng, size=(320, 400)), "png16")
               for i in range(45)] + images(rng, 15)  # most images from the new scanner
    flagged = drifted(storage, watched, "scanner", scanner)
    assert {"bit_depth", "width", "height"} <= set(flagged)


def test_a_jump_in_the_positive_rate_is_flagged(storage, watched):
    """The reference images the model calls positive, alone: the inputs look the same, but
    every one of them is positive where the reference had one half."""
    positives = watched["predictions"][watched["predictions"]["score"] >= watched["threshold"]]
    data = [storage.read_bytes(uri) for uri in positives["uri"]]
    assert "positive_rate" in drifted(storage, watched, "positives", data)


def test_nightly_runs_keep_a_drift_history_and_fail_on_drift_after_publishing(
        storage, watched, s3_env):
    archive, output = f"{watched['root']}/nightly-archive", f"{watched['root']}/nightly"
    layout = ScoreLayout(output)
    rng = np.random.default_rng(15)
    nights = [images(rng, 40), images(rng, 40),
              images(rng, 40, change=lambda im: Image.eval(im, lambda v: 255 - v))]
    argv = ["score", "--archive", archive, "--model", watched["model"], "--output", output,
            "--incremental", "--threshold", str(watched["threshold"]), "--fail-on-drift",
            "--s3-endpoint", s3_env["AWS_ENDPOINT_URL"]]
    codes = []
    for night, data in enumerate(nights):
        for i, image in enumerate(data):
            storage.write_bytes(f"{archive}/night{night}-{i:03d}.png", image)
        codes.append(main(argv))
    assert codes == [0, 0, 3]  # the third night drifted: exit 3 ...
    current = storage.read_json(layout.current)  # ... after publishing its results
    assert len(current["runs"]) == 3 and current["objects"] == 120
    assert current["last_run"]["drift"]["drifted"]
    history = storage.read_table(layout.drift_history)
    assert history["run"].tolist() == current["runs"]
    assert history["drifted"].fillna("").tolist()[:2] == ["", ""]
    assert "input_mean" in history["drifted"].iloc[2].split(";")
    assert storage.read_bytes(layout.drift_history_png).startswith(b"\x89PNG")
