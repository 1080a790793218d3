"""Where data lives: ``s3://bucket/prefix`` or a local path, and how to reach it.

:class:`Storage` is the one facade every stage uses. It parses each URI into a
:class:`~covidray.storage.location.Location` and hands it to the backend for its scheme:
:class:`~covidray.storage.local.LocalFiles` for paths, :class:`~covidray.storage.s3.S3Objects`
for ``s3://`` (where every request rides out outages by one rule). What does not depend on
the backend -- JSON, tables, prefixes -- is written here once.

Only :class:`StorageSettings` travel when Ray pickles a ``Storage`` to workers;
credentials never do. Every process resolves its own through the standard AWS chain
(variables on the node or pod, a named profile, an instance or workload role): nodes carry
credentials, jobs carry locations.

Every write of a single object is atomic to readers: S3 publishes an object only when its
PUT completes, and local files are written beside their target and then renamed over it.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field, replace
from typing import BinaryIO, Iterator

from covidray.storage.local import LocalFiles
from covidray.storage.location import Location, as_location
from covidray.storage.s3 import S3Objects
from covidray.storage.settings import StorageSettings


_LOCAL = LocalFiles()
# A failed run's clean-up (its staging, its lease) tries storage this long, once: the failure
# itself already waited out the run's outage bound, and what it cannot remove the next run
# removes or takes over.
CLEANUP_SECONDS = 2.0


@dataclass
class Storage:
    """Object I/O for local paths and S3-compatible storage. Safe to pickle to Ray workers."""

    settings: StorageSettings = field(default_factory=StorageSettings.from_env)
    _s3: S3Objects | None = field(default=None, repr=False)

    def __getstate__(self):
        # Only settings travel to Ray workers: never a credential (no secret in a task, an
        # object or a log), and never a client.
        return {"settings": self.settings}

    def __setstate__(self, state):
        self.__init__(state["settings"])

    def bounded(self, seconds: float) -> "Storage":
        """This storage with another outage bound: a failed run's clean-up tries briefly
        (the failure itself already waited out the run's bound)."""
        return Storage(replace(self.settings, outage_seconds=seconds))

    @property
    def s3(self) -> S3Objects:
        """The S3 backend (its clients, its retry rule)."""
        if self._s3 is None:
            self._s3 = S3Objects(self.settings)
        return self._s3

    def _at(self, uri: Location | str):
        location = as_location(uri)
        return location, (self.s3 if location.is_s3 else _LOCAL)

    def client(self):
        """The boto3 S3 client of this process (bounded timeouts and retries)."""
        return self.s3.client()

    def filesystem(self, location: Location | str):
        """The pyarrow filesystem for ``location``; pair it with ``Location.fs_path``."""
        return self._at(location)[1].filesystem()

    # --- checks -------------------------------------------------------------------------
    def check(self, uri: str, writable: bool = False) -> None:
        """Fail now, with a message naming the setting to fix, if ``uri`` cannot be used."""
        location, backend = self._at(uri)
        backend.check(location, writable)

    def exists(self, uri: str) -> bool:
        location, backend = self._at(uri)
        return backend.head(location) is not None

    def identity(self, uri: str) -> tuple[str, int] | None:
        """``(etag, size)`` of the object's current version, as a listing gives them; None
        where it cannot be read (missing, access denied: loading it then says why)."""
        location, backend = self._at(uri)
        return backend.head(location, missing=(403, 404))

    # --- objects ------------------------------------------------------------------------
    def read_bytes(self, uri: str) -> bytes:
        return self.read_with_etag(uri)[0]

    def read_with_etag(self, uri: str) -> tuple[bytes, str]:
        """An object's bytes and the ETag of that version."""
        location, backend = self._at(uri)
        return backend.read_with_etag(location)

    def open_read(self, uri: str, **options) -> BinaryIO:
        """A file object streaming the object (for large ones, e.g. a manifest);
        ``buffer_bytes``: how much one read fetches."""
        location, backend = self._at(uri)
        return backend.open_read(location, **options)

    def write_bytes(self, uri: str, data: bytes, content_type: str | None = None) -> str:
        """Write one object atomically (readers see the old object or the whole new one)."""
        location, backend = self._at(uri)
        backend.write_bytes(location, data, content_type)
        return location.uri

    def put_if_absent(self, uri: str, data: bytes) -> str | None:
        """Create ``uri`` only if it does not exist; its ETag, or None if it exists."""
        location, backend = self._at(uri)
        return backend.put_if_absent(location, data)

    def put_if_match(self, uri: str, data: bytes, etag: str) -> str | None:
        """Replace ``uri`` only if its ETag is still ``etag``; the new ETag, or None."""
        location, backend = self._at(uri)
        return backend.put_if_match(location, data, etag)

    def delete_if_match(self, uri: str, etag: str) -> None:
        """Delete ``uri`` if it is still the version ``etag`` (best effort on S3 servers
        without conditional deletes: compare, then delete)."""
        found = self.identity(uri)
        if found is not None and found[0] == etag:
            self.delete(uri)

    def copy(self, source: str, target: str) -> str:
        """Copy one object (on S3 within the server, in one request; readers of ``target``
        see the old object or the whole new one)."""
        (src, src_backend), (dst, dst_backend) = self._at(source), self._at(target)
        if src_backend is dst_backend:
            src_backend.copy(src, dst)
        else:
            self.write_bytes(target, self.read_bytes(source))
        return dst.uri

    def delete(self, uri: str) -> None:
        """Delete one object if it exists."""
        location, backend = self._at(uri)
        backend.delete(location)

    def ensure_bucket(self, uri: str) -> None:
        """Create the bucket of ``uri`` if missing (local set-up and demos only)."""
        location, backend = self._at(uri)
        backend.ensure_bucket(location)

    # --- prefixes -----------------------------------------------------------------------
    def list_files(self, uri: str, suffixes: tuple[str, ...] | None = None) -> Iterator[str]:
        """Every object (file) under ``uri``, recursively, in key order, streamed page by page."""
        for obj in self.list_objects(uri, suffixes):
            yield obj["uri"]

    def list_objects(self, uri: str, suffixes: tuple[str, ...] | None = None) -> Iterator[dict]:
        """``{"uri", "etag", "size"}`` of every object under ``uri`` (the listing carries the
        ETag and size: which version of an object it is), streamed page by page."""
        location, backend = self._at(uri)
        wanted = tuple(s.lower() for s in suffixes) if suffixes else None
        return backend.list_objects(location, wanted)

    def copy_prefix(self, source: str, target: str) -> int:
        """Copy every object under ``source`` to the same relative key under ``target``;
        returns how many."""
        root = as_location(source).uri
        count = 0
        for uri in self.list_files(source):
            self.copy(uri, target + uri[len(root):])
            count += 1
        return count

    def delete_prefix(self, uri: str) -> int:
        """Delete every object under ``uri``; returns how many."""
        location, backend = self._at(uri)
        return backend.delete_prefix(location)

    # --- JSON and tables: the one place a DataFrame becomes bytes and back ----------------
    def write_json(self, uri: str, obj) -> str:
        return self.write_bytes(uri, json.dumps(obj, indent=2, default=str).encode(),
                                "application/json")

    def read_json(self, uri: str):
        return json.loads(self.read_bytes(uri))

    def read_table(self, uri: str):
        """A CSV or Parquet object (a run's splits, a state part) as a pandas DataFrame."""
        import pandas as pd

        if uri.lower().endswith(".parquet"):
            return self.read_arrow(uri).to_pandas()
        return pd.read_csv(io.BytesIO(self.read_bytes(uri)))

    def read_arrow(self, uri: str):
        """A Parquet object as a pyarrow Table: a missing value stays None, as in Ray Data's
        batches (pandas would make it NaN or pd.NA)."""
        import pyarrow.parquet as pq

        return pq.read_table(io.BytesIO(self.read_bytes(uri)))

    def write_table(self, uri: str, frame, schema=None) -> str:
        """Write a DataFrame as one CSV or Parquet object (by the URI's suffix), atomically;
        Parquet in ``schema`` (a pyarrow schema) where given."""
        if uri.lower().endswith(".csv"):
            return self.write_bytes(uri, frame.to_csv(index=False).encode(), "text/csv")
        buffer = io.BytesIO()
        frame.to_parquet(buffer, index=False, schema=schema)
        return self.write_bytes(uri, buffer.getvalue())

    def read_parquet_dir(self, uri: str, columns: list[str] | None = None):
        """Every ``*.parquet`` part under ``uri`` as one DataFrame (empty when there is none).

        For small outputs only (a split's predictions, a report): archive-sized outputs are
        read by Ray Data, never collected into one process."""
        import pandas as pd

        parts = [pd.read_parquet(io.BytesIO(self.read_bytes(part)), columns=columns)
                 for part in self.list_files(uri, (".parquet",))]
        return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=columns)
