"""What a nightly scoring run still has to do: the objects not already scored by this model.

An object is identified by ``(uri, etag, size)`` (ETag and size come with every S3 listing;
a manifest row without them gets them from a HEAD request for the object, made by the
scoring stage; one that cannot be read keeps none). The *state table* of a scoring output
is also its cumulative view: one row per object the archive lists, with its latest
result (the run that scored it, its score, probability, prediction and threshold, or why
it failed),
sorted by URI, in Parquet parts of one schema; each run merges its own rows in and writes a
new generation. Both the archive listing and the state are consumed as URI-sorted streams,
so working out the new objects takes memory independent of the archive's size.

The view holds exactly what the archive lists now: an object no longer listed leaves it
(its run parts keep the night that scored it), and every row is at the latest run's
operating threshold (a changed threshold re-applies :func:`covidray.metrics.is_positive` to
the stored scores; the model is the same, so its scores are).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import pandas as pd
import pyarrow as pa

from covidray.metrics import calibrated, predicted_labels

KEY = ("uri", "etag", "size")
SORTED_BATCH_ROWS = 65_536  # rows a URI-sorted stream (listing, results, scores) reads at once
STATE_SCHEMA = pa.schema([("uri", pa.string()), ("etag", pa.string()), ("size", pa.int64()),
                          ("run", pa.string()), ("label", pa.string()), ("source", pa.string()),
                          ("score", pa.float64()), ("probability", pa.float64()),
                          ("prediction", pa.string()),
                          ("threshold", pa.float64()), ("error", pa.string())])
STATE_COLUMNS = STATE_SCHEMA.names  # the key, the run, then the result
_TEXT = [f.name for f in STATE_SCHEMA if f.type == pa.string() and f.name != "run"]


def state_table(part: pd.DataFrame, run: str) -> pa.Table:
    """A ``predictions`` or ``errors`` part of ``run`` as state rows: a scored object has an
    empty ``error``, a failed one no score, prediction or threshold."""
    fill = {"score": None, "probability": None, "prediction": None, "threshold": None,
            "error": ""}
    data = {name: part[name].tolist() if name in part else [fill.get(name)] * len(part)
            for name in STATE_COLUMNS if name != "run"}
    for name in _TEXT:  # a column of missing values only (no label anywhere) reads as float
        data[name] = [None if v is None or v != v else str(v) for v in data[name]]
    return pa.Table.from_pydict({**data, "run": [run] * len(part)}, schema=STATE_SCHEMA)


def state_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """A state part as read back, in the state's columns (a part written before the state
    carried results has only the key and the run: its results read as missing)."""
    return frame.reindex(columns=STATE_COLUMNS)


def rows(frames: Iterable[pd.DataFrame], columns=KEY) -> Iterator[tuple]:
    """The rows of a stream of DataFrames as tuples of ``columns``."""
    for frame in frames:
        yield from frame[list(columns)].itertuples(index=False, name=None)


@dataclass
class ViewChange:
    """What a run's listing does to the cumulative view besides the objects it scores. The
    view holds exactly the objects listed now, each at the run's operating threshold and
    with the probability of its site card's ``calibration`` map (none: NaN);
    ``recalibrated``: the view was made under another map."""

    threshold: float
    calibration: dict | None = None
    recalibrated: bool = False
    listed: int = 0         # distinct URIs in the listing: the rows the next view holds
    previous: int = 0       # rows of the view the run started from
    kept: int = 0           # still listed and unchanged: carried over, not rescored
    removed: int = 0        # no longer listed: they leave the view (the run parts keep them)
    rethresholded: int = 0  # kept, but scored at another threshold: prediction re-applied

    @property
    def changes_view(self) -> bool:
        return bool(self.removed or self.rethresholded or (self.recalibrated and self.kept))

    def at_threshold(self, row: tuple) -> tuple:
        """A kept state row with its prediction by this run's threshold and its probability
        by this run's map (the same score: the view is of one model, so only the operating
        point can have moved); counted in ``rethresholded`` where the threshold moved."""
        score = row[_SCORE]
        moved = row[_THRESHOLD] != self.threshold
        if row[_ERROR] != "" or score is None or score != score or not (
                moved or self.recalibrated):
            return row  # failed (no score), or already at this operating point
        self.rethresholded += int(moved)
        row = list(row)
        row[_PREDICTION] = str(predicted_labels([score], self.threshold)[0])
        row[_THRESHOLD] = self.threshold
        probability = float(calibrated(self.calibration, [score])[0])
        row[_PROBABILITY] = None if probability != probability else probability
        return tuple(row)


_SCORE, _PROBABILITY, _PREDICTION, _THRESHOLD, _ERROR = (
    STATE_COLUMNS.index(c) for c in ("score", "probability", "prediction", "threshold", "error"))


def reconcile(listed: Iterable[pd.DataFrame], done: Iterator[tuple], change: ViewChange
              ) -> Iterator[tuple[pd.DataFrame, list[tuple]]]:
    """Merge the listing (URI-sorted frames with ``uri, etag, size``) with the view's rows
    ``done`` (URI-sorted ``STATE_COLUMNS`` tuples): for each frame, the rows still to score
    (a new or changed ``(uri, etag, size)``; a URI listed twice, as a manifest may, once)
    and the view's rows kept (listed and unchanged), at ``change.threshold``. A row whose
    object is no longer listed is counted in ``change.removed`` and dropped."""
    current, previous = next(done, None), None
    for frame in listed:
        todo, kept = [], []
        for uri, etag, size in frame[list(KEY)].itertuples(index=False, name=None):
            if uri == previous:
                todo.append(False)
                continue
            previous = uri
            change.listed += 1
            while current is not None and current[0] < uri:
                change.previous, change.removed = change.previous + 1, change.removed + 1
                current = next(done, None)
            unchanged = current is not None and tuple(current[:3]) == (uri, etag, size)
            todo.append(not unchanged)
            if unchanged:
                kept.append(change.at_threshold(current))
                change.kept += 1
            if current is not None and current[0] == uri:
                change.previous += 1
                current = next(done, None)
        yield frame[todo], kept
    while current is not None:
        change.previous, change.removed = change.previous + 1, change.removed + 1
        current = next(done, None)


def merged_state(previous: Iterator[tuple], new: Iterator[tuple]) -> Iterator[tuple]:
    """The next state table: ``previous`` and ``new`` (both URI-sorted ``STATE_COLUMNS``
    tuples) merged; where a URI is in both, the new row replaces the old."""
    old, fresh = next(previous, None), next(new, None)
    while old is not None or fresh is not None:
        if fresh is None or (old is not None and old[0] < fresh[0]):
            yield old
            old = next(previous, None)
        else:
            if old is not None and old[0] == fresh[0]:
                old = next(previous, None)
            yield fresh
            fresh = next(new, None)


def frames_of(tuples: Iterable[tuple], columns: list[str], size: int) -> Iterator[pd.DataFrame]:
    """Tuples regrouped into DataFrames of at most ``size`` rows."""
    batch = []
    for item in tuples:
        batch.append(item)
        if len(batch) == size:
            yield pd.DataFrame(batch, columns=columns)
            batch = []
    if batch:
        yield pd.DataFrame(batch, columns=columns)
