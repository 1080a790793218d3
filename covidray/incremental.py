"""What a nightly scoring run still has to do: the objects not already scored by this model.

An object is identified by ``(uri, etag, size)`` (ETag and size come with every S3 listing;
a manifest row without them is known by its URI alone). The *state table* of a scoring
output lists every object scored so far, sorted by URI, in Parquet parts; each run merges
its own rows in and writes a new generation. Both the archive listing and the state are
consumed as URI-sorted streams, so working out the new objects takes memory independent
of the archive's size.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import pandas as pd

STATE_COLUMNS = ["uri", "etag", "size", "run"]
KEY = ("uri", "etag", "size")
UNKNOWN_ETAG, UNKNOWN_SIZE = "", -1  # a manifest row without them: known by URI alone


def rows(frames: Iterable[pd.DataFrame], columns=KEY) -> Iterator[tuple]:
    """The rows of a stream of DataFrames as tuples of ``columns``."""
    for frame in frames:
        yield from frame[list(columns)].itertuples(index=False, name=None)


def not_yet_scored(listed: Iterable[pd.DataFrame], done: Iterator[tuple]
                   ) -> Iterator[pd.DataFrame]:
    """The rows of ``listed`` (URI-sorted frames) whose ``(uri, etag, size)`` is not in
    ``done`` (URI-sorted key tuples): a merge of two sorted streams."""
    current = next(done, None)
    for frame in listed:
        keep = []
        for uri, etag, size in frame[list(KEY)].itertuples(index=False, name=None):
            while current is not None and current[0] < uri:
                current = next(done, None)
            keep.append(current is None or current[0] != uri
                        or (current[1], current[2]) != (etag, size))
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
