"""One scoring run into an output, on a connected Ray cluster, holding the output's lease.

Both kinds of run share one core (:class:`ScoringRun`): clear what dead runs left, record
which model makes the result, snapshot the archive's index, score it through the pipeline
while writing result parts, then reconcile, judge drift and write the metrics. They differ
in what they score and how they publish:

- :class:`WholeRun` scores the whole archive into its staging and swaps the complete
  result in for the published one (a failure leaves the last good result published);
- :class:`~covidray.scoring.nightly.NightlyRun` (``--incremental``) scores what is new or
  changed into its own dated part, then publishes the cumulative view.

``config`` is the stage's :class:`~covidray.stages.score.ScoreConfig`.
"""

from __future__ import annotations

from covidray.config import to_dict
from covidray.drift import DriftTally, compare, verdict
from covidray.layout import ScoreLayout
from covidray.scoring import fault_points
from covidray.scoring.index import snapshot_index
from covidray.scoring.metrics_files import publish_metrics
from covidray.scoring.model import ModelToScore
from covidray.scoring.parts import PartWriter, write_empty_parts
from covidray.scoring.pipeline import Progress, scored_batches
from covidray.scoring.record import Counts, NightlyCounts, RunIdentity, RunSummary
from covidray.storage import Storage
from covidray.storage.lease import Lease
from covidray.storage.store import CLEANUP_SECONDS


class ScoringRun:
    """The core of a run. ``published``: where its result is read from once published;
    ``writing``: where it writes that result while it runs; ``staging``: its scratch space
    (the index snapshot, what is left to score), removed when it ends."""

    def __init__(self, config, storage: Storage, model: ModelToScore, plan, lease: Lease,
                 run_id: str, published: ScoreLayout, writing: ScoreLayout):
        self.config, self.storage, self.model, self.plan, self.lease = (config, storage, model,
                                                                        plan, lease)
        self.identity = RunIdentity(run_id, config.model, model.digest)
        self.output = ScoreLayout(config.output)
        self.published, self.writing = published, writing
        self.staging = self.output.staging_run(run_id)
        self.tally = (DriftTally(model.reference, model.threshold) if model.reference
                      else None)

    @property
    def run_id(self) -> str:
        return self.identity.run

    def run(self) -> RunSummary:
        raise NotImplementedError

    def publish(self, summary: RunSummary) -> None:
        raise NotImplementedError

    # --- the shared core ------------------------------------------------------------------
    def begin(self) -> None:
        """Finish or remove what runs that died left in ``_staging`` (this run holds the
        output's lease, so no live run is using it), then record this run."""
        for ready in self.storage.list_files(self.output.staging, (".json",)):
            dead = self.output.run_of_ready_marker(ready)
            if dead is None:
                continue
            # A run that died while it swapped its complete result in (killed, or an outage
            # past its bound) left the published result half replaced: its swap is finished
            # first, so the output holds a whole result again, that run's.
            summary = RunSummary.from_json(self.storage.read_json(ready))
            replace_published(self.storage, self.output, self.output.staged_result(dead),
                              summary)
            print(f"published the complete result of run {summary.identity.run}, which died "
                  "while it replaced the previous one", flush=True)
        removed = self.storage.delete_prefix(self.output.staging)
        if removed:
            print(f"removed {removed} staging objects left by an unfinished run", flush=True)
        # The record first: a part whose config is there says which model made it.
        self.storage.write_json(self.writing.run_record, self.identity.to_json())
        self.storage.write_json(self.writing.config, to_dict(self.config))

    def clean_up_after_failure(self) -> None:
        """Remove this run's staging with one brief try, never masking the failure: what it
        cannot remove (the storage may be what failed) the next run removes
        (:meth:`begin`)."""
        try:
            self.storage.bounded(CLEANUP_SECONDS).delete_prefix(self.staging)
        except Exception as exc:
            print(f"left {self.staging} for the next run to remove ({type(exc).__name__})",
                  flush=True)

    def snapshot(self) -> int:
        """The archive's index, read once into this run's staging; how many it lists."""
        listed = snapshot_index(self.storage, self.config.archive,
                                self.output.staged(self.run_id), self.config.allow_local_paths)
        fault_points.reached("scoring.snapshot_taken", archive=self.config.archive)
        return listed

    def score(self, index: str, expected: int, already: Counts | None = None) -> Counts:
        """Score the staged parts under ``index``, writing result parts under ``writing``
        as the batches arrive; the counts of what the run then holds (with ``already``)."""
        writer = PartWriter(self.storage, self.writing, self.run_id, already,
                            self.config.progress_seconds, self.tally)
        progress = Progress(expected, self.config.progress_seconds)
        for batch in scored_batches(self.storage, index, self.model, self.plan,
                                    self.config.views, self.config.actors):
            writer.add(batch)
            progress.update(writer.written)
        writer.flush()
        progress.done(writer.written)
        counts = writer.counts
        if counts.changed:
            print(f"{counts.changed} objects were rewritten after they were listed: scored "
                  f"as read, e.g. {', '.join(counts.changed_examples)}", flush=True)
        return counts

    def finish(self, expected: int, counts: Counts, listed: int,
               nightly: NightlyCounts | None = None) -> RunSummary:
        """Reconcile (every image expected is scored or failed), write the metrics and the
        drift judgement beside this run's results; the summary (not yet published)."""
        self.lease.check()
        fault_points.reached("scoring.results_counted", counts=counts)
        if expected != counts.total:
            raise RuntimeError(f"not published: listed {expected} != scored {counts.scored} "
                               f"+ failed {counts.failed}")
        write_empty_parts(self.storage, self.writing, counts)
        metrics = None
        if counts.labelled:
            metrics = {**publish_metrics(self.storage, self.writing, self.model.threshold,
                                         counts.scored),
                       "metrics_json": self.published.metrics_json}
        return RunSummary(self.identity, self.config.archive, self.config.output, listed,
                          counts, self.model.threshold, self.published.predictions,
                          self.published.errors, self.judge_drift(), nightly, metrics,
                          self.model.threshold_source)

    def judge_drift(self) -> dict:
        """This run's inputs against the model's reference profile: ``drift.json`` and
        ``drift.png`` beside the metrics; the summary's part (drifted, verdict)."""
        if self.tally is None:
            drift = {"drifted": [], "judged": False, "why": self.model.no_reference}
        else:
            config = self.config
            drift = compare(self.tally, config.drift_psi, config.drift_share,
                            config.drift_min_images)
            from covidray.figures import drift_png

            self.storage.write_json(self.writing.drift_json, drift)
            self.storage.write_bytes(self.writing.drift_png, drift_png(drift), "image/png")
        line = verdict(drift)
        print(line, flush=True)
        quantities = drift.get("quantities", {})
        return {"drifted": drift["drifted"], "judged": drift["judged"], "verdict": line,
                "values": {n: q["value"] for n, q in quantities.items()},
                "limits": {n: q.get("limit") for n, q in quantities.items()},
                **({"drift_json": self.published.drift_json} if self.tally else {})}


class WholeRun(ScoringRun):
    """Score the whole archive into this run's staging; the previous result stays published
    until :meth:`publish` swaps this one in (only a complete, reconciled result)."""

    def __init__(self, config, storage: Storage, model: ModelToScore, plan, lease: Lease,
                 run_id: str):
        output = ScoreLayout(config.output)
        super().__init__(config, storage, model, plan, lease, run_id, published=output,
                         writing=output.staged_result(run_id))

    def run(self) -> RunSummary:
        self.begin()
        try:
            listed = self.snapshot()
            counts = self.score(self.output.staged(self.run_id), listed)
            return self.finish(listed, counts, listed)
        except BaseException:
            self.clean_up_after_failure()
            raise

    def publish(self, summary: RunSummary) -> None:
        """This run's result in place of the output's previous one. Once the staged result
        is marked ready, a failure part-way leaves it in staging, and the next run into the
        output finishes the swap (:meth:`ScoringRun.begin`)."""
        self.storage.write_json(self.output.ready_marker(self.run_id), summary.to_json())
        replace_published(self.storage, self.output, self.writing, summary)
        self.storage.delete_prefix(self.staging)


def replace_published(storage: Storage, output: ScoreLayout, new: ScoreLayout,
                      summary: RunSummary) -> None:
    """Swap a complete staged result in for the output's published one: unpublish it
    (readers wait for the marker), remove it (nothing of it stays beside the new one), copy
    the new predictions, errors, metrics and config into place, marker last."""
    for stale in (output.success, output.current):
        storage.delete(stale)
    for folder in (output.metrics, output.predictions, output.errors):
        storage.delete_prefix(folder)
    storage.copy_prefix(new.root, output.root)
    storage.write_json(output.success, summary.to_json())
