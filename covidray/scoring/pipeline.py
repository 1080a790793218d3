"""The scoring pipeline on Ray Data: staged index parts -> decoded rows (tasks) -> scores
(:class:`~covidray.onnx_runtime.OnnxScorer` in an actor pool), and the progress line the
driver prints while it writes the result batches as they arrive."""

from __future__ import annotations

import time

import pandas as pd

from covidray.imaging.loader import LOADED_COLUMNS, load_pixels
from covidray.imaging.recipe import INPUT_SIZE
from covidray.onnx_runtime import OnnxScorer
from covidray.scoring.model import ModelToScore
from covidray.scoring.parts import CARRIED
from covidray.storage import Storage


def loaded_images(storage: Storage, folder: str, batch_size: int, data_cpus: float,
                  views: str = "frontal"):
    """The staged index parts under ``folder`` -> rows with pixels and error: the scoring
    pipeline before the model. One task a part: it reads the part and decodes it batch by
    batch, each batch its own block (the model starts on the first batch, not after the
    part), with no index block passed between tasks."""
    import ray.data

    parts = list(storage.list_files(folder, (".parquet",)))
    loaded = ray.data.from_items([{"part": p} for p in parts],
                                 override_num_blocks=max(1, len(parts))).map_batches(
        _load_parts, fn_kwargs={"storage": storage, "batch_size": batch_size, "views": views},
        batch_size=1, batch_format="pandas", num_cpus=data_cpus)
    # A block as soon as a batch is decoded: the limit is one batch of pixels.
    loaded.context.target_max_block_size = batch_size * INPUT_SIZE * INPUT_SIZE
    return loaded


def _load_parts(batch: pd.DataFrame, storage: Storage, batch_size: int, views: str):
    for part in batch["part"]:
        # Arrow, not pandas: a missing label must stay None (the result blocks cannot hold
        # pd.NA).
        table = storage.read_arrow(part)
        for start in range(0, table.num_rows, batch_size):
            rows = table.slice(start, batch_size)
            yield load_pixels({c: rows.column(c).to_numpy(zero_copy_only=False)
                               for c in rows.column_names}, storage, views=views)


def scored_batches(storage: Storage, index: str, model: ModelToScore, plan, views: str,
                   actors: int | None):
    """The one Ray Data execution over the staged parts under ``index``: result batches
    (pandas) with the score, the prediction at the model's threshold, and the columns a
    result part keeps. ``plan``: the cluster's :class:`~covidray.cluster.ResourcePlan`;
    ``actors``: exactly this many onnxruntime actors (else sized by the plan)."""
    import ray.data

    results = (loaded_images(storage, index, plan.inference_batch, plan.decode_cpus, views)
               .map_batches(OnnxScorer,
                            fn_constructor_kwargs={"model": model.data, "name": model.uri,
                                                   "threshold": model.threshold,
                                                   "calibration": model.calibration,
                                                   "threads": plan.inference_threads,
                                                   "gpu": plan.inference_gpus > 0,
                                                   "keep": (*CARRIED, *LOADED_COLUMNS,
                                                            "changed")},
                            batch_format="numpy", batch_size=plan.inference_batch,
                            # Not the decode tasks' reservation: Ray Data would fuse them
                            # into the actor, and decoding would wait on inference.
                            num_cpus=plan.inference_actor_cpus,
                            num_gpus=plan.inference_gpus,
                            compute=ray.data.ActorPoolStrategy(
                                min_size=actors or 1, max_size=actors or plan.scoring_actors)))
    return results.iter_batches(batch_size=None, batch_format="pandas")


class Progress:
    """One line at a steady cadence: scored / to score, images per second, ETA."""

    def __init__(self, total: int, every: float):
        self.total, self.every = total, every
        self.started = self.last = time.monotonic()

    def update(self, done: int) -> None:
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            rate = done / max(now - self.started, 1e-9)
            eta = (self.total - done) / rate if rate else float("inf")
            print(f"progress: {done}/{self.total} images ({100 * done / max(self.total, 1):.1f}%)"
                  f", {rate:.1f} images/s, ETA {eta:.0f} s", flush=True)

    def done(self, done: int) -> None:
        elapsed = time.monotonic() - self.started
        print(f"scored {done} images in {elapsed:.1f} s ({done / max(elapsed, 1e-9):.1f} "
              "images/s)", flush=True)
