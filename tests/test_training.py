"""Training on a real local Ray instance and S3 server: checkpoints, history and splits,
frozen-backbone features, resume, the decode tasks, two Ray Train workers per backbone."""

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest

from covidray.features import extract_features
from covidray.imaging.recipe import preprocess
from covidray.layout import RunLayout
from covidray.model import initial_model, load_checkpoint, model_from_checkpoint
from covidray.stages.train import TrainConfig, fit, image_stream, latest_checkpoint

from conftest import upload_synthetic


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
