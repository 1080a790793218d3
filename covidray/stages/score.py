"""``covidray score``: score an X-ray archive with onnxruntime on Ray Data.

One run: take the output's lease -> read the archive's index once into a snapshot the run
owns -> (``--incremental``: keep only objects this model has not scored) -> one Ray Data
execution (decode in tasks, :class:`covidray.onnx_model.OnnxScorer` in an actor pool) whose
result batches the driver writes as ``predictions/`` and ``errors/`` parts as they arrive,
printing progress -> metrics (labelled archives) -> ``_SUCCESS.json`` last, and only when
every listed image is in exactly one of ``predictions`` or ``errors``.

With ``--incremental`` each run is a dated part (``<output>/runs/<run>/``) and
``<output>/_CURRENT.json`` is the cumulative view readers use: the committed runs and the
state table (every object the archive lists now, for this model, at this run's threshold).
A run killed half-way leaves a
part without ``_SUCCESS.json``; the next run adopts what it wrote instead of rescoring it.
"""

from __future__ import annotations

import io
import time
import uuid
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from covidray.config import option, to_dict
from covidray.datasets import (ARCHIVE_COLUMNS, LOADED_COLUMNS, is_manifest, iter_prefix_rows,
                               load_pixels, manifest_to_index, normalise_index)
from covidray.images import IMAGE_SUFFIXES, INPUT_SIZE
from covidray.incremental import (STATE_COLUMNS, STATE_SCHEMA, UNKNOWN_ETAG, UNKNOWN_SIZE,
                                  ViewChange, frames_of, merged_state, reconcile, rows,
                                  state_frame, state_table)
from covidray.labels import LABELS, label_index
from covidray.layout import ScoreLayout, model_card_beside
from covidray.lease import Lease
from covidray.metrics import (PAPER_THRESHOLDS, ScoreSummary, SortedAUC, metrics_report,
                              sweep_csv, sweep_thresholds)
from covidray.model_card import model_digest, scoring_threshold
from covidray.onnx_model import GPU_POLICIES, OnnxScorer, score_on_gpu
from covidray.storage import Location, Storage, StorageError
from covidray.views import VIEW_POLICIES

IDENTITY_COLUMNS = ["etag", "size"]  # with the uri: which version of an object was scored
CARRIED = [*ARCHIVE_COLUMNS, *IDENTITY_COLUMNS]  # what an index row carries to the outputs
# Outputs add what loading found: the DICOM UIDs, view position, modality, manufacturer and
# the view check (empty strings where an image has none).
PREDICTION_COLUMNS = [*CARRIED, *LOADED_COLUMNS, "score", "prediction", "threshold"]
ERROR_COLUMNS = [*CARRIED, *LOADED_COLUMNS, "error"]
INDEX_PART_ROWS = 256  # rows per snapshot part: a part is a block, and blocks decode in parallel
STATE_PART_ROWS = 50_000
RESULT_PART_ROWS = 20_000  # rows per predictions/errors part the driver writes


@dataclass(frozen=True)
class ScoreConfig:
    archive: str = option("", "a prefix of images (labels from <p>/<label>/ folders when "
                              "present) or a manifest .csv/.parquet", required=True)
    model: str = option("", "model.onnx written by `covidray export`", required=True)
    output: str = option("", "scoring output directory (s3://... or a path)", required=True)
    threshold: float | None = option(None, "operating threshold (default: the model card's, "
                                           "chosen on validation by `covidray evaluate`; "
                                           "else the model's training default)")
    batch_size: int | None = option(None, "images per inference batch (default: 32 on CPUs, "
                                          "128 on a GPU)")
    gpu: str = option("auto", "auto: where the cluster has GPUs and onnxruntime on its GPU "
                              "nodes has CUDA, one onnxruntime actor per GPU; on: that, or "
                              "fail; off: CPUs only",
                      choices=GPU_POLICIES)
    views: str = option("frontal", "frontal: a lateral view (DICOM ViewPosition LL/RL/LATERAL) "
                                   "goes to errors, 'lateral view skipped'; all: score every "
                                   "view (the view_check column says which are not frontal)",
                        choices=VIEW_POLICIES)
    actors: int | None = option(None, "onnxruntime actors, exactly (default: sized from the "
                                      "cluster: one per GPU when scoring on GPUs, else 1 up "
                                      "to one per 2 CPUs)")
    allow_local_paths: bool = option(False, "let a manifest held in object storage name local "
                                            "paths, opened on the workers")
    incremental: bool = option(False, "score only what is new or changed (key + ETag/size) "
                                      "since the last successful run of this model; each run "
                                      "is a dated part, <output>/_CURRENT.json the cumulative "
                                      "view; a killed run is resumed by the next")
    lease_seconds: float = option(300.0, "a run holds <output>/_LEASE.json, renewed every third "
                                         "of this; a killed run's lease lapses after it")
    max_removed: float = option(0.5, "--incremental: the largest share of the cumulative view "
                                     "one run may drop because its objects are no longer "
                                     "listed; more fails the run, leaving the view as it was "
                                     "(a truncated manifest would otherwise empty it)")
    progress_seconds: float = option(30.0, "seconds between progress lines (each also writes "
                                           "the results so far: what a resumed run keeps)")


# --- the index snapshot ------------------------------------------------------------------

def snapshot_index(storage: Storage, archive: str, staging: str,
                   allow_local_paths: bool = False) -> int:
    """Read the archive's index once, into Parquet parts under ``<staging>/index`` that this
    run owns; returns how many images it lists. A manifest is read in chunks and a prefix
    listed page by page (bounded memory), and every row is validated here, on the driver,
    before any cluster work: a bad manifest fails with one line. Parts of a prefix listing
    are in URI order (S3 lists keys in that order)."""
    listed = 0
    for part, frame in enumerate(_index_chunks(storage, archive, allow_local_paths)):
        storage.write_table(f"{staged(staging)}/part-{part:05d}.parquet", _carried(frame))
        listed += len(frame)
    if not listed:
        raise StorageError(f"no images found in '{archive}' "
                           f"(looked for {', '.join(IMAGE_SUFFIXES)})")
    return listed


def same_archive(one: str, other: str) -> bool:
    """Whether two ``--archive`` values name the same archive (``s3://b/x/`` is ``s3://b/x``)."""
    return Location.parse(one).uri == Location.parse(other).uri


def _carried(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.assign(**{c: frame[c] if c in frame else d for c, d in
                            (("etag", UNKNOWN_ETAG), ("size", UNKNOWN_SIZE))})
    frame["etag"] = frame["etag"].fillna(UNKNOWN_ETAG).astype(str)
    frame["size"] = pd.to_numeric(frame["size"], errors="coerce").fillna(UNKNOWN_SIZE) \
        .astype("int64")
    return frame[CARRIED]


def with_identity(frame: pd.DataFrame, storage: Storage) -> pd.DataFrame:
    """Index rows without ETag and size (a manifest may have none) get them from the object,
    as a listing gives them, so a nightly run sees an object rewritten under its key."""
    unknown = np.flatnonzero((frame["etag"] == UNKNOWN_ETAG).to_numpy())
    if not len(unknown):
        return frame
    frame = frame.copy()
    etag, size = frame.columns.get_loc("etag"), frame.columns.get_loc("size")
    for row in unknown:
        found = storage.identity(frame["uri"].iat[row])
        if found:
            frame.iat[row, etag], frame.iat[row, size] = found
    return frame


def _index_chunks(storage: Storage, archive: str, allow_local_paths: bool):
    if is_manifest(archive):
        for chunk in _manifest_chunks(storage, archive):
            yield manifest_to_index(chunk, archive, allow_local_paths)
        return
    columns = ["uri", "label", "etag", "size"]
    batch = []
    for row in iter_prefix_rows(storage, archive):
        batch.append(row)
        if len(batch) == INDEX_PART_ROWS:
            yield normalise_index(pd.DataFrame(batch, columns=columns))
            batch = []
    if batch:
        yield normalise_index(pd.DataFrame(batch, columns=columns))


def _manifest_chunks(storage: Storage, manifest: str):
    """A manifest as DataFrames of at most INDEX_PART_ROWS rows, every value text."""
    import pyarrow.parquet as pq

    location = Location.parse(manifest)
    with storage.filesystem(location).open_input_file(location.fs_path) as fh:
        if manifest.lower().endswith(".parquet"):
            for batch in pq.ParquetFile(fh).iter_batches(batch_size=INDEX_PART_ROWS):
                yield batch.to_pandas()
        else:
            yield from pd.read_csv(fh, dtype=str, keep_default_na=False, na_values=[""],
                                   chunksize=INDEX_PART_ROWS)


def parquet_parts(storage: Storage, folders: list[str] = (), columns: list[str] | None = None,
                  state_of_run: str | None = None, parts: list[str] = ()):
    """The Parquet parts under ``folders`` (and the ``parts`` named) as a Ray Dataset, one
    block a part, read through :class:`Storage` (so an outage is ridden out up to its bound,
    then fails the run). With ``state_of_run``, result parts become that run's state rows."""
    import ray.data

    parts = [*parts, *(p for folder in folders
                       for p in storage.list_files(folder, (".parquet",)))]
    return ray.data.from_items([{"part": p} for p in parts],
                               override_num_blocks=max(1, len(parts))).map_batches(
        _read_parts, fn_kwargs={"storage": storage, "columns": columns, "run": state_of_run},
        batch_size=1, batch_format="pandas", num_cpus=0.25)


def _read_parts(batch: pd.DataFrame, storage: Storage, columns: list[str] | None,
                run: str | None):
    frames = [storage.read_table(part) for part in batch["part"]]
    frame = pd.concat(frames, ignore_index=True)
    if run is not None:
        return state_table(frame, run)
    return frame[columns] if columns else frame


def staged(staging: str, name: str = "index") -> str:
    """The folder of a staged table of this run: its index snapshot (``index``) or what is
    left to score (``todo``)."""
    return f"{staging}/{name}"


def ready_marker(staging: str) -> str:
    """Written in a whole run's staging once its result is complete, before the swap: the
    run's summary, so that whoever finishes the swap writes the right ``_SUCCESS.json``."""
    return f"{staging}/ready.json"


def staged_index(storage: Storage, staging: str):
    """This run's index snapshot as a Ray Dataset."""
    return parquet_parts(storage, [staged(staging)])


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


# --- one run -----------------------------------------------------------------------------

def score_archive(config: ScoreConfig, storage: Storage, ray_address: str | None = None) -> dict:
    """Score every image in ``config.archive`` (with ``incremental``: every image this
    model has not scored yet); write predictions, errors and metrics under
    ``config.output``. Returns the summary also written to ``_SUCCESS.json``.

    ``_SUCCESS.json`` is published only for a complete, reconciled result; any failure
    leaves no marker and raises.
    """
    started = time.time()
    output = config.output
    if not 0 <= config.max_removed <= 1:
        raise ValueError(f"--max-removed {config.max_removed:g}: a share of the cumulative view, "
                         "from 0 (never drop an object) to 1")
    if not is_manifest(config.archive) and Location.parse(config.archive).contains(
            Location.parse(output)):
        raise ValueError(f"--output {output} is inside --archive {config.archive}: the next run "
                         "would list this run's results (its figures are PNGs) as X-rays. Put "
                         "the output outside the archive")
    storage.check(config.archive)
    storage.check(output, writable=True)
    if not storage.exists(config.model):
        raise StorageError(f"model '{config.model}' not found: run `covidray export` first or "
                           "fix --model")
    model_bytes = storage.read_bytes(config.model)
    # Load once here so a bad model fails before any work is scheduled.
    metadata = OnnxScorer(model_bytes, config.model).metadata
    card_uri = model_card_beside(config.model)
    card = storage.read_json(card_uri) if storage.exists(card_uri) else None
    threshold, threshold_source = scoring_threshold(config.threshold, card, metadata,
                                                    model_digest(model_bytes), card_uri)
    print(f"threshold {threshold:.4g} from {threshold_source}", flush=True)
    run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
    base = ScoreLayout(output)
    # Join the cluster before any Ray Data call: Ray Data would otherwise start Ray itself
    # with address "auto", which finds whatever cluster this machine last ran (dead or not).
    # Sized now, so that a --gpu the cluster cannot meet fails before the output is touched.
    from covidray.cluster import connect_ray

    plan = scoring_plan(config, connect_ray(ray_address))
    with Lease(storage, base.lease, config.lease_seconds, f"covidray score {run_id}") as lease:
        run = Run(config, storage, ray_address, run_id, threshold, model_bytes, lease, plan)
        summary = run.incremental() if config.incremental else run.whole()
        summary.update(threshold_source=threshold_source,
                       seconds=round(time.time() - started, 1))
        if summary.get("nothing_new"):
            return summary
        lease.check()
        run.publish(summary)
    return summary


def scoring_plan(config: ScoreConfig, ray):
    """Actors, threads, GPUs and batch size (``--batch-size`` where given) for scoring, sized
    from the cluster; says which."""
    from covidray.cluster import plan_resources, providers_on_gpu_nodes

    cluster = ray.cluster_resources()
    on_gpu = score_on_gpu(config.gpu, cluster, lambda: providers_on_gpu_nodes(ray))
    plan = plan_resources(cluster, use_gpu=on_gpu)
    plan = replace(plan, inference_batch=config.batch_size or plan.inference_batch)
    where = "a GPU" if plan.inference_gpus else f"{plan.inference_threads} CPU thread(s)"
    print(f"scoring with up to {config.actors or plan.scoring_actors} onnxruntime actor(s), "
          f"each on {where}, batches of {plan.inference_batch}", flush=True)
    return plan


class Run:
    """One scoring run into ``config.output``; :meth:`whole` or :meth:`incremental`."""

    def __init__(self, config: ScoreConfig, storage: Storage, ray_address, run_id: str,
                 threshold: float, model_bytes: bytes, lease: Lease, plan):
        self.config, self.storage, self.ray_address = config, storage, ray_address
        self.plan = plan
        self.run_id, self.threshold, self.lease = run_id, threshold, lease
        self.model_bytes = model_bytes
        self.model_digest = model_digest(model_bytes)
        self.base = ScoreLayout(config.output)
        # Where the result is published (``layout``), and where this run writes it while it
        # runs (``work``): a nightly run's own part (not read until _CURRENT.json names it);
        # for a whole run a folder of its staging, so the last result stays until this one
        # is complete.
        self.layout = (ScoreLayout(self.base.run_part(run_id)) if config.incremental
                       else self.base)
        self.staging = self.base.staging_run(run_id)
        self.work = (self.layout if config.incremental
                     else ScoreLayout(staged(self.staging, "result")))
        self._current = None

    def clear_dead_staging(self) -> None:
        """Finish or remove what runs that died left in ``_staging``: this run holds the
        output's lease, so no other live run is using it. A run that died while it swapped
        its complete result in (killed, or an outage past its bound) left the published
        result half replaced: its swap is finished first, so the output holds a whole result
        again, that run's."""
        staging = Location.parse(self.base.staging).uri
        for ready in self.storage.list_files(self.base.staging, (".json",)):
            run_staging = ready.rsplit("/", 1)[0]
            if (ready != ready_marker(run_staging)
                    or Location.parse(run_staging).uri.rsplit("/", 1)[0] != staging):
                continue
            summary = self.storage.read_json(ready)
            self.replace_published(ScoreLayout(staged(run_staging, "result")), summary)
            print(f"published the complete result of run {summary['run']}, which died while "
                  "it replaced the previous one", flush=True)
        removed = self.storage.delete_prefix(self.base.staging)
        if removed:
            print(f"removed {removed} staging objects left by an unfinished run", flush=True)

    def whole(self) -> dict:
        """Score the whole archive into this run's staging; the previous result stays
        published until :meth:`publish` (only for a complete, reconciled result)."""
        storage = self.storage
        self.clear_dead_staging()
        storage.write_json(self.work.config, {**to_dict(self.config), "run": self.run_id})
        try:
            listed = snapshot_index(storage, self.config.archive, self.staging,
                                    self.config.allow_local_paths)
            counts = self.score(staged(self.staging), listed)
            return self.finish(listed, counts, listed)
        except BaseException:
            storage.delete_prefix(self.staging)
            raise

    def publish(self, summary: dict) -> None:
        """Publish this run's complete result. A nightly run: its part's marker, then the
        cumulative view readers use. A whole run: its result in place of the output's
        previous one; once the staged result is marked ready, a failure part-way leaves it in
        staging, and the next run into the output finishes the swap
        (:meth:`clear_dead_staging`)."""
        if self.config.incremental:
            self.storage.write_json(self.layout.success, summary)
            self.storage.write_json(self.base.current, self.current_view(summary))
            return
        self.storage.write_json(ready_marker(self.staging), summary)
        self.replace_published(self.work, summary)
        self.storage.delete_prefix(self.staging)

    def replace_published(self, new: ScoreLayout, summary: dict) -> None:
        """Swap a complete staged result in for the output's published one: unpublish it
        (readers wait for the marker), remove it (nothing of it stays beside the new one),
        copy the new predictions, errors, metrics and config into place, marker last."""
        old = self.base
        for stale in (old.success, old.current):
            self.storage.delete(stale)
        for folder in (old.metrics, old.predictions, old.errors):
            self.storage.delete_prefix(folder)
        self.storage.copy_prefix(new.root, old.root)
        self.storage.write_json(old.success, summary)

    def incremental(self) -> dict:
        """Score only the objects not in the state table (nor in a killed run's part)."""
        storage, layout = self.storage, self.layout
        current = self.current()  # first: a view of another archive is refused untouched
        self.clear_dead_staging()
        storage.write_json(layout.config, {**to_dict(self.config), "run": self.run_id,
                                           "model_digest": self.model_digest})
        try:
            listed = snapshot_index(storage, self.config.archive, self.staging,
                                    self.config.allow_local_paths)
            counts = self.adopt_killed_runs()
            adopted = counts["scored"] + counts["failed"]
            todo, change = self.stage_todo(current, adopted)
            if todo == 0 and adopted == 0 and not change.changes_view:
                storage.delete_prefix(layout.root)
                last = current["runs"][-1] if current["runs"] else "none"
                print(f"nothing new: all {listed} listed objects were already scored by this "
                      f"model (last run {last})", flush=True)
                return {"archive": self.config.archive, "output": self.config.output,
                        "listed": listed, "new": 0, "nothing_new": True, "last_run": last}
            print(f"{todo} of {listed} listed objects are new or changed", flush=True)
            self.report_view_change(change)
            if todo:
                counts = self.score(staged(self.staging, "todo"), todo, already=counts)
            summary = self.finish(todo + adopted, counts, listed, new=todo, adopted=adopted,
                                  removed=change.removed, rethresholded=change.rethresholded)
            self.write_state(change)
            return summary
        finally:
            storage.delete_prefix(self.staging)

    # --- pieces -------------------------------------------------------------------------
    def connect(self):
        from covidray.cluster import alive_nodes, connect_ray, require_object_storage

        ray = connect_ray(self.ray_address)
        require_object_storage(alive_nodes(ray), archive=self.config.archive,
                               output=self.config.output, model=self.config.model)
        return ray

    def score(self, index: str, expected: int, already: dict | None = None) -> dict:
        """The one Ray Data execution over the staged parts under ``index``; the driver
        writes result parts as batches arrive."""
        import ray.data

        self.connect()
        plan = self.plan
        results = (loaded_images(self.storage, index, plan.inference_batch, plan.decode_cpus,
                                 self.config.views)
                   .map_batches(OnnxScorer,
                                fn_constructor_kwargs={"model": self.model_bytes,
                                                       "name": self.config.model,
                                                       "threshold": self.threshold,
                                                       "threads": plan.inference_threads,
                                                       "gpu": plan.inference_gpus > 0,
                                                       "keep": (*CARRIED, *LOADED_COLUMNS)},
                                batch_format="numpy", batch_size=plan.inference_batch,
                                # Not the decode tasks' reservation: Ray Data would fuse
                                # them into the actor, and decoding would wait on inference.
                                num_cpus=plan.inference_actor_cpus,
                                num_gpus=plan.inference_gpus,
                                compute=ray.data.ActorPoolStrategy(
                                    min_size=self.config.actors or 1,
                                    max_size=self.config.actors or plan.scoring_actors)))
        writer = PartWriter(self.storage, self.work, self.run_id, already,
                            self.config.progress_seconds)
        progress = Progress(expected, self.config.progress_seconds)
        for batch in results.iter_batches(batch_size=None, batch_format="pandas"):
            writer.add(batch)
            progress.update(writer.counts["scored"] + writer.counts["failed"]
                            - writer.start_total)
        writer.close()
        progress.done(writer.counts["scored"] + writer.counts["failed"] - writer.start_total)
        return writer.counts

    def finish(self, expected: int, counts: dict, listed: int, **extra) -> dict:
        """Reconcile, write the metrics beside this run's results, and return the summary (not
        yet the marker)."""
        self.lease.check()
        if expected != counts["scored"] + counts["failed"]:
            raise RuntimeError(f"not published: listed {expected} != scored {counts['scored']} "
                               f"+ failed {counts['failed']}")
        for folder, key, columns in ((self.work.predictions, "scored", PREDICTION_COLUMNS),
                                     (self.work.errors, "failed", ERROR_COLUMNS)):
            if not counts[key]:  # readers always find a table with the right columns
                _write_empty(self.storage, f"{folder}/part-empty.parquet", columns)
        summary = {"archive": self.config.archive, "model": self.config.model,
                   "model_digest": self.model_digest, "output": self.config.output,
                   "run": self.run_id, "listed": listed, **extra,
                   "scored": counts["scored"], "failed": counts["failed"],
                   "threshold": self.threshold, "predictions": self.layout.predictions,
                   "errors": self.layout.errors, "reconciled": True}
        if counts["labelled"]:
            if not sorts_on_driver(counts["scored"]):
                self.connect()
            summary["metrics"] = {**publish_metrics(self.storage, self.work, self.threshold,
                                                    counts["scored"]),
                                  "metrics_json": self.layout.metrics_json}
        return summary

    # --- incremental state ------------------------------------------------------------------
    def current(self) -> dict:
        """The cumulative view this run started from, or an empty one (also when the model or
        the ``--views`` policy changed: what was skipped or scored may differ). A view of
        another archive is refused: this run would drop all of it."""
        if self._current is None:
            self._current = {"runs": [], "state": None, "model_digest": self.model_digest}
            if self.storage.exists(self.base.current):
                current = self.storage.read_json(self.base.current)
                if not same_archive(current.get("archive", self.config.archive),
                                    self.config.archive):
                    raise ValueError(
                        f"{self.config.output} holds the nightly view of the archive "
                        f"{current['archive']}, not of {self.config.archive}: give this "
                        f"archive its own --output (or remove {self.base.current} to start "
                        "this output's view again)")
                views = current.get("views", self.config.views)
                if current.get("model_digest") != self.model_digest:
                    print(f"the model changed since the last run ({current.get('model_digest')}"
                          f" -> {self.model_digest}): scoring everything again", flush=True)
                elif views != self.config.views:
                    print(f"--views changed since the last run ({views} -> "
                          f"{self.config.views}): scoring everything again", flush=True)
                else:
                    self._current = current
        return self._current

    def adopt_killed_runs(self) -> dict:
        """Move the parts of earlier runs of this model that the cumulative view never took
        in (killed before their marker, or between it and ``_CURRENT.json``) into this run;
        returns the counts of what they had scored or recorded as failed."""
        counts = {"scored": 0, "failed": 0, "labelled": 0}
        committed = set(self.current()["runs"])
        for config_uri in self.storage.list_files(self.base.runs, (".json",)):
            part_root = config_uri.rsplit("/", 1)[0]
            old = ScoreLayout(part_root)
            name = part_root.rsplit("/", 1)[-1]
            if config_uri != old.config or name == self.run_id or name in committed:
                continue
            made = self.storage.read_json(old.config)
            if (made.get("model_digest"), made.get("views", self.config.views)) != (
                    self.model_digest, self.config.views):
                continue
            before = counts["scored"] + counts["failed"]
            for folder, target, key in ((old.predictions, self.layout.predictions, "scored"),
                                        (old.errors, self.layout.errors, "failed")):
                for part in self.storage.list_files(folder, (".parquet",)):
                    if part.endswith("part-empty.parquet"):
                        continue
                    data = self.storage.read_bytes(part)  # read once: counted, then copied
                    frame = pd.read_parquet(io.BytesIO(data), columns=["label"])
                    counts[key] += len(frame)
                    if key == "scored":
                        counts["labelled"] += int(frame["label"].isin(LABELS).sum())
                    self.storage.write_bytes(f"{target}/{name}-{part.rsplit('/', 1)[-1]}", data)
            self.storage.delete_prefix(part_root)
            rows_adopted = counts["scored"] + counts["failed"] - before
            print(f"resumed: adopted the {rows_adopted} results the unfinished run {name} had "
                  "written" if rows_adopted else
                  f"removed the part of the unfinished run {name}, which had no results",
                  flush=True)
        return counts

    def sorted_results(self, scored_here: bool = False):
        """This run's predictions and errors as state rows, URI-sorted by one Ray sort: all of
        them (those adopted from killed runs too), or with ``scored_here`` only the parts
        this run scored itself."""
        parts = [p for folder in (self.work.predictions, self.work.errors)
                 for p in self.storage.list_files(folder, (".parquet",))
                 if not p.endswith("/part-empty.parquet")
                 and (not scored_here or p.rsplit("/", 1)[-1].startswith(self.run_id + "-"))]
        if not parts:
            return iter(())
        self.connect()
        data = parquet_parts(self.storage, parts=parts, state_of_run=self.run_id)
        return rows(data.sort("uri").iter_batches(batch_size=65_536, batch_format="pandas"),
                    STATE_COLUMNS)

    def state_rows(self, current: dict):
        """The committed state table's rows, in URI order (its parts are written sorted)."""
        if not current["state"]:
            return iter(())
        parts = sorted(self.storage.list_files(current["state"], (".parquet",)))
        return rows((state_frame(self.storage.read_table(p)) for p in parts), STATE_COLUMNS)

    def stage_todo(self, current: dict, adopted: int) -> tuple[int, ViewChange]:
        """One merge of the sorted listing with the view (and what was adopted): the objects
        still to score go to ``<staging>/todo``, the view's rows still listed and unchanged
        to ``<staging>/kept``. Returns how many to score, and what happens to the view."""
        self.connect()
        index = staged_index(self.storage, self.staging)
        if is_manifest(self.config.archive):  # a listing has every ETag; a manifest may not
            index = index.map_batches(with_identity, fn_kwargs={"storage": self.storage},
                                      batch_size=None, batch_format="pandas", num_cpus=0.25)
        listing = index.sort("uri").iter_batches(batch_size=65_536, batch_format="pandas")
        done = merged_state(self.state_rows(current),
                            self.sorted_results() if adopted else iter(()))
        change, todo, kept, parts = ViewChange(self.threshold), 0, [], 0
        for number, (frame, still) in enumerate(reconcile(listing, done, change)):
            if len(frame):
                self.storage.write_table(
                    f"{staged(self.staging, 'todo')}/part-{number:05d}.parquet", frame)
                todo += len(frame)
            kept.extend(still)
            if len(kept) >= STATE_PART_ROWS:
                parts = self._write_kept(kept, parts)
                kept = []
        if kept:
            self._write_kept(kept, parts)
        if change.previous and change.removed > self.config.max_removed * change.previous:
            raise ValueError(
                f"not published: {change.removed} of the {change.previous} objects in the "
                f"cumulative view are no longer listed in {self.config.archive} (more than "
                f"--max-removed {self.config.max_removed:g} of it). If the archive really "
                "shrank, run again with a larger --max-removed")
        return todo, change

    def _write_kept(self, kept: list[tuple], number: int) -> int:
        frame = pd.DataFrame(kept, columns=STATE_COLUMNS)
        self.storage.write_table(f"{staged(self.staging, 'kept')}/part-{number:05d}.parquet",
                                 frame, STATE_SCHEMA)
        return number + 1

    def report_view_change(self, change: ViewChange) -> None:
        if change.removed:
            print(f"{change.removed} objects of the cumulative view are no longer listed: they "
                  "leave it (the run parts that scored them stay)", flush=True)
        if change.rethresholded:
            print(f"{change.rethresholded} earlier predictions re-applied at threshold "
                  f"{self.threshold:.4g} (same model, same scores)", flush=True)

    def write_state(self, change: ViewChange) -> None:
        """The next state table generation (the cumulative view): the rows kept from the
        previous one (already at this run's threshold) and the objects this run scored, one
        schema in every part; exactly one row per object listed, or nothing is published."""
        target = self.base.state(self.run_id)
        kept = sorted(self.storage.list_files(staged(self.staging, "kept"), (".parquet",)))
        merged = merged_state(rows((self.storage.read_table(p) for p in kept), STATE_COLUMNS),
                              self.sorted_results(scored_here=True))
        written = 0
        for number, frame in enumerate(frames_of(merged, STATE_COLUMNS, STATE_PART_ROWS)):
            self.storage.write_table(f"{target}/part-{number:05d}.parquet", frame, STATE_SCHEMA)
            written += len(frame)
        if written != change.listed:
            raise RuntimeError(f"not published: the cumulative view would hold {written} "
                               f"objects for the {change.listed} listed")
        self.state, self.view_rows = target, written

    def current_view(self, summary: dict) -> dict:
        """The new ``_CURRENT.json``: every committed run part and the latest state."""
        previous = self.current()
        for old_state in self.storage.list_files(self.base.states, (".parquet",)):
            if not (old_state.startswith(self.state + "/")
                    or (previous["state"] and old_state.startswith(previous["state"] + "/"))):
                self.storage.delete(old_state)  # generations before the last two
        return {"archive": self.config.archive, "model": self.config.model,
                "model_digest": self.model_digest, "views": self.config.views,
                "threshold": self.threshold, "objects": self.view_rows,
                "runs": [*previous["runs"], self.run_id], "state": self.state,
                "last_run": summary, "parts": [self.base.run_part(r)
                                               for r in [*previous["runs"], self.run_id]]}


class PartWriter:
    """Result batches -> ``predictions/`` and ``errors/`` parts of at most RESULT_PART_ROWS."""

    def __init__(self, storage: Storage, layout: ScoreLayout, run_id: str,
                 already: dict | None, every: float):
        self.storage, self.layout, self.run_id = storage, layout, run_id
        self.every, self.flushed = every, time.monotonic()
        self.counts = dict(already or {"scored": 0, "failed": 0, "labelled": 0})
        self.start_total = self.counts["scored"] + self.counts["failed"]
        self.buffers = {"scored": [], "failed": []}
        self.parts = 0

    def add(self, batch: pd.DataFrame) -> None:
        ok = batch["error"] == ""
        self.buffers["scored"].append(batch.loc[ok, PREDICTION_COLUMNS])
        self.buffers["failed"].append(batch.loc[~ok, ERROR_COLUMNS])
        self.counts["labelled"] += int((ok & (batch["target"] >= 0)).sum())
        buffered = sum(len(f) for f in self.buffers["scored"] + self.buffers["failed"])
        # Durable progress: a part at least every `every` seconds, so a killed run loses
        # little, and at most RESULT_PART_ROWS rows held here.
        if buffered >= RESULT_PART_ROWS or time.monotonic() - self.flushed >= self.every:
            self.flush()

    def flush(self) -> None:
        for key, folder in (("scored", self.layout.predictions), ("failed", self.layout.errors)):
            frames = [f for f in self.buffers[key] if len(f)]
            if frames:
                frame = pd.concat(frames, ignore_index=True)
                self.storage.write_table(f"{folder}/{self.run_id}-{self.parts:05d}.parquet",
                                         frame)
                self.counts[key] += len(frame)
            self.buffers[key] = []
        self.parts += 1
        self.flushed = time.monotonic()

    def close(self) -> None:
        self.flush()


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


def publish_metrics(storage: Storage, layout: ScoreLayout, threshold: float,
                    scored: int) -> dict:
    """Fold the labelled predictions, sorted by score, into the metrics files; returns
    headline figures."""
    from covidray.figures import confusion_matrix_png, score_histogram_png

    summary = ScoreSummary(np.asarray(sorted({*sweep_thresholds().tolist(), threshold})))
    auc = SortedAUC()
    for batch in sorted_labelled_scores(storage, layout, scored):
        targets = label_index(batch["label"])
        summary.add(batch["score"], targets)
        auc.add(batch["score"], targets)
    report = metrics_report(summary, auc.value(), threshold)
    storage.write_json(layout.metrics_json, report)
    storage.write_bytes(layout.sweep_csv, sweep_csv(report).encode(), "text/csv")
    for threshold_key, entry in report["confusion_matrices"].items():
        operating = threshold_key == "operating"
        title = f"{'Operating point' if operating else 'Paper threshold'}: score >= {entry['threshold']:.2f}"
        storage.write_bytes(layout.confusion_png(entry["threshold"], operating),
                            confusion_matrix_png(entry["matrix"], entry["threshold"], title),
                            "image/png")
    storage.write_bytes(layout.histogram_png, score_histogram_png(report), "image/png")
    return {"images": report["images"], "roc_auc": report["roc_auc"],
            "paper_thresholds": {k: {"sensitivity": v["sensitivity"],
                                     "specificity": v["specificity"]}
                                 for k, v in report["paper_thresholds"].items()},
            "metrics_json": layout.metrics_json, "paper_threshold_list": list(PAPER_THRESHOLDS)}


def sorts_on_driver(scored: int) -> bool:
    """Whether the metrics' sort of ``scored`` predictions runs on the driver, or (more than
    the part writer holds anyway) as a Ray sort."""
    return scored <= RESULT_PART_ROWS


def sorted_labelled_scores(storage: Storage, layout: ScoreLayout, scored: int):
    """Batches of ``score`` and ``label`` of the labelled predictions, in score order. Up to
    RESULT_PART_ROWS predictions (what the part writer holds anyway) are sorted here on the
    driver; more by a Ray sort, so the driver never holds a large archive's results (and a
    small one skips the sort's seconds of fixed cost)."""
    if sorts_on_driver(scored):
        frames = [storage.read_table(part)[["score", "label"]]
                  for part in storage.list_files(layout.predictions, (".parquet",))]
        frame = pd.concat(frames, ignore_index=True)
        frame = frame[frame["label"].isin(LABELS)].sort_values("score", kind="stable")
        yield {"score": frame["score"].to_numpy(float), "label": frame["label"].to_numpy()}
        return
    from ray.data.expressions import col

    yield from (parquet_parts(storage, [layout.predictions], ["score", "label"])
                .filter(expr=col("label").is_in(list(LABELS)))
                .sort("score").iter_batches(batch_size=65_536, batch_format="numpy"))


def _write_empty(storage: Storage, uri: str, columns: list[str]) -> None:
    floats = {"score", "threshold"}
    ints = {"size"}
    storage.write_table(uri, pd.DataFrame({
        c: pd.Series(dtype=float if c in floats else "int64" if c in ints else object)
        for c in columns}))
