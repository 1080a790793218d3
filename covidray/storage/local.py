"""The local-files backend of :class:`covidray.storage.Storage`: a path on this machine
(or a volume every node mounts at the same place).

A file's version (its "ETag") is its modification time and size; a write goes to a
temporary file beside its target and is renamed over it, so readers see the old file or
the whole new one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import BinaryIO, Iterator

from covidray.storage.location import Location, StorageError, has_suffix


def local_etag(path: str) -> str:
    stat = os.stat(path)
    return f"{stat.st_mtime_ns}-{stat.st_size}"


def _nearest_existing(path: str) -> str:
    while path and not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path or "."


class LocalFiles:
    """Object I/O on local paths; every method takes a parsed ``file`` :class:`Location`."""

    def check(self, location: Location, writable: bool) -> None:
        path = location.key
        if not writable and not os.path.exists(path):
            raise StorageError(f"local path '{path}' does not exist")
        target = path if os.path.exists(path) else os.path.dirname(path)
        if writable and not os.access(_nearest_existing(target), os.W_OK):
            raise StorageError(f"local path '{path}' is not writable")

    def read_with_etag(self, location: Location) -> tuple[bytes, str]:
        with open(location.key, "rb") as fh:
            return fh.read(), local_etag(location.key)

    def open_read(self, location: Location, buffer_bytes: int = -1) -> BinaryIO:
        return open(location.key, "rb", buffering=buffer_bytes)

    def write_bytes(self, location: Location, data: bytes, content_type: str | None) -> None:
        folder = os.path.dirname(location.key)
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, location.key)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def put_if_absent(self, location: Location, data: bytes) -> str | None:
        os.makedirs(os.path.dirname(location.key), exist_ok=True)
        try:
            fd = os.open(location.key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return None
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        return local_etag(location.key)

    def put_if_match(self, location: Location, data: bytes, etag: str) -> str | None:
        if not os.path.exists(location.key) or local_etag(location.key) != etag:
            return None
        self.write_bytes(location, data, None)
        return local_etag(location.key)

    def head(self, location: Location, missing=()) -> tuple[str, int] | None:
        """``(etag, size)``, or None where there is no such file (``missing`` is for the S3
        backend's status codes: a local file is there or it is not)."""
        try:
            return local_etag(location.key), os.path.getsize(location.key)
        except OSError:
            return None

    def list_objects(self, location: Location, wanted: tuple[str, ...] | None) -> Iterator[dict]:
        for root, dirs, files in os.walk(location.key):
            dirs.sort()
            for name in sorted(files):
                if has_suffix(name, wanted):
                    path = os.path.join(root, name)
                    yield {"uri": path, "etag": local_etag(path), "size": os.path.getsize(path)}

    def copy(self, source: Location, target: Location) -> None:
        with open(source.key, "rb") as fh:
            self.write_bytes(target, fh.read(), None)

    def delete(self, location: Location) -> None:
        if os.path.exists(location.key):
            os.unlink(location.key)

    def delete_prefix(self, location: Location) -> int:
        if not os.path.exists(location.key):
            return 0
        count = sum(len(files) for _, _, files in os.walk(location.key))
        shutil.rmtree(location.key)
        return count

    def ensure_bucket(self, location: Location) -> None:
        os.makedirs(location.key, exist_ok=True)

    def filesystem(self):
        import pyarrow.fs as pafs

        return pafs.LocalFileSystem()
