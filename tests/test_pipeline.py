"""Train -> export -> score on a real local Ray instance, real S3 server, real onnxruntime."""

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import confusion_matrix, roc_auc_score

from covidray.imaging.recipe import model_inputs
from covidray.features import extract_features
from covidray.imaging.recipe import RECIPE, preprocess
from covidray.layout import RunLayout, ScoreLayout
from covidray.metrics import is_positive
from covidray.model import (build_model, checkpoint_recipe, initial_model, load_checkpoint,
                            model_from_checkpoint)
from covidray.onnx_export import ExportParityError, export_onnx, model_metadata, parity_check
from covidray.onnx_runtime import onnx_session, read_metadata
from covidray.cluster import score_on_gpu
from covidray.stages.export import parity_inputs
from covidray.scoring.index import snapshot_index
from covidray.scoring.fault_points import armed
from covidray.scoring.metrics_files import sorted_labelled_scores
from covidray.scoring.parts import RESULT_PART_ROWS
from covidray.stages.score import ScoreConfig, loaded_images, score_archive
from covidray.stages.train import TrainConfig, fit, image_stream, latest_checkpoint
from covidray.storage.location import Location, StorageError
from covidray.synthetic import encode, synthetic_xray

from conftest import process_tree, upload_synthetic


def test_training_writes_checkpoint_history_and_splits(storage, trained_run):
    layout = RunLayout(trained_run["run"])
    checkpoint = load_checkpoint(storage, layout.model_checkpoint)
    assert checkpoint["epoch"] == 1 and len(checkpoint["history"]) == 2
    assert {"train_loss", "val_loss", "val_auc"} <= set(checkpoint["history"][-1])
    assert checkpoint["config"]["weights"] == "none"
    assert storage.read_json(layout.history) == json.loads(json.dumps(checkpoint["history"]))
    splits = storage.read_table(layout.splits)
    assert splits.groupby("patient_id")["split"].nunique().max() == 1
    assert latest_checkpoint(storage, layout) is not None


def test_frozen_backbone_run_trains_on_stored_features(storage, trained_run):
    import torch

    layout = RunLayout(trained_run["run"])
    for split in ("train", "val"):
        features = storage.read_parquet_dir(layout.features(split))
        assert len(features) and np.asarray(features["features"].iloc[0]).shape == (512,)
    assert (storage.read_parquet_dir(layout.features("train"))["copy"] > 0).any()  # grown COVID
    checkpoint = load_checkpoint(storage, layout.model_checkpoint)
    start = initial_model("none", trained_run["config"].seed)
    assert torch.equal(checkpoint["model"]["body.layer4.1.conv2.weight"],
                       start.body.layer4[1].conv2.weight)
    assert not torch.equal(checkpoint["model"]["fc.weight"], start.fc.weight)
    # The stored features are what the final model's backbone makes of those images, so
    # the head trained on them is the head the exported model applies.
    features = storage.read_parquet_dir(layout.features("val"))
    model = model_from_checkpoint(checkpoint)
    for row in features.head(3).itertuples():
        expected = extract_features(model, preprocess(storage.read_bytes(row.uri)))[0]
        assert np.abs(np.asarray(row.features) - expected).max() < 1e-4


def test_resume_continues_from_the_latest_checkpoint(storage, trained_run, prefix):
    # A copy of the shared run: resuming must not change what the other tests read.
    storage.copy_prefix(trained_run["run"], f"{prefix}/run")
    config = dataclasses.replace(trained_run["config"], run=f"{prefix}/run", epochs=3,
                                 resume=True)
    summary = fit(config, storage)
    assert summary["epochs"] == 3
    history = load_checkpoint(storage, RunLayout(config.run).model_checkpoint)["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2]  # epochs 0-1 restored, only 2 re-run
    original = load_checkpoint(storage, RunLayout(trained_run["run"]).model_checkpoint)
    assert history[:2] == original["history"]  # the restored epochs are the original's

    # A retried job whose training had finished: the final checkpoint is the model, no
    # training runs again (no new checkpoint).
    checkpoints = sorted(storage.list_files(RunLayout(config.run).checkpoints))
    again = fit(config, storage)
    assert again["epochs"] == 3 and sorted(storage.list_files(
        RunLayout(config.run).checkpoints)) == checkpoints
    # Another training's settings, or fewer epochs than trained, never continue this model.
    for changed, reason in ((dict(lr=config.lr * 10), r"lr 0.001 there, 0.01 here"),
                            (dict(epochs=2), "it trained 3 epochs, --epochs is 2"),
                            (dict(seed=config.seed + 1), "seed 0 there, 1 here")):
        with pytest.raises(ValueError, match=r"--resume: the newest checkpoint .*" + reason):
            fit(dataclasses.replace(config, **changed), storage)
    assert sorted(storage.list_files(RunLayout(config.run).checkpoints)) == checkpoints


def test_onnx_carries_metadata_and_a_dynamic_batch(storage, trained_run):
    session = onnx_session(storage.read_bytes(RunLayout(trained_run["run"]).onnx))
    metadata = read_metadata(session)
    assert json.loads(metadata["preprocessing"]) == RECIPE
    assert json.loads(metadata["class_names"]) == ["non_covid", "covid"]
    assert metadata["weights"] == "resnet18: random initialisation (no pretrained weights)"
    assert (metadata["backbone"], metadata["weights_sha256"]) == ("resnet18", "")
    assert json.loads(metadata["train_config"])["epochs"] == 2
    for batch in (1, 5):
        logits, probabilities = session.run(None, {"input": np.zeros((batch, 3, 224, 224), np.float32)})
        assert logits.shape == (batch, 2) and np.allclose(probabilities.sum(1), 1, atol=1e-6)


def test_the_exported_model_scores_what_torch_scores_as_its_report_says(storage, trained_run):
    """Measured again here, not read from the export (which raises on a failed check):
    torch on model.pt and onnxruntime on model.onnx over real held-out images."""
    import torch

    from covidray.model import ScoringModel

    layout = RunLayout(trained_run["run"])
    report = storage.read_json(layout.export_report)
    checkpoint = load_checkpoint(storage, layout.model_checkpoint)
    inputs = parity_inputs(storage, layout, checkpoint_recipe(checkpoint))
    model = ScoringModel(model_from_checkpoint(checkpoint)).eval()
    with torch.inference_mode():
        expected = model(torch.from_numpy(inputs))[1].numpy()
    got = onnx_session(storage.read_bytes(layout.onnx)).run(["probabilities"],
                                                            {"input": inputs})[0]
    difference = float(np.abs(expected - got).max())
    assert len(inputs) == report["images"] >= 8
    assert difference <= 1e-4 and difference == pytest.approx(
        report["max_abs_diff_probabilities"], abs=1e-6)


def test_parity_check_fails_when_onnx_differs_from_torch():
    model_a, model_b = build_model("none"), build_model("none")
    onnx_b = export_onnx(model_b, model_metadata(0.5, "none", {}, 1))
    with pytest.raises(ExportParityError, match="differs from torch"):
        parity_check(model_a, onnx_b, np.random.default_rng(0).normal(size=(2, 3, 224, 224))
                     .astype(np.float32))


def test_training_images_decode_in_parallel_tasks_and_arrive_in_order(storage, trained_run,
                                                                      ray_local):
    """One block per batch of rows (one block would be one task on one CPU), delivered in
    the index's order under Ray Train's ingest options."""
    from covidray.stages.train import IMAGE_BATCH, ordered_ingest

    splits = storage.read_table(RunLayout(trained_run["run"]).splits)
    wanted = 3 * IMAGE_BATCH + 5
    rows = pd.concat([splits] * (wanted // len(splits) + 1), ignore_index=True).head(wanted)
    stream = image_stream(rows, storage)
    stream.context.execution_options = ordered_ingest()
    assert stream.materialize().num_blocks() == 4
    arrived = pd.concat(b for b in stream.iter_batches(batch_format="pandas"))
    assert list(arrived["uri"]) == list(rows["uri"])
    assert (arrived["error"] == "").all()


def test_training_export_and_scoring_preprocess_identically(storage, trained_run, ray_local):
    """The same file through the three real pipelines gives bit-identical model input, with
    one recipe: the one the checkpoint's backbone names, which export writes into the ONNX
    metadata and the scorer rebuilds from there."""
    from covidray.onnx_runtime import OnnxScorer

    layout = RunLayout(trained_run["run"])
    recipe = checkpoint_recipe(load_checkpoint(storage, layout.model_checkpoint))
    assert OnnxScorer(storage.read_bytes(layout.onnx), layout.onnx).recipe == recipe
    splits = storage.read_table(layout.splits)
    held_out = pd.concat([splits[splits["split"] == s] for s in ("test", "val", "train")])
    uri = held_out["uri"].iloc[0]
    reference = preprocess(storage.read_bytes(uri), recipe)[0]

    # training: the Ray Data stream fed to Ray Train (unaugmented row), then batch_tensors' input
    train_batch = next(iter(image_stream(held_out.head(1), storage).iter_batches(batch_format="numpy")))
    from_training = model_inputs(train_batch, recipe)[0][0]
    # export: the parity-check input is the first held-out image
    from_export = parity_inputs(storage, layout, recipe, count=1)[0]
    # scoring: the archive index + loading stages of score_archive
    archive = f"{trained_run['root']}/one.csv"
    storage.write_table(archive, pd.DataFrame({"uri": [uri]}))
    index = f"{trained_run['root']}/_staging-parity/index"
    assert snapshot_index(storage, archive, index) == 1
    score_batch = next(iter(loaded_images(storage, index, 8, 0.5)
                            .iter_batches(batch_format="numpy")))
    from_scoring = model_inputs(score_batch, recipe)[0][0]

    for name, array in (("training", from_training), ("export", from_export),
                        ("scoring", from_scoring)):
        assert array.dtype == np.float32 and np.array_equal(array, reference), name


def bad_archive(storage, root):
    """A labelled prefix archive with a truncated JPEG, an empty file and a text '.png'."""
    rng = np.random.default_rng(5)
    for i in range(6):
        label = "covid" if i % 2 else "non_covid"
        storage.write_bytes(f"{root}/{label}/img-{i}.{'png' if i % 3 else 'jpg'}",
                            encode(synthetic_xray(label == "covid", rng), "png" if i % 3 else "jpg"))
    good_jpeg = encode(synthetic_xray(False, rng), "jpg")
    storage.write_bytes(f"{root}/non_covid/truncated.jpg", good_jpeg[: len(good_jpeg) // 2])
    storage.write_bytes(f"{root}/covid/empty.png", b"")
    storage.write_bytes(f"{root}/covid/text.png", b"not an image at all")
    storage.write_bytes(f"{root}/README.txt", b"not listed: not an image suffix")


def test_scoring_an_archive_with_unreadable_files(storage, trained_run, prefix, ray_local):
    archive, output = f"{prefix}/archive", f"{prefix}/out"
    bad_archive(storage, archive)
    model = RunLayout(trained_run["run"]).onnx
    summary = score_archive(ScoreConfig(archive, model, output, threshold=0.5, batch_size=4),
                            storage)
    layout = ScoreLayout(output)

    assert (summary["listed"], summary["scored"], summary["failed"]) == (9, 6, 3)
    assert summary["reconciled"] and storage.read_json(layout.success)["listed"] == 9
    errors = storage.read_parquet_dir(layout.errors).set_index("uri")
    assert set(errors.index) == {f"{archive}/non_covid/truncated.jpg", f"{archive}/covid/empty.png",
                                 f"{archive}/covid/text.png"}
    assert "truncated" in errors.loc[f"{archive}/non_covid/truncated.jpg", "error"]
    assert "empty file" in errors.loc[f"{archive}/covid/empty.png", "error"]
    assert "not an image" in errors.loc[f"{archive}/covid/text.png", "error"]

    predictions = storage.read_parquet_dir(layout.predictions)
    assert len(predictions) == 6 and predictions["uri"].is_unique
    # Each score is what onnxruntime gives for the library's preprocessing of that file.
    session = onnx_session(storage.read_bytes(model))
    for row in predictions.itertuples():
        expected = session.run(["probabilities"], {"input": preprocess(storage.read_bytes(row.uri))})[0][0, 1]
        assert row.score == pytest.approx(float(expected), abs=1e-5)
        assert row.prediction == ("covid" if row.score >= 0.5 else "non_covid")

    # The published metrics agree with scikit-learn on the predictions table.
    metrics = storage.read_json(layout.metrics_json)
    targets = (predictions["label"] == "covid").astype(int).to_numpy()
    assert metrics["roc_auc"] == pytest.approx(roc_auc_score(targets, predictions["score"]), abs=1e-12)
    for row in metrics["sweep"]:
        expected = confusion_matrix(targets, is_positive(predictions["score"], row["threshold"]),
                                    labels=[0, 1])
        assert [[row["tn"], row["fp"]], [row["fn"], row["tp"]]] == expected.tolist()
    for threshold in ("0.10", "0.15", "0.20", "0.25"):
        png = storage.read_bytes(layout.confusion_png(float(threshold)))
        assert png.startswith(b"\x89PNG")
    assert storage.read_bytes(layout.histogram_png).startswith(b"\x89PNG")
    assert storage.read_bytes(layout.sweep_csv).decode().count("\n") == 102
    assert not list(storage.list_files(layout.staging))  # staging cleaned up

    # The driver's sort (up to RESULT_PART_ROWS predictions) and the Ray sort (beyond)
    # give the labelled scores in the same order.
    def in_order(scored):
        batches = list(sorted_labelled_scores(storage, layout, scored))
        return list(zip(np.concatenate([b["score"] for b in batches]),
                        np.concatenate([b["label"] for b in batches])))
    on_driver, by_ray = in_order(summary["scored"]), in_order(RESULT_PART_ROWS + 1)
    assert len(on_driver) == 6 and [s for s, _ in on_driver] == sorted(s for s, _ in on_driver)
    assert [s for s, _ in on_driver] == [s for s, _ in by_ray] and sorted(on_driver) == sorted(by_ray)


def test_manifest_archive_records_missing_objects_and_skips_metrics_without_labels(
        storage, trained_run, prefix, ray_local):
    storage.write_bytes(f"{prefix}/a.png", encode(synthetic_xray(True, np.random.default_rng(1)), "png"))
    manifest = f"{prefix}/archive.parquet"
    storage.write_table(manifest, pd.DataFrame({"uri": [f"{prefix}/a.png", f"{prefix}/gone.png"]}))
    summary = score_archive(ScoreConfig(manifest, RunLayout(trained_run["run"]).onnx,
                                        f"{prefix}/out"), storage)
    assert (summary["listed"], summary["scored"], summary["failed"]) == (2, 1, 1)
    assert "metrics" not in summary
    errors = storage.read_parquet_dir(ScoreLayout(f"{prefix}/out").errors)
    assert errors["error"].iloc[0].startswith("read failed")


def test_scoring_refuses_a_missing_model_before_any_work(storage, prefix):
    storage.write_bytes(f"{prefix}/archive/x.png", b"")
    with pytest.raises(StorageError, match="not found: run `covidray export`"):
        score_archive(ScoreConfig(f"{prefix}/archive", f"{prefix}/nope.onnx", f"{prefix}/out"),
                      storage)


def test_training_refuses_unlabelled_images(storage, prefix, ray_local):
    upload_synthetic(storage, f"{prefix}/data", 2, 2)
    storage.write_bytes(f"{prefix}/data/unsorted/x.png", b"")
    with pytest.raises(ValueError, match="have no label"):
        fit(TrainConfig(data=f"{prefix}/data", run=f"{prefix}/run", epochs=1, weights="none"),
            storage)


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v2", "efficientnet_lite0"])
def test_two_training_workers_split_the_training_data(storage, prefix, ray_local, backbone):
    """A full fine-tune across two Ray Train workers, for each registry backbone (from its
    ImageNet file where one is installed)."""
    import torch

    from covidray.backbones import get_backbone

    manifest = upload_synthetic(storage, f"{prefix}/data", 8, 8)
    weights = "imagenet" if get_backbone(backbone).imagenet.installed_file() else "none"
    config = TrainConfig(data=manifest, run=f"{prefix}/run", epochs=1, batch_size=4,
                         lr=1e-3, backbone=backbone, weights=weights, workers=2,
                         val_fraction=0.25, covid_target=0, test_fraction=0.0,
                         train_layers="all")
    summary = fit(config, storage)
    checkpoint = load_checkpoint(storage, RunLayout(config.run).model_checkpoint)
    history = checkpoint["history"]
    train_rows = (storage.read_table(RunLayout(config.run).splits)["split"] == "train").sum()
    # rank 0 saw its shard only: about half of the training images, never all of them
    assert 0 < history[0]["train_images"] < train_rows
    assert summary["epochs"] == 1
    assert checkpoint["weights_provenance"]["backbone"] == backbone
    start = initial_model(weights, config.seed, storage, backbone).state_dict()
    trained = [k for k, v in checkpoint["model"].items()
               if k.startswith("body.") and v.is_floating_point() and not torch.equal(v, start[k])]
    assert trained, "a full fine-tune changed no backbone weight"


def test_keys_with_question_marks_and_hashes_are_scored_from_their_own_bytes(
        storage, trained_run, prefix, ray_local):
    """'a.jpg?v=2.jpg' is its own object, never 'a.jpg' read under another name."""
    rng = np.random.default_rng(11)
    names = ["good_0.jpg", "good_0.jpg?v=2.jpg", "good_0.jpg#copy.png"]
    for i, name in enumerate(names):
        storage.write_bytes(f"{prefix}/archive/{name}",
                            encode(synthetic_xray(i % 2 == 1, rng), "png"))
    model = RunLayout(trained_run["run"]).onnx
    summary = score_archive(ScoreConfig(f"{prefix}/archive", model, f"{prefix}/out"), storage)
    assert (summary["listed"], summary["scored"]) == (3, 3)
    predictions = storage.read_parquet_dir(ScoreLayout(f"{prefix}/out").predictions)
    session = onnx_session(storage.read_bytes(model))
    assert sorted(predictions["uri"]) == sorted(f"{prefix}/archive/{n}" for n in names)
    for row in predictions.itertuples():
        own = session.run(["probabilities"], {"input": preprocess(storage.read_bytes(row.uri))})
        assert row.score == pytest.approx(float(own[0][0, 1]), abs=1e-6)
    assert predictions["score"].nunique() == 3  # three different images, three scores


def test_scoring_uses_gpus_only_where_the_gpu_nodes_onnxruntime_can(capsys):
    cuda = lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]  # noqa: E731
    cpu_only = lambda: ["CPUExecutionProvider"]  # noqa: E731
    nobody = lambda: None  # noqa: E731 - no GPU node answered the probe
    gpus, no_gpus = {"CPU": 16.0, "GPU": 1.0}, {"CPU": 16.0}
    assert score_on_gpu("auto", gpus, cuda) is True
    assert score_on_gpu("on", gpus, cuda) is True
    assert score_on_gpu("off", gpus, cuda) is False
    asked = []
    assert score_on_gpu("auto", no_gpus, lambda: asked.append(1)) is False
    assert not asked  # no GPU, no probe
    capsys.readouterr()
    assert score_on_gpu("auto", gpus, cpu_only) is False  # slower, not wrong: said, not failed
    assert "the GPU nodes has no CUDA provider" in capsys.readouterr().out
    assert score_on_gpu("auto", gpus, nobody) is False
    assert "no GPU node answered" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--gpu on, but the Ray cluster has no GPU"):
        score_on_gpu("on", no_gpus, cuda)
    with pytest.raises(ValueError, match="--gpu on, but onnxruntime on the GPU nodes has no CUDA"):
        score_on_gpu("on", gpus, cpu_only)
    with pytest.raises(ValueError, match="--gpu on, but no GPU node answered"):
        score_on_gpu("on", gpus, nobody)


def test_the_probe_asks_a_node_that_holds_a_gpu_and_gives_up_when_none_can_answer():
    """On a real Ray instance that declares one GPU (none is used), then on one with none."""
    import subprocess
    import sys

    import onnxruntime

    script = """
import os
import ray
from covidray.cluster import providers_on_gpu_nodes
for gpus, timeout in ((1, 60), (0, 3)):
    ray.init(address="local", num_cpus=1, num_gpus=gpus, include_dashboard=False,
             logging_level="ERROR")
    print("GPUS", gpus, providers_on_gpu_nodes(ray, timeout), flush=True)
    if gpus:  # what a GPU actor relies on: Ray shows it its own GPU
        shown = ray.remote(num_gpus=1)(lambda: os.environ.get("CUDA_VISIBLE_DEVICES"))
        print("VISIBLE", ray.get(shown.remote()), flush=True)
    ray.shutdown()
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    lines = [line for line in done.stdout.splitlines() if line.startswith(("GPUS", "VISIBLE"))]
    assert lines == [f"GPUS 1 {onnxruntime.get_available_providers()}", "VISIBLE 0",
                     "GPUS 0 None"], done.stdout + done.stderr[-2000:]


def test_a_gpu_session_never_falls_back_to_the_cpu_silently():
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA (tests/test_gpu.py covers it)")
    model = export_onnx(build_model("none"), model_metadata(0.5, "none", {}, 0))
    assert onnx_session(model).get_providers() == ["CPUExecutionProvider"]
    with pytest.raises(RuntimeError, match="needs onnxruntime-gpu.*--gpu off"):
        onnx_session(model, gpu=True)


def test_the_cuda_of_onnxruntime_gpu_and_of_torch_must_agree(monkeypatch):
    import sys
    import types

    import torch

    from covidray.onnx_runtime import cuda_mismatch

    monkeypatch.setitem(sys.modules, "onnxruntime.capi.build_and_package_info",
                        types.SimpleNamespace(cuda_version="13.0"))
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    assert cuda_mismatch() is None
    monkeypatch.setattr(torch.version, "cuda", "12.6")
    assert "built for CUDA 13.0, torch here for CUDA 12.6" in cuda_mismatch()
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "torch here is a CPU build" in cuda_mismatch()
    monkeypatch.delitem(sys.modules, "onnxruntime.capi.build_and_package_info")
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        assert cuda_mismatch() == "this onnxruntime is not onnxruntime-gpu"


def test_gpu_on_a_cluster_without_gpus_fails_and_leaves_the_last_result(
        storage, trained_run, prefix, ray_local):
    model, output = RunLayout(trained_run["run"]).onnx, f"{prefix}/out"
    archive = f"{prefix}/archive"
    bad_archive(storage, archive)
    first = score_archive(ScoreConfig(archive, model, output, threshold=0.3), storage)
    layout = ScoreLayout(output)
    with pytest.raises(ValueError, match="--gpu on, but the Ray cluster has no GPU"):
        score_archive(ScoreConfig(archive, model, output, threshold=0.3, gpu="on"), storage)
    assert storage.read_json(layout.success) == first
    assert len(storage.read_parquet_dir(layout.predictions)) == first["scored"]


def test_a_rerun_into_a_used_output_leaves_nothing_of_the_previous_run(
        storage, trained_run, prefix, ray_local):
    model, output = RunLayout(trained_run["run"]).onnx, f"{prefix}/out"
    labelled_archive = f"{prefix}/labelled"
    bad_archive(storage, labelled_archive)
    score_archive(ScoreConfig(labelled_archive, model, output, threshold=0.3), storage)
    assert storage.exists(ScoreLayout(output).confusion_png(0.3, operating=True))

    unlabelled = f"{prefix}/unlabelled.csv"
    storage.write_bytes(f"{prefix}/x.png", encode(synthetic_xray(True, np.random.default_rng(2)),
                                                  "png"))
    storage.write_table(unlabelled, pd.DataFrame({"uri": [f"{prefix}/x.png"]}))
    summary = score_archive(ScoreConfig(unlabelled, model, output), storage)
    layout = ScoreLayout(output)
    assert "metrics" not in summary
    assert list(storage.list_files(layout.metrics)) == []  # no metrics of the old archive
    assert len(storage.read_parquet_dir(layout.predictions)) == 1
    assert storage.read_parquet_dir(layout.errors).empty
    assert storage.read_json(layout.success)["listed"] == 1
    assert storage.read_json(layout.config)["archive"] == unlabelled


def test_a_partly_labelled_manifest_is_scored_whole_and_measured_on_its_labels(
        storage, trained_run, prefix, ray_local):
    # A missing label must reach the result blocks as None (pd.NA once broke them).
    rng = np.random.default_rng(3)
    uris = [f"{prefix}/img-{i}.png" for i in range(6)]
    for i, uri in enumerate(uris):
        storage.write_bytes(uri, encode(synthetic_xray(i % 2 == 1, rng), "png"))
    labels = ["covid", "non_covid", None, "covid", None, "non_covid"]
    manifest = storage.write_table(f"{prefix}/manifest.csv",
                                   pd.DataFrame({"uri": uris, "label": labels}))
    output = f"{prefix}/out"
    summary = score_archive(ScoreConfig(manifest, RunLayout(trained_run["run"]).onnx, output,
                                        threshold=0.5), storage)
    assert (summary["listed"], summary["scored"], summary["failed"]) == (6, 6, 0)
    predictions = storage.read_parquet_dir(ScoreLayout(output).predictions)
    got = predictions.set_index("uri")["label"]
    assert got.dropna().to_dict() == {u: label for u, label in zip(uris, labels) if label}
    assert sorted(got[got.isna()].index) == [uris[2], uris[4]]
    metrics = storage.read_json(ScoreLayout(output).metrics_json)
    assert (metrics["images"], metrics["covid"]) == (4, 2)  # the labelled rows only


def test_an_output_inside_the_archive_prefix_is_refused_before_anything_is_written(
        storage, trained_run, prefix):
    """The next run would list this one's figures (PNGs) as X-rays."""
    import ray

    archive = f"{prefix}/archive"
    bad_archive(storage, archive)
    listed = sorted(storage.list_files(prefix))
    connected = ray.is_initialized()
    for output in (archive, f"{archive}/scores"):
        with pytest.raises(ValueError, match=r"is inside --archive .* outside the archive"):
            score_archive(ScoreConfig(archive, RunLayout(trained_run["run"]).onnx, output),
                          storage)
    assert ray.is_initialized() == connected and sorted(storage.list_files(prefix)) == listed
    assert Location.parse(f"{prefix}/arch").contains(Location.parse(f"{prefix}/arch/x"))
    assert not Location.parse(f"{prefix}/arch").contains(Location.parse(f"{prefix}/archive"))


@pytest.mark.parametrize("rows,reason", [
    ({"uri": ["/etc/passwd"]}, "local path"),
    ({"uri": [""], "label": ["covid"]}, "empty 'uri'"),
    ({"uri": ["a.png"], "label": ["pneumonia"]}, "labels outside"),
    ({"uri": ["a.png", "b.png", "a.png"]}, r"names '.*/a.png' twice \(rows 1 and 3"),
])
def test_a_bad_manifest_is_refused_before_any_cluster_work(storage, trained_run, prefix, rows,
                                                           reason):
    import ray

    manifest = storage.write_table(f"{prefix}/manifest.csv", pd.DataFrame(rows))
    connected = ray.is_initialized()
    with pytest.raises(ValueError, match=reason):
        score_archive(ScoreConfig(manifest, RunLayout(trained_run["run"]).onnx,
                                  f"{prefix}/out"), storage)
    assert ray.is_initialized() == connected  # refused before connecting to Ray
    assert not storage.exists(ScoreLayout(f"{prefix}/out").success)
    assert not list(storage.list_files(ScoreLayout(f"{prefix}/out").staging))


def test_an_unreconciled_result_is_never_published(storage, trained_run, prefix, ray_local):
    archive = f"{prefix}/archive"
    bad_archive(storage, archive)

    def losing_one(counts):  # as if one result went missing on the way
        counts["scored"] -= 1

    with armed("scoring.results_counted", losing_one):
        with pytest.raises(RuntimeError, match="not published: listed 9"):
            score_archive(ScoreConfig(archive, RunLayout(trained_run["run"]).onnx,
                                      f"{prefix}/out"), storage)
    assert not storage.exists(ScoreLayout(f"{prefix}/out").success)


def test_an_archive_changed_while_the_run_is_under_way_is_scored_as_listed(
        storage, trained_run, prefix, ray_local):
    """The manifest is rewritten and objects added right after the run read its index: the
    run scores exactly the snapshot it took and reconciles against it."""
    rng = np.random.default_rng(4)
    uris = [storage.write_bytes(f"{prefix}/img-{i}.png", encode(synthetic_xray(i % 2 == 1, rng),
                                                                  "png")) for i in range(6)]
    manifest = storage.write_table(f"{prefix}/manifest.csv", pd.DataFrame({"uri": uris}))

    def the_archive_changes(archive):
        more = [storage.write_bytes(f"{prefix}/late-{i}.png", b"late") for i in range(4)]
        storage.write_table(archive, pd.DataFrame({"uri": uris[:3] + more}))

    with armed("scoring.snapshot_taken", the_archive_changes):
        summary = score_archive(ScoreConfig(manifest, RunLayout(trained_run["run"]).onnx,
                                            f"{prefix}/out"), storage)
    assert (summary["listed"], summary["scored"], summary["failed"]) == (6, 6, 0)
    predictions = storage.read_parquet_dir(ScoreLayout(f"{prefix}/out").predictions)
    assert sorted(predictions["uri"]) == sorted(uris)
    assert len(storage.read_table(manifest)) == 7  # it did change under the run


def _png_stream(width: int, height: int, bit_depth: int, row: bytes) -> bytes:
    """A PNG whose every row is ``row``, compressed row by row: a small file that claims a
    large image, without ever holding that image here."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    compressor, body = zlib.compressobj(9), []
    for _ in range(height):
        body.append(compressor.compress(b"\0" + row))
    body.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)  # grayscale
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(body))
            + chunk(b"IEND", b""))


def _worker_peak_rss(stop, peaks: dict) -> None:
    """Every 0.1 s: the RSS of each Ray worker process (``ray::...``) this test process
    started (the local Ray instance's raylet is its child, the workers the raylet's)."""
    import os

    while not stop.wait(0.1):
        for pid in process_tree(os.getpid()) - {os.getpid()}:
            statm = f"/proc/{pid}/statm"
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as fh:
                    if not fh.read(5) == b"ray::":
                        continue
                with open(statm) as fh:
                    rss = int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            except OSError:
                continue
            peaks[pid] = max(peaks.get(pid, 0), rss)


WORKER_MEMORY_CEILING = 1_500_000_000  # bytes per Ray worker, whatever the archive holds


def scored_with_worker_peaks(storage, config: ScoreConfig) -> tuple[dict, dict]:
    """``score_archive(config)`` while each Ray worker's peak RSS is sampled: (summary,
    {pid: peak bytes})."""
    import threading

    peaks, stop = {}, threading.Event()
    sampler = threading.Thread(target=_worker_peak_rss, args=(stop, peaks), daemon=True)
    sampler.start()
    try:
        return score_archive(config, storage), peaks
    finally:
        stop.set()
        sampler.join()


def test_large_and_hostile_images_score_under_a_memory_ceiling(storage, trained_run, prefix,
                                                               ray_local):
    """A 16 MP 16-bit hospital export and a 36 MP 8-bit image are scored; files whose headers
    claim 144 MP or a 1x60000 strip are refused from the header. No Ray worker's memory goes
    above the stated ceiling (before the limits, the strip alone took 3.4 GB)."""
    gradient16 = (np.linspace(0, 4095, 4000).astype(">u2")).tobytes()
    archive = f"{prefix}/archive"
    files = {"export-16bit-4000x4000.png": _png_stream(4000, 4000, 16, gradient16),
             "large-8bit-6000x6000.png": _png_stream(6000, 6000, 8, bytes(range(256)) * 23
                                                     + bytes(112)),
             "claims-144mp-16bit.png": _png_stream(12000, 12000, 16, bytes(24000)),
             "strip-1x60000.png": _png_stream(60000, 1, 8, bytes(60000))}
    for name, data in files.items():
        assert len(data) < 2_000_000, (name, len(data))  # small files, large claims
        storage.write_bytes(f"{archive}/{name}", data)
    summary, peaks = scored_with_worker_peaks(storage, ScoreConfig(
        archive, RunLayout(trained_run["run"]).onnx, f"{prefix}/out", threshold=0.5,
        batch_size=4))
    assert (summary["listed"], summary["scored"], summary["failed"]) == (4, 2, 2)
    errors = storage.read_parquet_dir(ScoreLayout(f"{prefix}/out").errors).set_index("uri")
    assert "image too large: 12000x12000" in errors.loc[f"{archive}/claims-144mp-16bit.png", "error"]
    assert "aspect ratio" in errors.loc[f"{archive}/strip-1x60000.png", "error"]
    assert peaks and max(peaks.values()) < WORKER_MEMORY_CEILING, sorted(peaks.values())[-3:]


def test_export_int8_keeps_the_metadata_and_scores_like_the_float_model(storage, trained_run,
                                                                        prefix, ray_local):
    from covidray.stages.export import ExportConfig, export_run

    run = f"{prefix}/run"
    storage.copy_prefix(trained_run["run"], run)
    report = export_run(ExportConfig(run=run, quantize="int8", calibration_images=8), storage)
    layout = RunLayout(run)
    int8, fp32 = storage.read_bytes(layout.onnx), storage.read_bytes(layout.onnx_fp32)
    assert len(int8) < len(fp32) / 3  # int8 weights
    metadata = read_metadata(onnx_session(int8))
    assert metadata["quantization"].startswith("int8 static (QDQ), calibrated on 8")
    assert metadata["preprocessing"] == read_metadata(onnx_session(fp32))["preprocessing"]
    assert report["int8"]["max_abs_diff_probabilities_vs_fp32"] < 0.1
    scores = {}
    for name, model in (("int8", layout.onnx), ("fp32", layout.onnx_fp32)):
        output = f"{prefix}/scores-{name}"
        score_archive(ScoreConfig(trained_run["manifest"], model, output, threshold=0.5), storage)
        scores[name] = storage.read_parquet_dir(ScoreLayout(output).predictions) \
            .set_index("uri")["score"].sort_index()
    assert len(scores["int8"]) == 32
    assert (scores["int8"] - scores["fp32"]).abs().max() < 0.1


def test_manifest_keys_are_taken_verbatim_a_leading_space_included(storage, trained_run, prefix,
                                                                    ray_local):
    """' lead.png' and 'lead.png' are two S3 keys: each is scored as itself, once."""
    rng = np.random.default_rng(21)
    spaced = storage.write_bytes(f"{prefix}/ lead.png", encode(synthetic_xray(True, rng), "png"))
    plain = storage.write_bytes(f"{prefix}/lead.png", encode(synthetic_xray(False, rng), "png"))
    manifest = storage.write_table(f"{prefix}/manifest.csv",
                                   pd.DataFrame({"file": [" lead.png", "lead.png"]}))
    summary = score_archive(ScoreConfig(manifest, RunLayout(trained_run["run"]).onnx,
                                        f"{prefix}/out"), storage)
    assert (summary["listed"], summary["scored"]) == (2, 2)
    predictions = storage.read_parquet_dir(ScoreLayout(f"{prefix}/out").predictions)
    assert sorted(predictions["uri"]) == sorted([spaced, plain])
    assert predictions.set_index("uri")["etag"].to_dict() == {
        uri: storage.identity(uri)[0] for uri in (spaced, plain)}


def test_an_object_rewritten_during_the_run_is_recorded_with_the_etag_of_the_bytes_scored(
        storage, trained_run, prefix, ray_local):
    rng = np.random.default_rng(22)
    archive = f"{prefix}/archive"
    for i in range(6):
        storage.write_bytes(f"{archive}/img-{i}.png", encode(synthetic_xray(i % 2 == 0, rng), "png"))
    rewritten = [f"{archive}/img-1.png", f"{archive}/img-4.png"]

    def rewrite(archive):  # after the listing, before any image is read
        for uri in rewritten:
            storage.write_bytes(uri, encode(synthetic_xray(True, rng, size=(200, 240)), "png"))

    with armed("scoring.snapshot_taken", rewrite):
        summary = score_archive(ScoreConfig(archive, RunLayout(trained_run["run"]).onnx,
                                            f"{prefix}/out"), storage)
    assert summary["changed_since_listing"] == 2
    assert sorted(summary["changed_examples"]) == sorted(rewritten)
    predictions = storage.read_parquet_dir(ScoreLayout(f"{prefix}/out").predictions)
    for uri, etag, size in predictions[["uri", "etag", "size"]].itertuples(index=False):
        assert (etag, size) == storage.identity(uri), uri  # what was read, not what was listed
    assert set(predictions.loc[predictions["width"] == 200, "uri"]) == set(rewritten)

