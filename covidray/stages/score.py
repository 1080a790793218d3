"""``covidray score``: score an X-ray archive with onnxruntime on Ray Data.

One run: take the output's lease -> read the archive's index once into a snapshot the run
owns (:mod:`covidray.scoring.index`) -> (``--incremental``: keep only objects this model has
not scored, :mod:`covidray.scoring.nightly`) -> one Ray Data execution (decode in tasks,
:class:`covidray.onnx_runtime.OnnxScorer` in an actor pool) whose result batches the driver
writes as ``predictions/`` and ``errors/`` parts as they arrive, printing progress
(:mod:`covidray.scoring.parts`) -> metrics (labelled archives, :mod:`covidray.scoring.metrics_files`)
-> ``_SUCCESS.json`` last, and only when every listed image is in exactly one of
``predictions`` or ``errors``.

A whole run writes into its staging and swaps its result in only once it is complete, so a
failure leaves the last good result published. With ``--incremental`` each run is a dated
part (``<output>/runs/<run>/``) and ``<output>/_CURRENT.json`` the cumulative view readers
use; a run killed half-way leaves a part without ``_SUCCESS.json``, which the next run
adopts instead of rescoring it.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, replace

import pandas as pd

from covidray.scoring import fault_points
from covidray.scoring.index import snapshot_index
from covidray.config import option, to_dict, validate
from covidray.imaging.loader import LOADED_COLUMNS, load_pixels
from covidray.datasets import is_manifest
from covidray.drift import DriftDetected, DriftTally, compare, verdict
from covidray.imaging.recipe import INPUT_SIZE
from covidray.layout import ScoreLayout
from covidray.storage.lease import Lease
from covidray.storage.location import Location
from covidray.scoring.metrics_files import publish_metrics
from covidray.scoring.nightly import NightlyView, read_current
from covidray.cluster import GPU_POLICIES, score_on_gpu
from covidray.onnx_runtime import OnnxScorer
from covidray.scoring.parts import CARRIED, PartWriter, write_empty_parts
from covidray.scoring.model import ModelToScore, model_to_score
from covidray.storage import Storage
from covidray.imaging.views import VIEW_POLICIES


@dataclass(frozen=True)
class ScoreConfig:
    archive: str = option("", "a prefix of images (labels from <p>/<label>/ folders when "
                              "present) or a manifest .csv/.parquet", required=True)
    model: str = option("", "model.onnx written by `covidray export`", required=True)
    output: str = option("", "scoring output directory (s3://... or a path)", required=True)
    threshold: float | None = option(None, "operating threshold (default: the model card's, "
                                           "chosen on validation by `covidray evaluate`; "
                                           "else the model's training default)", bounds=(0, 1))
    batch_size: int | None = option(None, "images per inference batch (default: 32 on CPUs, "
                                          "128 on a GPU)", bounds=(1, None))
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
                                      "to one per 2 CPUs)", bounds=(1, None))
    allow_local_paths: bool = option(False, "let a manifest held in object storage name local "
                                            "paths, opened on the workers")
    incremental: bool = option(False, "score only what is new or changed (key + ETag/size) "
                                      "since the last successful run of this model; each run "
                                      "is a dated part, <output>/_CURRENT.json the cumulative "
                                      "view; a killed run is resumed by the next")
    lease_seconds: float = option(300.0, "a run holds <output>/_LEASE.json, renewed every third "
                                         "of this; a killed run's lease lapses after it",
                                  bounds=(1, None))
    max_removed: float = option(0.5, "--incremental: the largest share of the cumulative view "
                                     "one run may drop because its objects are no longer "
                                     "listed; more fails the run, leaving the view as it was "
                                     "(a truncated manifest would otherwise empty it)",
                                bounds=(0, 1))
    fail_on_drift: bool = option(False, "exit with status 3 after publishing when the inputs "
                                        "drifted from the model's reference profile (the "
                                        "quantities are named)")
    drift_psi: float = option(0.25, "drift: a number's (or the score's) population stability "
                                    "index at which it counts as drifted", bounds=(0, None))
    drift_share: float = option(0.15, "drift: the change of one category's share (view, "
                                      "photometric, manufacturer, error reason) at which it "
                                      "counts as drifted", bounds=(0, 1))
    drift_min_images: int = option(30, "drift: fewer scored images than this are not judged",
                                   bounds=(1, None))
    progress_seconds: float = option(30.0, "seconds between progress lines (each also writes "
                                           "the results so far: what a resumed run keeps)",
                                     bounds=(0.1, None))

    def __post_init__(self):
        validate(self)
        if (self.archive and self.output and not is_manifest(self.archive)
                and Location.parse(self.archive).contains(Location.parse(self.output))):
            raise ValueError(f"--output {self.output} is inside --archive {self.archive}: the "
                             "next run would list this run's results (its figures are PNGs) "
                             "as X-rays. Put the output outside the archive")


# --- the scoring pipeline ----------------------------------------------------------------

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
    storage.check(config.archive)
    storage.check(config.output, writable=True)
    model = model_to_score(storage, config.model, config.threshold)
    print(f"threshold {model.threshold:.4g} from {model.threshold_source}", flush=True)
    # Join the cluster before any Ray Data call: Ray Data would otherwise start Ray itself
    # with address "auto", which finds whatever cluster this machine last ran (dead or not).
    # Sized now, so that a --gpu the cluster cannot meet fails before the output is touched.
    from covidray.cluster import alive_nodes, connect_ray, require_object_storage

    ray = connect_ray(ray_address)
    require_object_storage(alive_nodes(ray), archive=config.archive, output=config.output,
                           model=config.model)
    plan = scoring_plan(config, ray)
    run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
    output = ScoreLayout(config.output)
    with Lease(storage, output.lease, config.lease_seconds, f"covidray score {run_id}") as lease:
        run = ScoringRun(config, storage, model, plan, lease, run_id)
        summary = run.incremental() if config.incremental else run.whole()
        summary.update(threshold_source=model.threshold_source,
                       seconds=round(time.time() - started, 1))
        if summary.get("nothing_new"):
            return summary
        lease.check()
        run.publish(summary)
    drifted = summary["drift"]["drifted"]
    if config.fail_on_drift and drifted:
        raise DriftDetected(f"the inputs drifted ({summary['drift']['verdict']}); the results "
                            f"are published under {config.output}")
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


class ScoringRun:
    """One scoring run into ``config.output`` on a connected Ray cluster, holding the
    output's ``lease``: :meth:`whole` or :meth:`incremental`, then :meth:`publish`."""

    def __init__(self, config: ScoreConfig, storage: Storage, model: ModelToScore, plan,
                 lease: Lease, run_id: str):
        self.config, self.storage, self.model, self.plan, self.lease = (config, storage, model,
                                                                        plan, lease)
        self.run_id = run_id
        self.output = ScoreLayout(config.output)
        # Where the result is published (``layout``), and where this run writes it while it
        # runs (``work``): a nightly run's own part (not read until _CURRENT.json names it);
        # for a whole run a folder of its staging, so the last result stays until this one
        # is complete.
        self.layout = (ScoreLayout(self.output.run_part(run_id)) if config.incremental
                       else self.output)
        self.work = (self.layout if config.incremental else self.output.staged_result(run_id))
        self.staging = self.output.staging_run(run_id)
        self.tally = (DriftTally(model.reference, model.threshold) if model.reference
                      else None)
        # A nightly run's work on the cumulative view, from the view it starts from (a view
        # of another archive is refused here, before anything is written).
        self.view = NightlyView(storage, self.output, self.layout, run_id, read_current(
            storage, self.output, config.archive, config.views, model.digest), {
            "archive": config.archive, "model": config.model, "model_digest": model.digest,
            "views": config.views, "threshold": model.threshold,
            "max_removed": config.max_removed}) if config.incremental else None

    @property
    def run_record(self) -> dict:
        """Which run and which model made what is under ``work`` (``run.json``)."""
        return {"run": self.run_id, "model": self.config.model,
                "model_digest": self.model.digest}

    def clear_dead_staging(self) -> None:
        """Finish or remove what runs that died left in ``_staging``: this run holds the
        output's lease, so no other live run is using it. A run that died while it swapped
        its complete result in (killed, or an outage past its bound) left the published
        result half replaced: its swap is finished first, so the output holds a whole result
        again, that run's."""
        for ready in self.storage.list_files(self.output.staging, (".json",)):
            dead = self.output.run_of_ready_marker(ready)
            if dead is None:
                continue
            summary = self.storage.read_json(ready)
            self.replace_published(self.output.staged_result(dead), summary)
            print(f"published the complete result of run {summary['run']}, which died while "
                  "it replaced the previous one", flush=True)
        removed = self.storage.delete_prefix(self.output.staging)
        if removed:
            print(f"removed {removed} staging objects left by an unfinished run", flush=True)

    def whole(self) -> dict:
        """Score the whole archive into this run's staging; the previous result stays
        published until :meth:`publish` (only for a complete, reconciled result)."""
        self.clear_dead_staging()
        self.write_config()
        try:
            listed = self.snapshot()
            counts = self.score(self.output.staged(self.run_id), listed)
            return self.finish(listed, counts, listed)
        except BaseException:
            self.storage.delete_prefix(self.staging)
            raise

    def incremental(self) -> dict:
        """Score only the objects not in the state table (nor in a killed run's part)."""
        storage, config, current = self.storage, self.config, self.view.current
        self.clear_dead_staging()
        self.write_config()
        try:
            listed = self.snapshot()
            counts = self.view.adopt_killed_runs()
            adopted = counts["scored"] + counts["failed"]
            todo, change = self.view.stage_todo(adopted)
            if todo == 0 and adopted == 0 and not change.changes_view:
                storage.delete_prefix(self.layout.root)
                last = current["runs"][-1] if current["runs"] else "none"
                print(f"nothing new: all {listed} listed objects were already scored by this "
                      f"model (last run {last})", flush=True)
                return {"archive": config.archive, "output": config.output, "listed": listed,
                        "new": 0, "nothing_new": True, "last_run": last}
            print(f"{todo} of {listed} listed objects are new or changed", flush=True)
            self.view.report(change)
            if todo:
                counts = self.score(self.output.staged(self.run_id, "todo"), todo,
                                    already=counts)
            summary = self.finish(todo + adopted, counts, listed, new=todo, adopted=adopted,
                                  removed=change.removed, rethresholded=change.rethresholded)
            summary["state"], summary["objects"] = self.view.write_state(change)
            return summary
        finally:
            storage.delete_prefix(self.staging)

    def publish(self, summary: dict) -> None:
        """Publish this run's complete result. A nightly run: its part's marker, then the
        cumulative view readers use (then the state generations no reader needs go). A whole
        run: its result in place of the output's previous one; once the staged result is
        marked ready, a failure part-way leaves it in staging, and the next run into the
        output finishes the swap (:meth:`clear_dead_staging`)."""
        if self.config.incremental:
            self.storage.write_json(self.layout.success, summary)
            fault_points.reached("scoring.part_committed", summary=summary)
            self.storage.write_json(self.output.current, self.view.current_json(summary))
            self.view.delete_old_states(summary["state"])
            self.view.record_drift(summary)
            return
        self.storage.write_json(self.output.ready_marker(self.run_id), summary)
        self.replace_published(self.work, summary)
        self.storage.delete_prefix(self.staging)

    def replace_published(self, new: ScoreLayout, summary: dict) -> None:
        """Swap a complete staged result in for the output's published one: unpublish it
        (readers wait for the marker), remove it (nothing of it stays beside the new one),
        copy the new predictions, errors, metrics and config into place, marker last."""
        old = self.output
        for stale in (old.success, old.current):
            self.storage.delete(stale)
        for folder in (old.metrics, old.predictions, old.errors):
            self.storage.delete_prefix(folder)
        self.storage.copy_prefix(new.root, old.root)
        self.storage.write_json(old.success, summary)

    # --- pieces -------------------------------------------------------------------------
    def judge_drift(self) -> dict:
        """This run's inputs against the model's reference profile: ``drift.json`` and
        ``drift.png`` beside the metrics; returns the summary's part (drifted, verdict)."""
        if self.tally is None:
            drift = {"drifted": [], "judged": False, "why": self.model.no_reference}
        else:
            config = self.config
            drift = compare(self.tally, config.drift_psi, config.drift_share,
                            config.drift_min_images)
            from covidray.figures import drift_png

            self.storage.write_json(self.work.drift_json, drift)
            self.storage.write_bytes(self.work.drift_png, drift_png(drift), "image/png")
        line = verdict(drift)
        print(line, flush=True)
        return {"drifted": drift["drifted"], "judged": drift["judged"], "verdict": line,
                "values": {n: q["value"] for n, q in drift.get("quantities", {}).items()},
                "limits": {n: q.get("limit") for n, q in drift.get("quantities", {}).items()},
                **({"drift_json": self.layout.drift_json} if self.tally else {})}

    def write_config(self) -> None:
        # The record first: a part whose config is there says which model made it.
        self.storage.write_json(self.work.run_record, self.run_record)
        self.storage.write_json(self.work.config, to_dict(self.config))

    def snapshot(self) -> int:
        listed = snapshot_index(self.storage, self.config.archive,
                                self.output.staged(self.run_id), self.config.allow_local_paths)
        fault_points.reached("scoring.snapshot_taken", archive=self.config.archive)
        return listed

    def score(self, index: str, expected: int, already: dict | None = None) -> dict:
        """The one Ray Data execution over the staged parts under ``index``; the driver
        writes result parts as batches arrive."""
        import ray.data

        plan = self.plan
        results = (loaded_images(self.storage, index, plan.inference_batch, plan.decode_cpus,
                                 self.config.views)
                   .map_batches(OnnxScorer,
                                fn_constructor_kwargs={"model": self.model.data,
                                                       "name": self.config.model,
                                                       "threshold": self.model.threshold,
                                                       "threads": plan.inference_threads,
                                                       "gpu": plan.inference_gpus > 0,
                                                       "keep": (*CARRIED, *LOADED_COLUMNS,
                                                                "changed")},
                                batch_format="numpy", batch_size=plan.inference_batch,
                                # Not the decode tasks' reservation: Ray Data would fuse
                                # them into the actor, and decoding would wait on inference.
                                num_cpus=plan.inference_actor_cpus,
                                num_gpus=plan.inference_gpus,
                                compute=ray.data.ActorPoolStrategy(
                                    min_size=self.config.actors or 1,
                                    max_size=self.config.actors or plan.scoring_actors)))
        writer = PartWriter(self.storage, self.work, self.run_id, already,
                            self.config.progress_seconds, self.tally)
        progress = Progress(expected, self.config.progress_seconds)
        for batch in results.iter_batches(batch_size=None, batch_format="pandas"):
            writer.add(batch)
            progress.update(writer.written)
        writer.flush()
        progress.done(writer.written)
        if writer.changed:
            print(f"{writer.changed} objects were rewritten after they were listed: scored "
                  f"as read, e.g. {', '.join(writer.changed_shown)}", flush=True)
        return {**writer.counts, "changed_since_listing": writer.changed,
                "changed_examples": writer.changed_shown}

    def finish(self, expected: int, counts: dict, listed: int, **extra) -> dict:
        """Reconcile, write the metrics beside this run's results, and return the summary (not
        yet the marker)."""
        self.lease.check()
        fault_points.reached("scoring.results_counted", counts=counts)
        if expected != counts["scored"] + counts["failed"]:
            raise RuntimeError(f"not published: listed {expected} != scored {counts['scored']} "
                               f"+ failed {counts['failed']}")
        write_empty_parts(self.storage, self.work, counts)
        summary = {"archive": self.config.archive, "model": self.config.model,
                   "model_digest": self.model.digest, "output": self.config.output,
                   "run": self.run_id, "listed": listed, **extra,
                   "scored": counts["scored"], "failed": counts["failed"],
                   "threshold": self.model.threshold, "predictions": self.layout.predictions,
                   "errors": self.layout.errors, "reconciled": True,
                   "changed_since_listing": counts.get("changed_since_listing", 0),
                   "changed_examples": counts.get("changed_examples", []),
                   "drift": self.judge_drift()}
        if counts["labelled"]:
            summary["metrics"] = {**publish_metrics(self.storage, self.work, self.model.threshold,
                                                    counts["scored"]),
                                  "metrics_json": self.layout.metrics_json}
        return summary


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
