"""``covidray score``: score an X-ray archive with onnxruntime on Ray Data.

This stage holds the command's options (:class:`ScoreConfig`) and its edge: check the
locations, read the model once, join the Ray cluster and size the run from it, take the
output's lease, then one run (:mod:`covidray.scoring.run`): read the archive's index once
into a snapshot the run owns (:mod:`covidray.scoring.index`) -> (``--incremental``: keep only
objects this model has not scored, :mod:`covidray.scoring.nightly`) -> one Ray Data
execution (:mod:`covidray.scoring.pipeline`: decode in tasks, the onnxruntime scorer in an
actor pool) whose result batches the driver writes as ``predictions/`` and ``errors/``
parts as they arrive (:mod:`covidray.scoring.parts`) -> metrics (labelled archives,
:mod:`covidray.scoring.metrics_files`) -> ``_SUCCESS.json`` last, and only when every listed
image is in exactly one of ``predictions`` or ``errors``.

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

from covidray.cluster import GPU_POLICIES, score_on_gpu
from covidray.config import option, validate
from covidray.datasets import is_manifest
from covidray.drift import DriftDetected
from covidray.imaging.views import VIEW_POLICIES
from covidray.layout import ScoreLayout
from covidray.scoring.model import model_to_score
from covidray.scoring.nightly import NightlyRun
from covidray.scoring.record import NothingNew
from covidray.scoring.run import WholeRun
from covidray.storage import Location, Storage
from covidray.storage.lease import Lease


@dataclass(frozen=True)
class ScoreConfig:
    archive: str = option("", "a prefix of images (labels from <p>/<label>/ folders when "
                              "present) or a manifest .csv/.parquet", required=True)
    model: str = option("", "model.onnx written by `covidray export`", required=True)
    output: str = option("", "scoring output directory (s3://... or a path)", required=True)
    threshold: float | None = option(None, "operating threshold (default: the model card's, "
                                           "chosen on validation by `covidray evaluate`; "
                                           "else the model's training default)", bounds=(0, 1))
    site_card: str | None = option(None, "a site card (`covidray calibrate`) of this model: "
                                         "score at the site's threshold, write the site's "
                                         "calibrated probability beside each score, and judge "
                                         "drift against the site's labelled sample")
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
    model = model_to_score(storage, config.model, config.threshold, config.site_card)
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
    kind = NightlyRun if config.incremental else WholeRun
    with Lease(storage, output.lease, config.lease_seconds, f"covidray score {run_id}") as lease:
        run = kind(config, storage, model, plan, lease, run_id)
        summary = replace(run.run(), seconds=round(time.time() - started, 1))
        if isinstance(summary, NothingNew):
            return summary.to_json()
        lease.check()
        run.publish(summary)
    if config.fail_on_drift and summary.drifted:
        raise DriftDetected(f"the inputs drifted ({summary.drift['verdict']}); the results "
                            f"are published under {config.output}")
    return summary.to_json()


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
