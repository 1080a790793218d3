"""A scoring run's result tables: ``predictions/`` and ``errors/`` Parquet parts.

Every listed image ends in exactly one of them. The columns are defined here once:
what the index row carried (:data:`CARRIED`), what loading found
(:data:`covidray.datasets.LOADED_COLUMNS`), then the score or the reason it failed.
"""

from __future__ import annotations

import time
from dataclasses import replace

import pandas as pd

from covidray.datasets import ARCHIVE_COLUMNS
from covidray.imaging.loader import LOADED_COLUMNS
from covidray.scoring.merge import state_table
from covidray.layout import EMPTY_PART, ScoreLayout, part_name, written_by
from covidray.storage.location import name_of
from covidray.imaging.profile import NUMBERS
from covidray.scoring import fault_points
from covidray.scoring.record import Counts
from covidray.storage import Storage

IDENTITY_COLUMNS = ["etag", "size"]  # with the uri: which version of an object was scored
CARRIED = [*ARCHIVE_COLUMNS, *IDENTITY_COLUMNS]  # what an index row carries to the outputs
# Outputs add what loading found: the DICOM UIDs, view position, modality, manufacturer and
# the view check (empty strings where an image has none).
PREDICTION_COLUMNS = [*CARRIED, *LOADED_COLUMNS, "score", "probability", "prediction",
                      "threshold"]
ERROR_COLUMNS = [*CARRIED, *LOADED_COLUMNS, "error"]
RESULT_PART_ROWS = 20_000  # rows per predictions/errors part the driver writes
_FLOAT_COLUMNS, _INT_COLUMNS = {"score", "threshold", *NUMBERS}, {"size"}
CHANGED_SHOWN = 5  # objects rewritten since their listing named in the run's summary


def result_parts(storage: Storage, layout: ScoreLayout, run_id: str | None = None) -> list[str]:
    """The predictions and errors parts under ``layout`` that hold rows (the empty parts
    left out); with ``run_id`` only those that run wrote itself."""
    return [part for folder in (layout.predictions, layout.errors)
            for part in storage.list_files(folder, (".parquet",))
            if name_of(part) != EMPTY_PART
            and (run_id is None or written_by(name_of(part), run_id))]


def write_empty_parts(storage: Storage, layout: ScoreLayout, counts: Counts) -> None:
    """An empty part in ``predictions`` (no image scored) or ``errors`` (none failed), so
    readers always find a table with the right columns."""
    for folder, rows, columns in ((layout.predictions, counts.scored, PREDICTION_COLUMNS),
                                  (layout.errors, counts.failed, ERROR_COLUMNS)):
        if not rows:
            storage.write_table(layout.empty_part(folder), pd.DataFrame({
                c: pd.Series(dtype=float if c in _FLOAT_COLUMNS else
                             "int64" if c in _INT_COLUMNS else object) for c in columns}))


def parquet_parts(storage: Storage, parts: list[str], columns: list[str] | None = None,
                  state_of_run: str | None = None):
    """The Parquet ``parts`` as a Ray Dataset, one block a part, read through
    :class:`Storage` (so an outage is ridden out up to its bound, then fails the run). With
    ``state_of_run``, result parts become that run's state rows."""
    import ray.data

    return ray.data.from_items([{"part": p} for p in parts],
                               override_num_blocks=max(1, len(parts))).map_batches(
        _read_parts, fn_kwargs={"storage": storage, "columns": columns, "run": state_of_run},
        batch_size=1, batch_format="pandas", num_cpus=0.25)


def parquet_parts_under(storage: Storage, folders: list[str], columns: list[str] | None = None):
    """Every Parquet part under ``folders`` as a Ray Dataset (:func:`parquet_parts`)."""
    return parquet_parts(storage, [p for folder in folders
                                   for p in storage.list_files(folder, (".parquet",))], columns)


def _read_parts(batch: pd.DataFrame, storage: Storage, columns: list[str] | None,
                run: str | None):
    frame = pd.concat([storage.read_table(part) for part in batch["part"]], ignore_index=True)
    if run is not None:
        return state_table(frame, run)
    return frame[columns] if columns else frame


class PartWriter:
    """Result batches -> ``predictions/`` and ``errors/`` parts of at most RESULT_PART_ROWS,
    and the counts of what they hold (``already``: what the run holds before, e.g. parts
    adopted from a killed run). Each batch is also folded into ``tally`` (a
    :class:`covidray.drift.DriftTally`) where given, and the objects rewritten since they
    were listed (``changed``) are counted and the first few named."""

    def __init__(self, storage: Storage, layout: ScoreLayout, run_id: str,
                 already: Counts | None, every: float, tally=None):
        self.storage, self.layout, self.run_id = storage, layout, run_id
        self.every, self.flushed = every, time.monotonic()
        self.counts = replace(already) if already else Counts()
        self.start_total = self.counts.total
        self.buffers = {"scored": [], "failed": []}
        self.parts = 0
        self.tally = tally

    @property
    def written(self) -> int:
        """Rows this writer took (buffered or written)."""
        return self.counts.total - self.start_total + sum(
            len(f) for f in self.buffers["scored"] + self.buffers["failed"])

    def add(self, batch: pd.DataFrame) -> None:
        if self.tally is not None:
            self.tally.add(batch)
        if "changed" in batch:
            changed = batch.loc[batch["changed"].astype(bool), "uri"]
            shown = self.counts.changed_examples
            self.counts.changed += len(changed)
            shown += changed.head(CHANGED_SHOWN - len(shown)).tolist()
        ok = batch["error"] == ""
        self.buffers["scored"].append(batch.loc[ok, PREDICTION_COLUMNS])
        self.buffers["failed"].append(batch.loc[~ok, ERROR_COLUMNS])
        self.counts.labelled += int((ok & (batch["target"] >= 0)).sum())
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
                part = self.storage.write_table(
                    f"{folder}/{part_name(self.parts, self.run_id)}", frame)
                fault_points.reached("scoring.part_written", part=part)
                setattr(self.counts, key, getattr(self.counts, key) + len(frame))
            self.buffers[key] = []
        self.parts += 1
        self.flushed = time.monotonic()
