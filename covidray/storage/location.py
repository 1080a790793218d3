"""A storage address, ``s3://bucket/key`` or a local path, parsed once.

Every piece of code that splits or joins a URI goes through :class:`Location`: an S3 key
is any UTF-8 text (``?``, ``#``, spaces included) and is taken verbatim, which ``urlparse``
and ad-hoc string splitting get wrong.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


class StorageError(RuntimeError):
    """A location cannot be used; the message names the setting to fix."""


class StorageOutage(StorageError):
    """Storage kept failing with transient errors for longer than the outage bound: the
    run must fail (no result published), not record its images as unreadable."""


def has_suffix(name: str, wanted: tuple[str, ...] | None) -> bool:
    """Whether a listed key (or file name) is of a wanted kind: its name ends in one of the
    ``wanted`` lower-case suffixes, any case, trailing whitespace ignored (``"scan.png "`` is a
    PNG whose key a tool padded). The key itself is always kept verbatim."""
    return wanted is None or name.rstrip().lower().endswith(wanted)


@dataclass(frozen=True)
class Location:
    """A parsed storage address. ``key`` is the object key (S3) or absolute path (local)."""

    scheme: str  # "s3" or "file"
    bucket: str
    key: str

    @classmethod
    def parse(cls, uri: str) -> "Location":
        if uri.startswith("s3://"):
            bucket, _, key = uri[len("s3://"):].partition("/")
            if not bucket:
                raise StorageError(f"'{uri}' has no bucket: write s3://BUCKET/PREFIX")
            return cls("s3", bucket, key.lstrip("/").rstrip("/"))
        if "://" in uri and not uri.startswith("file://"):
            raise StorageError(f"'{uri}': only s3:// URIs and local paths are supported")
        path = uri[len("file://"):] if uri.startswith("file://") else uri
        return cls("file", "", os.path.abspath(os.path.expanduser(path)))

    @property
    def is_s3(self) -> bool:
        return self.scheme == "s3"

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}".rstrip("/") if self.is_s3 else self.key

    @property
    def fs_path(self) -> str:
        """The path a pyarrow filesystem (and so Ray Data / Ray Train) expects."""
        return f"{self.bucket}/{self.key}".rstrip("/") if self.is_s3 else self.key

    @property
    def name(self) -> str:
        """The last part of the key: a file's name, a folder's name."""
        return self.key.rstrip("/").rsplit("/", 1)[-1]

    @property
    def parent(self) -> "Location":
        """The folder this location is in (a bucket's top level for a top-level key)."""
        if self.is_s3:
            return Location("s3", self.bucket, self.key.rsplit("/", 1)[0] if "/" in self.key
                            else "")
        return Location("file", "", os.path.dirname(self.key))

    def contains(self, other: "Location") -> bool:
        """Whether ``other`` is this location or lies under it."""
        if (self.scheme, self.bucket) != (other.scheme, other.bucket):
            return False
        root = self.key.rstrip("/")
        return not root or other.key == root or other.key.startswith(root + "/")

    def join(self, *parts: str) -> "Location":
        key = "/".join([self.key.rstrip("/"), *(p.strip("/") for p in parts)])
        return Location(self.scheme, self.bucket, key.lstrip("/") if self.is_s3 else key)

    def __str__(self) -> str:
        return self.uri


def as_location(location: Location | str) -> Location:
    return location if isinstance(location, Location) else Location.parse(location)


def join_uri(uri: str, *parts: str) -> str:
    return Location.parse(uri).join(*parts).uri


def parent_uri(uri: str) -> str:
    """The folder ``uri`` is in."""
    return Location.parse(uri).parent.uri


def name_of(uri: str) -> str:
    """The last part of ``uri``: an object's or a folder's name."""
    return Location.parse(uri).name
