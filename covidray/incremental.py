"""What a nightly scoring run still has to do: the objects not already scored by this model.

An object is identified by ``(uri, etag, size)`` (ETag and size come with every S3 listing;
a manifest row without them is known by its URI alone). The *state table* of a scoring
output is also its cumulative view: one row per object scored so far, with its latest
result (the run that scored it, its score, prediction and threshold, or why it failed),
sorted by URI, in Parquet parts of one schema; each run merges its own rows in and writes a
new generation. Both the archive listing and the state are consumed as URI-sorted streams,
so working out the new objects takes memory independent of the archive's size.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import pandas as pd
import pyarrow as pa

KEY = ("uri", "etag", "size")
RESULT_COLUMNS = ["label", "source", "score", "prediction", "threshold", "error"]
STATE_SCHEMA = pa.schema([("uri", pa.string()), ("etag", pa.string()), ("size", pa.int64()),
                          ("run", pa.string()), ("label", pa.string()), ("source", pa.string()),
                          ("score", pa.float64()), ("prediction", pa.string()),
                          ("threshold", pa.float64()), ("error", pa.string())])
STATE_COLUMNS = STATE_SCHEMA.names  # the key, the run, then RESULT_COLUMNS
UNKNOWN_ETAG, UNKNOWN_SIZE = "", -1  # a manifest row without them: known by URI alone


def state_table(part: pd.DataFrame, run: str) -> pa.Table:
    """A ``predictions`` or ``errors`` part of ``run`` as state rows: a scored object has an
    empty ``error``, a failed one no score, prediction or threshold."""
    fill = {"score": None, "prediction": None, "threshold": None, "error": ""}
    data = {name: part[name].tolist() if name in part else [fill.get(name)] * len(part)
            for name in STATE_COLUMNS if name != "run"}
    return pa.Table.from_pydict({**data, "run": [run] * len(part)}, schema=STATE_SCHEMA)


def state_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """A state part as read back, in the state's columns (a part written before the state
    carried results has only the key and the run: its results read as missing)."""
    return frame.reindex(columns=STATE_COLUMNS)


def rows(frames: Iterable[pd.DataFrame], columns=KEY) -> Iterator[tuple]:
    """The rows of a stream of DataFrames as tuples of ``columns``."""
    for frame in frames:
        yield from frame[list(columns)].itertuples(index=False, name=None)


def not_yet_scored(listed: Iterable[pd.DataFrame], done: Iterator[tuple]
                   ) -> Iterator[pd.DataFrame]:
    """The rows of ``listed`` (URI-sorted frames) whose ``(uri, etag, size)`` is not in
    ``done`` (URI-sorted key tuples): a merge of two sorted streams. A URI listed twice (a
    manifest may) is scored once."""
    current, previous = next(done, None), None
    for frame in listed:
        keep = []
        for uri, etag, size in frame[list(KEY)].itertuples(index=False, name=None):
            while current is not None and current[0] < uri:
                current = next(done, None)
            keep.append(uri != previous and (current is None or current[0] != uri
                                             or (current[1], current[2]) != (etag, size)))
            previous = uri
        if any(keep):
            yield frame[keep]


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
