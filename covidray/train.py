"""Fine-tuning ResNet18: the plain PyTorch loop, and Ray Train around it.

:func:`train_one_epoch` and :func:`evaluate` are plain PyTorch over an iterable of
numpy batches (``pixels``, ``target``); they run without Ray. :func:`train_loop_per_worker`
is what each Ray Train worker runs, fed by Ray Data shards; :func:`fit` builds the
datasets and the ``TorchTrainer`` on the driver.
"""

from __future__ import annotations

import dataclasses
import io
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import torch
from torch import nn

from covidray.augment import AugmentConfig, Augmenter
from covidray.datasets import (INDEX_COLUMNS, POSITIVE_LABEL, assign_splits, grow_class,
                               load_index, load_pixels, model_inputs)
from covidray.layout import CHECKPOINT_FILE, RunLayout
from covidray.metrics import DEFAULT_THRESHOLD, roc_auc, summarise
from covidray.model import (build_model, checkpoint_bytes, covid_probability, freeze_for, head,
                            initial_model, load_checkpoint, set_train_mode)
from covidray.storage import Location, Storage


@dataclass
class TrainConfig:
    """Every choice a training run makes; stored with the run and inside the exported model."""

    data: str
    output: str
    protocol: str = "paper"  # the preset the values came from (see covidray.cli.PRESETS)
    epochs: int = 100
    batch_size: int = 20
    lr: float = 1e-4
    weights: str = "imagenet"
    train_layers: str = "fc"
    workers: int = 1
    use_gpu: bool = False
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 0
    covid_target: int = 0  # grow the COVID training class to this many images (augmented copies)
    threshold: float = DEFAULT_THRESHOLD  # operating threshold stored in the model
    checkpoint_every: int = 0  # epochs between checkpoints; 0 = auto (1 when all layers train,
    #                            10 for a head on cached features); the last epoch always is
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    resume: bool = False

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        values = dict(values)
        values["augment"] = AugmentConfig(**values.get("augment", {}))
        return cls(**values)


# --- plain PyTorch -----------------------------------------------------------------------

def batch_tensors(batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch -> (inputs, targets) on ``device``, dropping rows that failed to load."""
    inputs, ok = model_inputs(batch)
    x = torch.from_numpy(inputs).to(device)
    y = torch.from_numpy(np.asarray(batch["target"])[ok].astype(np.int64)).to(device)
    return x, y


def train_one_epoch(model: nn.Module, criterion, optimizer, batches: Iterable[dict],
                    device: torch.device, train_layers: str) -> dict:
    set_train_mode(model, train_layers)
    total_loss, seen = 0.0, 0
    for batch in batches:
        x, y = batch_tensors(batch, device)
        if not len(y):
            continue
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(model(x), y)
        loss.backward()
        optimizer.step()
        total_loss += loss.item() * len(y)
        seen += len(y)
    return {"train_loss": total_loss / max(seen, 1), "train_images": seen}


@torch.inference_mode()
def evaluate(model: nn.Module, criterion, batches: Iterable[dict], device: torch.device,
             threshold: float) -> dict:
    model.eval()
    losses, scores, targets = [], [], []
    for batch in batches:
        x, y = batch_tensors(batch, device)
        if not len(y):
            continue
        logits = model(x)
        losses.append(criterion(logits, y).item() * len(y))
        scores.append(covid_probability(logits).cpu().numpy())
        targets.append(y.cpu().numpy())
    if not scores:
        return {"val_images": 0}
    scores, targets = np.concatenate(scores), np.concatenate(targets)
    at = summarise(scores, targets, [threshold]).counts_at(threshold)
    return {"val_images": int(len(targets)), "val_loss": float(sum(losses) / len(targets)),
            "val_auc": roc_auc(scores, targets), "val_sensitivity": at.sensitivity,
            "val_specificity": at.specificity, "val_threshold": threshold}


def make_checkpoint(model: nn.Module, optimizer, epoch: int, config: TrainConfig,
                    history: list[dict], weights_note: str) -> dict:
    state = getattr(model, "module", model).state_dict()
    return {"model": {k: v.detach().cpu() for k, v in state.items()},
            "optimizer": optimizer.state_dict(), "epoch": epoch, "config": config.to_dict(),
            "history": history, "weights": weights_note}


# --- Ray Train worker --------------------------------------------------------------------

def train_loop_per_worker(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch

    config = TrainConfig.from_dict(loop_config["config"])
    storage: Storage = loop_config["storage"]
    torch.set_num_threads(min(loop_config["torch_threads"], os.cpu_count() or 1))
    device = ray.train.torch.get_device()

    # The same starting model the feature actors built: their features fit its backbone.
    model = freeze_for(initial_model(config.weights, config.seed, storage), config.train_layers)
    # On cached features the loop trains the head alone; otherwise the whole model (with
    # the layers freeze_for froze left untouched). Same parameters, same optimizer state.
    cached = loop_config["cached_features"]
    trainable, mode = (head(model), "all") if cached else (model, config.train_layers)
    optimizer = torch.optim.Adam([p for p in trainable.parameters() if p.requires_grad],
                                 lr=config.lr)
    start_epoch, history = 0, []
    restored = _restore(ray.train.get_checkpoint(), loop_config.get("resume_from"), storage)
    if restored is not None:
        model.load_state_dict(restored["model"])
        optimizer.load_state_dict(restored["optimizer"])
        start_epoch, history = restored["epoch"] + 1, list(restored["history"])
    trainable = ray.train.torch.prepare_model(trainable)
    criterion = nn.CrossEntropyLoss()
    rank = ray.train.get_context().get_world_rank()

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    for epoch in range(start_epoch, config.epochs):
        started = time.time()
        batches = train_shard.iter_batches(batch_size=config.batch_size, batch_format="numpy",
                                           local_shuffle_buffer_size=max(4 * config.batch_size, 64),
                                           local_shuffle_seed=config.seed + epoch)
        metrics = {"epoch": epoch,
                   **train_one_epoch(trainable, criterion, optimizer, batches, device, mode)}
        if val_shard is not None:
            metrics.update(evaluate(trainable, criterion,
                                    val_shard.iter_batches(batch_size=64, batch_format="numpy"),
                                    device, config.threshold))
        metrics["epoch_seconds"] = round(time.time() - started, 2)
        history.append(metrics)
        checkpoint = None
        every = config.checkpoint_every or (10 if cached else 1)
        due = (epoch + 1) % every == 0 or epoch + 1 == config.epochs
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0 and due:  # one copy of the checkpoint, written by rank 0 only
                state = make_checkpoint(model, optimizer, epoch, config, history,
                                        loop_config["weights_note"])
                with open(os.path.join(tmp, CHECKPOINT_FILE), "wb") as fh:
                    fh.write(checkpoint_bytes(state))
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)


def _restore(ray_checkpoint, resume_from: str | None, storage: Storage) -> dict | None:
    if ray_checkpoint is not None:
        with ray_checkpoint.as_directory() as directory:
            with open(os.path.join(directory, CHECKPOINT_FILE), "rb") as fh:
                return torch.load(io.BytesIO(fh.read()), map_location="cpu", weights_only=True)
    if resume_from:
        return load_checkpoint(storage, resume_from)
    return None


# --- driver ------------------------------------------------------------------------------

def prepare_index(config: TrainConfig, storage: Storage):
    """The labelled index with patient-level splits and grown COVID class (``copy`` >= 1)."""
    index = assign_splits(load_index(storage, config.data), config.val_fraction,
                          config.test_fraction, config.seed)
    train = grow_class(index[index["split"] == "train"], POSITIVE_LABEL, config.covid_target)
    return index, train


def image_stream(frame, storage: Storage, augmenter=None, data_cpus: float = 1.0):
    """A Ray Dataset streaming index rows from storage through decode (+ augment) to pixels."""
    import ray.data

    columns = [c for c in INDEX_COLUMNS if c != "patient_id"]
    return ray.data.from_pandas(frame[columns].reset_index(drop=True)).map_batches(
        load_pixels, fn_kwargs={"storage": storage, "augmenter": augmenter},
        batch_format="numpy", batch_size=32, num_cpus=data_cpus)


def training_datasets(train_index, val_index, storage: Storage, augmenter,
                      data_cpus: float) -> dict:
    """The Ray Datasets fed to Ray Train: augmented ``train``, plain ``val`` (if any)."""
    datasets = {"train": image_stream(train_index, storage, augmenter, data_cpus)}
    if len(val_index):
        datasets["val"] = image_stream(val_index, storage, None, data_cpus)
    return datasets


def cache_features(datasets: dict, config: TrainConfig, storage: Storage, plan,
                   layout: RunLayout) -> dict:
    """Run each image dataset through the frozen backbone once; store and return the features."""
    import ray.data

    from covidray.features import BackboneFeatures

    cached = {}
    for name, images in datasets.items():
        started = time.time()
        target = Location.parse(layout.features(name))
        storage.delete_prefix(target.uri)
        images.map_batches(
            BackboneFeatures, batch_format="numpy", batch_size=32, num_cpus=plan.data_cpus,
            fn_constructor_kwargs={"weights": config.weights, "seed": config.seed,
                                   "storage": storage, "threads": plan.feature_threads},
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=plan.scoring_actors),
        ).write_parquet(target.fs_path, filesystem=storage.filesystem(target))
        # Small (2 KB an image): hold them in the object store, so epochs do not re-read storage.
        cached[name] = ray.data.read_parquet(target.fs_path,
                                             filesystem=storage.filesystem(target)).materialize()
        print(f"backbone features for {name}: {cached[name].count()} images in "
              f"{time.time() - started:.1f} s -> {target.uri}")
    return cached


def latest_checkpoint(storage: Storage, layout: RunLayout) -> str | None:
    """The newest Ray Train checkpoint under the run (checkpoint directories sort by time)."""
    found = [u for u in storage.list_files(layout.checkpoints) if u.endswith("/" + CHECKPOINT_FILE)
             or u.endswith(os.sep + CHECKPOINT_FILE)]
    return max(found, key=lambda u: u.rsplit("checkpoint_", 1)[-1]) if found else None


def describe_weights(weights: str) -> str:
    return {"imagenet": "torchvision ResNet18_Weights.IMAGENET1K_V1",
            "none": "random initialisation (no pretrained weights)"}.get(weights, weights)


def fit(config: TrainConfig, storage: Storage, ray_address: str | None = None) -> dict:
    """Train on the cluster; writes config, splits, history and ``model.pt`` under ``config.output``.

    Returns a summary dict (epochs run, final metrics, where the artifacts are).
    """
    from covidray.cluster import connect_ray, plan_resources

    layout = RunLayout(config.output)
    storage.check(config.data)
    storage.check(config.output, writable=True)
    # Fail here, on the driver, rather than in every worker.
    build_model(config.weights, storage)

    ray = connect_ray(ray_address)
    import ray.train
    from ray.train.torch import TorchTrainer

    index, train_index = prepare_index(config, storage)
    storage.write_bytes(layout.splits, _parquet_bytes(index))
    storage.write_json(layout.config, config.to_dict())
    val_index = index[index["split"] == "val"]
    counts = train_index.groupby("label").size().to_dict()
    print(f"train: {len(train_index)} rows {counts} (COVID grown to {config.covid_target or 'n/a'}),"
          f" val: {len(val_index)}, test: {int((index['split'] == 'test').sum())}")

    plan = plan_resources(ray.cluster_resources(), config.workers, config.use_gpu)
    print(f"resources: {plan.to_dict()}")
    datasets = training_datasets(train_index, val_index, storage,
                                 Augmenter(config.augment, config.seed), plan.data_cpus)
    cached = config.train_layers == "fc"
    if cached:  # a frozen backbone: compute its features once, train the head on them
        datasets = cache_features(datasets, config, storage, plan, layout)

    resume_from = None
    if config.resume:
        resume_from = latest_checkpoint(storage, layout)
        print(f"resuming from {resume_from}" if resume_from else "no checkpoint to resume from")
    checkpoints = Location.parse(layout.checkpoints)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": config.to_dict(), "storage": storage, "cached_features": cached,
                           "torch_threads": plan.torch_threads, "resume_from": resume_from,
                           "weights_note": describe_weights(config.weights)},
        scaling_config=ray.train.ScalingConfig(
            num_workers=plan.workers, use_gpu=config.use_gpu,
            resources_per_worker={"CPU": plan.worker_cpus,
                                  **({"GPU": plan.worker_gpus} if config.use_gpu else {})}),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
        run_config=ray.train.RunConfig(
            name=f"train-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=checkpoints.fs_path,
            storage_filesystem=storage.filesystem(checkpoints),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError("training produced no checkpoint (was --epochs already reached?)")
    with result.checkpoint.as_directory() as directory:
        with open(os.path.join(directory, CHECKPOINT_FILE), "rb") as fh:
            final = fh.read()
    storage.write_bytes(layout.model_checkpoint, final)
    state = torch.load(io.BytesIO(final), map_location="cpu", weights_only=True)
    storage.write_json(layout.history, state["history"])
    return {"epochs": state["epoch"] + 1, "final": state["history"][-1],
            "model": layout.model_checkpoint, "history": layout.history,
            "splits": layout.splits, "checkpoints": layout.checkpoints,
            "weights": state["weights"]}


def _parquet_bytes(frame) -> bytes:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    return buffer.getvalue()
