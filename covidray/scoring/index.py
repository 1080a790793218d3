"""What a scoring run scores: the archive's index, read once into a snapshot the run owns.

An archive is a prefix of images (labels from ``<prefix>/<label>/`` folders when present)
or a manifest. Either way a run reads it once, validated row by row, into Parquet parts
under its staging (:meth:`covidray.layout.ScoreLayout.staged`), so an archive that changes
while the run is under way is scored as it was listed. Each row carries :data:`CARRIED`:
the URI, label, source and group, and which version of the object it is (ETag, size).
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

from covidray.datasets import (is_manifest, iter_prefix_rows, manifest_frames, manifest_to_index,
                               normalise_index)
from covidray.imaging.decode import IMAGE_SUFFIXES
from covidray.imaging.loader import UNKNOWN_ETAG, UNKNOWN_SIZE
from covidray.storage.location import Location, StorageError
from covidray.layout import part_name
from covidray.scoring.parts import CARRIED, parquet_parts_under
from covidray.storage import Storage

INDEX_PART_ROWS = 256  # rows per snapshot part: a part is a block, and blocks decode in parallel


def snapshot_index(storage: Storage, archive: str, folder: str,
                   allow_local_paths: bool = False) -> int:
    """Read the archive's index once, into Parquet parts under ``folder``; returns how many
    images it lists. A manifest is read in chunks and a prefix listed page by page (bounded
    memory), and every row is validated here, on the driver, before any cluster work: a bad
    manifest fails with one line. Parts of a prefix listing are in URI order (S3 lists keys
    in that order)."""
    listed, seen = 0, {}
    for part, frame in enumerate(index_chunks(storage, archive, allow_local_paths)):
        if is_manifest(archive):  # a listing names each key once; a manifest may not
            refuse_duplicates(frame["uri"], listed, seen, archive)
        storage.write_table(f"{folder}/{part_name(part)}", carried(frame))
        listed += len(frame)
    if not listed:
        raise StorageError(f"no images found in '{archive}' "
                           f"(looked for {', '.join(IMAGE_SUFFIXES)})")
    return listed


def refuse_duplicates(uris: pd.Series, first_row: int, seen: dict, archive: str) -> None:
    """Refuse a manifest that names one object twice (it would be scored and counted twice):
    ``seen`` maps an 8-byte digest of each URI so far to its row (about 100 bytes a row)."""
    for offset, uri in enumerate(uris):
        key = hashlib.blake2b(uri.encode(), digest_size=8).digest()
        row = first_row + offset
        if key in seen:
            raise ValueError(f"manifest '{archive}' names {uri!r} twice (rows {seen[key] + 1} and "
                             f"{row + 1}, counting from the first data row): list each object "
                             "once")
        seen[key] = row


def index_chunks(storage: Storage, archive: str, allow_local_paths: bool):
    """The archive's index rows, INDEX_PART_ROWS at a time."""
    if is_manifest(archive):
        for chunk in manifest_frames(storage, archive, INDEX_PART_ROWS):
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


def carried(frame: pd.DataFrame) -> pd.DataFrame:
    """Index rows in the :data:`CARRIED` columns; a version not known is
    ``UNKNOWN_ETAG``/``UNKNOWN_SIZE``."""
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


def same_archive(one: str, other: str) -> bool:
    """Whether two ``--archive`` values name the same archive (``s3://b/x/`` is ``s3://b/x``)."""
    return Location.parse(one).uri == Location.parse(other).uri


def staged_index(storage: Storage, folder: str):
    """A staged index snapshot as a Ray Dataset, one block a part."""
    return parquet_parts_under(storage, [folder])
