"""Nightly (``--incremental``) scoring: :class:`NightlyRun`, and the cumulative view of its
output that the run works on (:class:`NightlyView`).

``<output>/_CURRENT.json`` names the committed run parts and the state table
(``<output>/state/<run>/``): one row per object the archive lists now, with its latest
result, at the latest run's threshold (:mod:`covidray.scoring.merge` has the merge rules).
A run reads the view it starts from (:func:`read_current`), adopts what killed runs of the
same model left (:meth:`NightlyView.adopt_killed_runs`), merges its listing with the view
to find what to score (:meth:`NightlyView.stage_todo`), scores that into its own dated part,
writes the next state generation (:meth:`NightlyView.write_state`), and finally the new
``_CURRENT.json`` (:meth:`NightlyView.current_json`), after which the generations before the
last two are deleted (:meth:`NightlyView.delete_old_states`).
"""

from __future__ import annotations

import io
import json
from dataclasses import replace

import pandas as pd

from covidray.datasets import is_manifest
from covidray.drift import history_row
from covidray.labels import LABELS
from covidray.layout import ScoreLayout, part_name
from covidray.model_card import model_digest
from covidray.scoring import fault_points
from covidray.scoring.index import same_archive, staged_index, with_identity
from covidray.scoring.merge import (SORTED_BATCH_ROWS, STATE_COLUMNS, STATE_SCHEMA, ViewChange,
                                    frames_of, merged_state, reconcile, rows, state_frame)
from covidray.scoring.model import ModelToScore
from covidray.scoring.parts import parquet_parts, result_parts
from covidray.scoring.record import (Counts, NightlyCounts, NothingNew, RunIdentity,
                                     RunSummary, ViewIdentity)
from covidray.scoring.run import ScoringRun
from covidray.storage import Storage
from covidray.storage.lease import Lease
from covidray.storage.location import name_of

STATE_PART_ROWS = 50_000


def map_digest(calibration: dict | None) -> str:
    """Which calibration map a view's probabilities are under ("": none)."""
    return model_digest(json.dumps(calibration, sort_keys=True).encode()) if calibration else ""


def empty_view(model_digest: str) -> dict:
    return {"runs": [], "state": None, "model_digest": model_digest}


def read_current(storage: Storage, output: ScoreLayout, this: ViewIdentity) -> dict:
    """The cumulative view a run of ``this`` model over ``this`` archive starts from: the
    output's ``_CURRENT.json``, or an empty view (also when the model or the ``--views``
    policy changed: what was skipped or scored may differ). A view of another archive is
    refused: this run would drop all of it."""
    if not storage.exists(output.current):
        return empty_view(this.model_digest)
    current = storage.read_json(output.current)
    view = ViewIdentity.from_json(current, this.views)
    if not same_archive(view.archive, this.archive):
        raise ValueError(
            f"{output.root} holds the nightly view of the archive {view.archive}, not "
            f"of {this.archive}: give this archive its own --output (or remove "
            f"{output.current} to start this output's view again)")
    if view.model_digest != this.model_digest:
        print(f"the model changed since the last run ({view.model_digest} -> "
              f"{this.model_digest}): scoring everything again", flush=True)
        return empty_view(this.model_digest)
    if view.views != this.views:
        print(f"--views changed since the last run ({view.views} -> {this.views}): scoring "
              "everything again", flush=True)
        return empty_view(this.model_digest)
    return current


class NightlyView:
    """One nightly run's work on the cumulative view of ``output``: ``current`` is the view
    it started from (:func:`read_current`); the run writes its own part ``part`` and stages
    under ``output.staged(run_id, ...)``."""

    def __init__(self, storage: Storage, output: ScoreLayout, part: ScoreLayout, run_id: str,
                 identity: ViewIdentity, max_removed: float, calibration: dict | None = None):
        self.storage, self.output, self.part, self.run_id = storage, output, part, run_id
        self.identity, self.max_removed = identity, max_removed
        self.calibration = calibration  # the site card's map (identity.calibration: its digest)
        # The view this run starts from (a view of another archive is refused here, before
        # anything is written).
        self.current = read_current(storage, output, identity)

    # --- what killed runs left -----------------------------------------------------------
    def adopt_killed_runs(self) -> dict:
        """Move the parts of earlier runs of this model that the cumulative view never took
        in (killed before their marker, or between it and ``_CURRENT.json``) into this run;
        returns the counts of what they had scored or recorded as failed."""
        counts = Counts()
        committed = set(self.current["runs"])
        for config_uri in self.storage.list_files(self.output.runs, (".json",)):
            name = self.output.run_of_part_config(config_uri)
            if name is None or name == self.run_id or name in committed:
                continue
            old = ScoreLayout(self.output.run_part(name))
            made = self.storage.read_json(old.config)
            digest = (RunIdentity.from_json(self.storage.read_json(old.run_record)).model_digest
                      if self.storage.exists(old.run_record) else None)
            if (digest, made.get("views", self.identity.views)) != (
                    self.identity.model_digest, self.identity.views):
                continue
            before = counts.total
            for part in result_parts(self.storage, old):
                scored = part.startswith(old.predictions + "/")
                data = self.storage.read_bytes(part)  # read once: counted, then copied
                frame = pd.read_parquet(io.BytesIO(data), columns=["label"])
                if scored:
                    counts.scored += len(frame)
                    counts.labelled += int(frame["label"].isin(LABELS).sum())
                else:
                    counts.failed += len(frame)
                target = self.part.predictions if scored else self.part.errors
                self.storage.write_bytes(f"{target}/{name}-{name_of(part)}", data)
            self.storage.delete_prefix(old.root)
            adopted = counts.total - before
            print(f"resumed: adopted the {adopted} results the unfinished run {name} had "
                  "written" if adopted else
                  f"removed the part of the unfinished run {name}, which had no results",
                  flush=True)
        return counts

    # --- the merge -------------------------------------------------------------------------
    def sorted_results(self, scored_here: bool = False):
        """This run's predictions and errors as state rows, URI-sorted by one Ray sort: all of
        them (those adopted from killed runs too), or with ``scored_here`` only the parts
        this run scored itself."""
        parts = result_parts(self.storage, self.part, self.run_id if scored_here else None)
        if not parts:
            return iter(())
        data = parquet_parts(self.storage, parts, state_of_run=self.run_id)
        return rows(data.sort("uri").iter_batches(batch_size=SORTED_BATCH_ROWS,
                                                  batch_format="pandas"), STATE_COLUMNS)

    def state_rows(self):
        """The committed state table's rows, in URI order (its parts are written sorted)."""
        if not self.current["state"]:
            return iter(())
        parts = sorted(self.storage.list_files(self.current["state"], (".parquet",)))
        return rows((state_frame(self.storage.read_table(p)) for p in parts), STATE_COLUMNS)

    def stage_todo(self, adopted: int) -> tuple[int, ViewChange]:
        """One merge of the sorted listing with the view (and what was adopted): the objects
        still to score go to the run's staged ``todo``, the view's rows still listed and
        unchanged to its ``kept``. Returns how many to score, and what happens to the view;
        refuses a listing that would drop more than ``max_removed`` of the view."""
        index = staged_index(self.storage, self.output.staged(self.run_id))
        if is_manifest(self.identity.archive):  # a listing has every ETag; a manifest may not
            index = index.map_batches(with_identity, fn_kwargs={"storage": self.storage},
                                      batch_size=None, batch_format="pandas", num_cpus=0.25)
        listing = index.sort("uri").iter_batches(batch_size=SORTED_BATCH_ROWS,
                                                 batch_format="pandas")
        done = merged_state(self.state_rows(), self.sorted_results() if adopted else iter(()))
        change = ViewChange(self.identity.threshold, self.calibration,
                            self.current.get("calibration", "") != self.identity.calibration)
        todo, kept, parts = 0, [], 0
        todo_folder = self.output.staged(self.run_id, "todo")
        for number, (frame, still) in enumerate(reconcile(listing, done, change)):
            if len(frame):
                self.storage.write_table(f"{todo_folder}/{part_name(number)}", frame)
                todo += len(frame)
            kept.extend(still)
            if len(kept) >= STATE_PART_ROWS:
                parts = self._write_kept(kept, parts)
                kept = []
        if kept:
            self._write_kept(kept, parts)
        limit = self.max_removed
        if change.previous and change.removed > limit * change.previous:
            raise ValueError(
                f"not published: {change.removed} of the {change.previous} objects in the "
                f"cumulative view are no longer listed in {self.identity.archive} (more than "
                f"--max-removed {limit:g} of it). If the archive really shrank, run again with "
                "a larger --max-removed")
        return todo, change

    def _write_kept(self, kept: list[tuple], number: int) -> int:
        frame = pd.DataFrame(kept, columns=STATE_COLUMNS)
        self.storage.write_table(
            f"{self.output.staged(self.run_id, 'kept')}/{part_name(number)}", frame, STATE_SCHEMA)
        return number + 1

    def report(self, change: ViewChange) -> None:
        if change.removed:
            print(f"{change.removed} objects of the cumulative view are no longer listed: they "
                  "leave it (the run parts that scored them stay)", flush=True)
        if change.rethresholded:
            print(f"{change.rethresholded} earlier predictions re-applied at threshold "
                  f"{self.identity.threshold:.4g} (same model, same scores)", flush=True)
        if change.recalibrated and change.kept:
            print(f"the site card's calibration changed: {change.kept} earlier probabilities "
                  "re-applied (same model, same scores)", flush=True)

    # --- the next generation ---------------------------------------------------------------
    def write_state(self, change: ViewChange) -> tuple[str, int]:
        """The next state table generation (the cumulative view): the rows kept from the
        previous one (already at this run's threshold) and the objects this run scored, one
        schema in every part; exactly one row per object listed, or nothing is published.
        Returns where it is and how many rows it holds."""
        target = self.output.state(self.run_id)
        kept = sorted(self.storage.list_files(self.output.staged(self.run_id, "kept"),
                                              (".parquet",)))
        merged = merged_state(rows((self.storage.read_table(p) for p in kept), STATE_COLUMNS),
                              self.sorted_results(scored_here=True))
        written = 0
        for number, frame in enumerate(frames_of(merged, STATE_COLUMNS, STATE_PART_ROWS)):
            self.storage.write_table(f"{target}/{part_name(number)}", frame, STATE_SCHEMA)
            written += len(frame)
        if written != change.listed:
            raise RuntimeError(f"not published: the cumulative view would hold {written} "
                               f"objects for the {change.listed} listed")
        return target, written

    def current_json(self, summary: RunSummary) -> dict:
        """The new ``_CURRENT.json``: every committed run part and the state this run wrote
        (``summary``: the run's, with :meth:`write_state`'s state and object count)."""
        runs = [*self.current["runs"], self.run_id]
        return {**self.identity.to_json(), "objects": summary.nightly.objects, "runs": runs,
                "state": summary.nightly.state, "last_run": summary.to_json(),
                "parts": [self.output.run_part(r) for r in runs]}

    def record_drift(self, summary: RunSummary) -> None:
        """One row of this run's drift figures in the output's history, and its plot: a
        step change on one night stands out."""
        from covidray.figures import drift_history_png

        history = self.output.drift_history
        earlier = self.storage.read_table(history) if self.storage.exists(history) else None
        frame = pd.concat([earlier, pd.DataFrame([history_row(summary.to_json())])],
                          ignore_index=True)
        self.storage.write_table(history, frame)
        self.storage.write_bytes(self.output.drift_history_png, drift_history_png(
            frame, summary.drift["limits"]), "image/png")

    def delete_old_states(self, state: str) -> int:
        """Delete the state generations before ``state`` and the one this run started from
        (a reader that read the previous ``_CURRENT.json`` still finds its state); returns
        how many parts it deleted."""
        keep = [s + "/" for s in (state, self.current["state"]) if s]
        deleted = 0
        for old in self.storage.list_files(self.output.states, (".parquet",)):
            if not any(old.startswith(k) for k in keep):
                self.storage.delete(old)
                deleted += 1
        return deleted


class NightlyRun(ScoringRun):
    """A nightly (``--incremental``) run: scores only the objects not in the cumulative view
    (nor in a killed run's part) into its own dated part, then publishes the view."""

    def __init__(self, config, storage: Storage, model: ModelToScore, plan, lease: Lease,
                 run_id: str):
        output = ScoreLayout(config.output)
        part = ScoreLayout(output.run_part(run_id))
        super().__init__(config, storage, model, plan, lease, run_id, published=part,
                         writing=part)
        self.view = NightlyView(storage, output, part, run_id, ViewIdentity(
            config.archive, config.model, model.digest, config.views, model.threshold,
            map_digest(model.calibration)), config.max_removed, model.calibration)

    def run(self) -> RunSummary | NothingNew:
        view, config = self.view, self.config
        self.begin()
        try:
            listed = self.snapshot()
            counts = view.adopt_killed_runs()
            adopted = counts.total
            todo, change = view.stage_todo(adopted)
            if todo == 0 and adopted == 0 and not change.changes_view:
                self.storage.delete_prefix(self.writing.root)
                last = view.current["runs"][-1] if view.current["runs"] else "none"
                print(f"nothing new: all {listed} listed objects were already scored by this "
                      f"model (last run {last})", flush=True)
                self.storage.delete_prefix(self.staging)
                return NothingNew(config.archive, config.output, listed, last,
                                  self.model.threshold_source)
            print(f"{todo} of {listed} listed objects are new or changed", flush=True)
            view.report(change)
            if todo:
                counts = self.score(self.output.staged(self.run_id, "todo"), todo,
                                    already=counts)
            summary = self.finish(todo + adopted, counts, listed, NightlyCounts(
                todo, adopted, change.removed, change.rethresholded))
            state, objects = view.write_state(change)
        except BaseException:
            self.clean_up_after_failure()
            raise
        self.storage.delete_prefix(self.staging)
        return replace(summary, nightly=replace(summary.nightly, state=state, objects=objects))

    def publish(self, summary: RunSummary) -> None:
        """The part's marker, then the cumulative view readers use (then the state
        generations no reader needs go), then the drift history."""
        self.storage.write_json(self.writing.success, summary.to_json())
        fault_points.reached("scoring.part_committed", summary=summary)
        self.storage.write_json(self.output.current, self.view.current_json(summary))
        self.view.delete_old_states(summary.nightly.state)
        self.view.record_drift(summary)
