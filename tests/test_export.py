"""Export: model.pt -> model.onnx with its metadata, parity with torch on real images, int8,
and one preprocessing recipe from training through export to scoring."""

import json

import numpy as np
import pandas as pd
import pytest

from covidray.imaging.recipe import RECIPE, preprocess
from covidray.imaging.recipe import model_inputs
from covidray.layout import RunLayout, ScoreLayout
from covidray.model import build_model, checkpoint_recipe, load_checkpoint, model_from_checkpoint
from covidray.onnx_export import ExportParityError, export_onnx, model_metadata, parity_check
from covidray.onnx_runtime import onnx_session, read_metadata
from covidray.scoring.index import snapshot_index
from covidray.scoring.pipeline import loaded_images
from covidray.stages.export import parity_inputs
from covidray.stages.score import ScoreConfig, score_archive
from covidray.stages.train import image_stream


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
