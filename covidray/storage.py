"""Where data lives: ``s3://bucket/prefix`` or a local path, and how to reach it.

One :class:`Storage` turns a location plus :class:`StorageSettings` into what each
consumer needs: a boto3 client for object I/O (:meth:`Storage.client`) and a pyarrow
filesystem for Ray Data and Ray Train (:meth:`Storage.filesystem`). Only the settings
travel when Ray pickles a ``Storage`` to workers; credentials never do. Every process
resolves its own through the standard AWS chain (variables on the node or pod, a named
profile, an instance or workload role): nodes carry credentials, jobs carry locations.

Every write of a single object is atomic to readers: S3 publishes an object only
when its PUT completes, and local files are written beside their target and then
renamed over it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator
from urllib.parse import urlparse

DEFAULT_REGION = "us-east-1"
CONNECT_TIMEOUT_S = 3
READ_TIMEOUT_S = 60
IO_ATTEMPTS = 3
PROBE_READ_TIMEOUT_S = 5  # check(): a server that accepts but never answers fails fast
PROBE_ATTEMPTS = 2
RETRY_FIRST_DELAY_S = 0.5
RETRY_MAX_DELAY_S = 8.0
# boto3 clients of this process, shared by every Storage with the same settings and the same
# credential variables: a client costs ~0.1-0.2 s of CPU to build, and Ray hands each task a
# fresh (unpickled) Storage, so building one per task cost more than decoding its images.
# Clients are thread-safe; building one is not, hence the lock.
_CLIENTS: dict = {}
_CLIENTS_LOCK = threading.Lock()
_CREDENTIAL_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                         "AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE",
                         "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN")


class StorageError(RuntimeError):
    """A location cannot be used; the message names the setting to fix."""


class StorageOutage(StorageError):
    """Storage kept failing with transient errors for longer than the outage bound: the
    run must fail (no result published), not record its images as unreadable."""


_TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout",
                    "RequestTimeTooSkewed", "ServiceUnavailable", "InternalError",
                    "RequestLimitExceeded", "503", "500", "502", "504"}


def is_transient(exc: BaseException) -> bool:
    """Connection refused/reset, timeouts, 5xx and throttling: worth retrying. A missing
    object, a refused credential or bad bytes are permanent."""
    import botocore.exceptions as bx
    import urllib3.exceptions

    streaming = tuple(getattr(bx, name) for name in ("IncompleteReadError",
                                                     "ResponseStreamingError") if hasattr(bx, name))
    if isinstance(exc, (bx.HTTPClientError, bx.ConnectionError, urllib3.exceptions.HTTPError,
                        ConnectionError, TimeoutError, *streaming)):
        return True  # connection refused/reset/closed, timeouts, a body cut off
    if isinstance(exc, bx.ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        code = str(exc.response.get("Error", {}).get("Code", ""))
        return status >= 500 or status == 429 or code in _TRANSIENT_CODES
    return False


@dataclass(frozen=True)
class StorageSettings:
    """How to reach S3-compatible storage. Empty fields fall back to the AWS defaults."""

    endpoint_url: str | None = None  # e.g. http://127.0.0.1:8333; None means AWS itself
    region: str | None = None
    profile: str | None = None  # a named profile from ~/.aws/config
    # Transient errors (connection refused/reset, timeouts, 5xx, throttling) are retried
    # with backoff for up to this long before a run gives up (and publishes nothing).
    outage_seconds: float = 120.0

    def __post_init__(self):
        endpoint = self.endpoint_url
        if endpoint and not endpoint.startswith(("http://", "https://")):
            raise StorageError(f"S3 endpoint '{endpoint}' has no scheme: write "
                               f"http://{endpoint} or https://{endpoint} (--s3-endpoint / "
                               "AWS_ENDPOINT_URL)")

    @classmethod
    def from_env(cls, endpoint_url: str | None = None, region: str | None = None,
                 profile: str | None = None, outage_seconds: float | None = None
                 ) -> "StorageSettings":
        """Explicit values win; otherwise the standard AWS environment variables."""
        extra = {} if outage_seconds is None else {"outage_seconds": outage_seconds}
        return cls(
            endpoint_url=endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL") or None,
            region=region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
            or None,
            profile=profile or os.environ.get("AWS_PROFILE") or None, **extra)


@dataclass(frozen=True)
class Location:
    """A parsed storage address. ``key`` is the object key (S3) or absolute path (local)."""

    scheme: str  # "s3" or "file"
    bucket: str
    key: str

    @classmethod
    def parse(cls, uri: str) -> "Location":
        if uri.startswith("s3://"):
            # Not urlparse: an S3 key is any UTF-8 text, '?' and '#' included, taken verbatim.
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
        return self.key.rstrip("/").rsplit("/", 1)[-1]

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


def join_uri(uri: str, *parts: str) -> str:
    return Location.parse(uri).join(*parts).uri


@dataclass
class Storage:
    """Object I/O for local paths and S3-compatible storage. Safe to pickle to Ray workers."""

    settings: StorageSettings = field(default_factory=StorageSettings.from_env)
    _client: object = field(default=None, repr=False)
    _probe: object = field(default=None, repr=False)

    # --- construction -------------------------------------------------------------------
    def __getstate__(self):
        # Only settings travel to Ray workers: never a credential (no secret in a task, an
        # object or a log), and never a client. Each process resolves its own credentials
        # through the standard AWS chain (the node's environment, a profile, an instance or
        # workload role), which also refreshes temporary ones as they expire.
        return {"settings": self.settings}

    def __setstate__(self, state):
        self.__init__(state["settings"])

    @property
    def region(self) -> str:
        return self.settings.region or DEFAULT_REGION

    def _session(self):
        import boto3
        import botocore.exceptions

        try:
            return boto3.Session(profile_name=self.settings.profile)
        except botocore.exceptions.ProfileNotFound as exc:
            raise StorageError(f"AWS profile '{self.settings.profile}' not found: fix "
                               "--aws-profile / AWS_PROFILE or add it to ~/.aws/config") from exc

    def _require_credentials(self) -> None:
        """Fail with the setting to fix when this process finds no credentials at all."""
        if self._session().get_credentials() is None:
            raise StorageError("no S3 credentials found: set AWS_ACCESS_KEY_ID and "
                               "AWS_SECRET_ACCESS_KEY on the node/pod, or AWS_PROFILE "
                               "(--aws-profile), or give it an instance/workload role")

    def client(self):
        """A boto3 S3 client for object I/O (bounded timeouts and retries)."""
        if self._client is None:
            self._client = self._make_client(CONNECT_TIMEOUT_S, READ_TIMEOUT_S, IO_ATTEMPTS)
        return self._client

    def _probe_client(self):
        """A client for :meth:`check`: a silent endpoint fails in seconds, not minutes."""
        if self._probe is None:
            self._probe = self._make_client(CONNECT_TIMEOUT_S, PROBE_READ_TIMEOUT_S,
                                            PROBE_ATTEMPTS)
        return self._probe

    def _make_client(self, connect_timeout: float, read_timeout: float, attempts: int):
        # Keyed by a digest of the credential variables (never the values themselves), so a
        # process whose environment changes gets a client for its new credentials.
        identity = hashlib.sha256(repr([os.environ.get(v) for v in _CREDENTIAL_VARIABLES])
                                  .encode()).hexdigest()
        key = (self.settings, connect_timeout, read_timeout, attempts, identity)
        with _CLIENTS_LOCK:
            if key not in _CLIENTS:
                _CLIENTS[key] = self._new_client(connect_timeout, read_timeout, attempts)
            return _CLIENTS[key]

    def _new_client(self, connect_timeout: float, read_timeout: float, attempts: int):
        from botocore.config import Config

        self._require_credentials()
        # The session's credential provider refreshes temporary credentials itself.
        return self._session().client(
            "s3",
            endpoint_url=self.settings.endpoint_url,
            region_name=self.region,
            config=Config(connect_timeout=connect_timeout, read_timeout=read_timeout,
                          retries={"total_max_attempts": attempts, "mode": "standard"},
                          s3={"addressing_style": "path"}),
        )

    def filesystem(self, location: Location | str):
        """The pyarrow filesystem for ``location``; pair it with ``Location.fs_path``."""
        import pyarrow.fs as pafs

        location = _as_location(location)
        if not location.is_s3:
            return pafs.LocalFileSystem()
        self._require_credentials()
        # No keys given: pyarrow's AWS SDK resolves (and refreshes) them in each process
        # from the same chain; a pickled filesystem carries no secret either.
        kwargs = dict(region=self.region, connect_timeout=CONNECT_TIMEOUT_S,
                      request_timeout=READ_TIMEOUT_S)
        if self.settings.endpoint_url:
            endpoint = urlparse(self.settings.endpoint_url)
            kwargs.update(endpoint_override=endpoint.netloc or endpoint.path,
                          scheme=endpoint.scheme or "https")
        return pafs.S3FileSystem(**kwargs)

    # --- checks -------------------------------------------------------------------------
    def check(self, uri: str, writable: bool = False) -> None:
        """Fail now, with a message naming the setting to fix, if ``uri`` cannot be used."""
        location = _as_location(uri)
        if not location.is_s3:
            target = location.key if os.path.exists(location.key) else os.path.dirname(location.key)
            if not writable and not os.path.exists(location.key):
                raise StorageError(f"local path '{location.key}' does not exist")
            if writable and not os.access(_nearest_existing(target), os.W_OK):
                raise StorageError(f"local path '{location.key}' is not writable")
            return
        client = self._probe_client()
        try:
            client.head_bucket(Bucket=location.bucket)
            if writable:
                probe = location.join(f".covidray-write-check-{os.getpid()}")
                client.put_object(Bucket=probe.bucket, Key=probe.key, Body=b"")
                client.delete_object(Bucket=probe.bucket, Key=probe.key)
        except Exception as exc:  # translate every failure into the setting to fix
            raise self._explain(exc, location) from exc

    def _explain(self, exc: Exception, location: Location) -> StorageError:
        import botocore.exceptions as bx

        endpoint = self.settings.endpoint_url or "AWS S3 (no endpoint set)"
        if isinstance(exc, (bx.EndpointConnectionError, bx.ConnectTimeoutError,
                            bx.ReadTimeoutError, bx.ConnectionClosedError)):
            return StorageError(f"cannot reach the S3 endpoint {endpoint}: check --s3-endpoint "
                                "/ AWS_ENDPOINT_URL and that the server is running")
        if isinstance(exc, bx.NoCredentialsError):
            return StorageError("no S3 credentials found: set AWS_ACCESS_KEY_ID and "
                                "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE (--aws-profile)")
        if isinstance(exc, bx.ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("404", "NoSuchBucket") or status == 404:
                return StorageError(f"bucket '{location.bucket}' does not exist at {endpoint}: "
                                    "create it or fix the URI")
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "AccessDenied",
                        "InvalidToken", "ExpiredToken") or status == 403:
                return StorageError(f"{endpoint} rejected the credentials for "
                                    f"'{location.uri}' ({code or status}): check "
                                    "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or --aws-profile, "
                                    "and that this key may read and write the bucket")
            return StorageError(f"S3 error on '{location.uri}' at {endpoint}: {code} {exc}")
        if isinstance(exc, StorageError):
            return exc
        return StorageError(f"cannot use '{location.uri}' at {endpoint}: {exc}")

    # --- object I/O ---------------------------------------------------------------------
    def riding_out_outages(self, action, what: str):
        """``action()``, retried with exponential backoff while it fails transiently, for up
        to ``settings.outage_seconds``; then :class:`StorageOutage`."""
        deadline, delay = None, RETRY_FIRST_DELAY_S
        while True:
            try:
                return action()
            except Exception as exc:
                if not is_transient(exc):
                    raise
                now = time.monotonic()
                deadline = deadline or now + self.settings.outage_seconds
                if now >= deadline:
                    endpoint = self.settings.endpoint_url or "AWS S3"
                    raise StorageOutage(
                        f"{endpoint} kept failing for {self.settings.outage_seconds:g} s while "
                        f"{what} ({type(exc).__name__}: {exc}); nothing was published. Check "
                        "the server, or raise --s3-outage-seconds") from exc
                time.sleep(min(delay, max(0.0, deadline - now)))
                delay = min(delay * 2, RETRY_MAX_DELAY_S)

    def read_bytes(self, uri: str) -> bytes:
        return self.read_with_etag(uri)[0]

    def read_with_etag(self, uri: str) -> tuple[bytes, str]:
        """An object's bytes and the ETag of that version (the body is read inside the
        retry, so a body cut off by an outage is fetched again)."""
        location = _as_location(uri)
        if not location.is_s3:
            with open(location.key, "rb") as fh:
                return fh.read(), _local_etag(location.key)

        def get():
            response = self.client().get_object(Bucket=location.bucket, Key=location.key)
            return response["Body"].read(), response["ETag"]

        return self.riding_out_outages(get, f"reading {location.uri}")

    def write_bytes(self, uri: str, data: bytes, content_type: str | None = None) -> str:
        """Write one object atomically (readers see the old object or the whole new one)."""
        location = _as_location(uri)
        if location.is_s3:
            extra = {"ContentType": content_type} if content_type else {}
            self.riding_out_outages(
                lambda: self.client().put_object(Bucket=location.bucket, Key=location.key,
                                                 Body=data, **extra),
                f"writing {location.uri}")
        else:
            os.makedirs(os.path.dirname(location.key), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(location.key), prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                os.replace(tmp, location.key)
            except BaseException:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise
        return location.uri

    # --- conditional writes (the lease) -------------------------------------------------
    def put_if_absent(self, uri: str, data: bytes) -> str | None:
        """Create ``uri`` only if it does not exist; its ETag, or None if it exists."""
        location = _as_location(uri)
        if not location.is_s3:
            os.makedirs(os.path.dirname(location.key), exist_ok=True)
            try:
                fd = os.open(location.key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return None
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            return _local_etag(location.key)
        return self._conditional_put(location, data, IfNoneMatch="*")

    def put_if_match(self, uri: str, data: bytes, etag: str) -> str | None:
        """Replace ``uri`` only if its ETag is still ``etag``; the new ETag, or None."""
        location = _as_location(uri)
        if not location.is_s3:
            if not os.path.exists(location.key) or _local_etag(location.key) != etag:
                return None
            self.write_bytes(uri, data)
            return _local_etag(location.key)
        return self._conditional_put(location, data, IfMatch=etag)

    def _conditional_put(self, location: Location, data: bytes, **condition) -> str | None:
        import botocore.exceptions as bx

        try:
            response = self.riding_out_outages(
                lambda: self.client().put_object(Bucket=location.bucket, Key=location.key,
                                                 Body=data, **condition),
                f"writing {location.uri}")
        except bx.ClientError as exc:
            if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") in (409, 412):
                return None
            raise
        return response["ETag"]

    def delete_if_match(self, uri: str, etag: str) -> None:
        """Delete ``uri`` if it is still the version ``etag`` (best effort on S3 servers
        without conditional deletes: compare, then delete)."""
        try:
            _, current = self.read_with_etag(uri)
        except Exception:
            return
        if current == etag:
            self.delete(uri)

    def write_json(self, uri: str, obj) -> str:
        return self.write_bytes(uri, json.dumps(obj, indent=2, default=str).encode(),
                                "application/json")

    def read_json(self, uri: str):
        return json.loads(self.read_bytes(uri))

    # --- tables: the one place a DataFrame becomes bytes and back ------------------------
    def read_table(self, uri: str):
        """A CSV or Parquet object (a manifest, a run's splits) as a pandas DataFrame."""
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

    def upload_file(self, path: str, uri: str) -> str:
        with open(path, "rb") as fh:
            return self.write_bytes(uri, fh.read())

    def exists(self, uri: str) -> bool:
        location = _as_location(uri)
        if not location.is_s3:
            return os.path.exists(location.key)
        import botocore.exceptions as bx

        try:
            self.client().head_object(Bucket=location.bucket, Key=location.key)
            return True
        except bx.ClientError as exc:
            if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                return False
            raise

    def identity(self, uri: str) -> tuple[str, int] | None:
        """``(etag, size)`` of the object's current version, as a listing gives them; None
        where it cannot be read (missing, access denied: loading it then says why)."""
        location = _as_location(uri)
        if not location.is_s3:
            try:
                return _local_etag(location.key), os.path.getsize(location.key)
            except OSError:
                return None
        import botocore.exceptions as bx

        def head():
            try:
                response = self.client().head_object(Bucket=location.bucket, Key=location.key)
            except bx.ClientError as exc:
                if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") in (403, 404):
                    return None
                raise
            return response["ETag"], int(response["ContentLength"])

        return self.riding_out_outages(head, f"reading the version of {location.uri}")

    def list_files(self, uri: str, suffixes: tuple[str, ...] | None = None) -> Iterator[str]:
        """Every object (file) under ``uri``, recursively, in key order, streamed page by page."""
        for obj in self.list_objects(uri, suffixes):
            yield obj["uri"]

    def list_objects(self, uri: str, suffixes: tuple[str, ...] | None = None) -> Iterator[dict]:
        """``{"uri", "etag", "size"}`` of every object under ``uri`` (the listing carries the
        ETag and size: which version of an object it is), streamed page by page."""
        location = _as_location(uri)
        wanted = tuple(s.lower() for s in suffixes) if suffixes else None
        if location.is_s3:
            prefix = location.key + "/" if location.key else ""
            for page in self._pages(location.bucket, prefix):
                for obj in page.get("Contents", []):
                    if obj["Key"].endswith("/"):
                        continue  # a directory marker (pyarrow writes them), not a file
                    if wanted is None or obj["Key"].lower().endswith(wanted):
                        yield {"uri": f"s3://{location.bucket}/{obj['Key']}",
                               "etag": obj.get("ETag", ""), "size": int(obj.get("Size", -1))}
        else:
            for root, dirs, files in os.walk(location.key):
                dirs.sort()
                for name in sorted(files):
                    if wanted is None or name.lower().endswith(wanted):
                        path = os.path.join(root, name)
                        yield {"uri": path, "etag": _local_etag(path),
                               "size": os.path.getsize(path)}

    def _pages(self, bucket: str, prefix: str):
        """ListObjectsV2 pages, each request riding out outages."""
        token = None
        while True:
            extra = {"ContinuationToken": token} if token else {}
            page = self.riding_out_outages(
                lambda: self.client().list_objects_v2(Bucket=bucket, Prefix=prefix, **extra),
                f"listing s3://{bucket}/{prefix}")
            yield page
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return

    def copy(self, source: str, target: str) -> str:
        """Copy one object (on S3 within the server, in one request; readers of ``target``
        see the old object or the whole new one)."""
        src, dst = _as_location(source), _as_location(target)
        if not (src.is_s3 and dst.is_s3):
            return self.write_bytes(target, self.read_bytes(source))
        self.riding_out_outages(
            lambda: self.client().copy_object(Bucket=dst.bucket, Key=dst.key, CopySource={
                "Bucket": src.bucket, "Key": src.key}), f"copying {src.uri} to {dst.uri}")
        return dst.uri

    def copy_prefix(self, source: str, target: str) -> int:
        """Copy every object under ``source`` to the same relative key under ``target``;
        returns how many."""
        root = _as_location(source).uri
        count = 0
        for uri in self.list_files(source):
            self.copy(uri, target + uri[len(root):])
            count += 1
        return count

    def delete(self, uri: str) -> None:
        """Delete one object if it exists."""
        location = _as_location(uri)
        if location.is_s3:
            self.riding_out_outages(
                lambda: self.client().delete_object(Bucket=location.bucket, Key=location.key),
                f"deleting {location.uri}")
        elif os.path.exists(location.key):
            os.unlink(location.key)

    def delete_prefix(self, uri: str) -> int:
        """Delete every object under ``uri``; returns how many."""
        location = _as_location(uri)
        if not location.is_s3:
            import shutil

            if not os.path.exists(location.key):
                return 0
            count = sum(len(files) for _, _, files in os.walk(location.key))
            shutil.rmtree(location.key)
            return count
        count = 0
        batch: list[dict] = []
        for obj_uri in self.list_files(uri):
            batch.append({"Key": Location.parse(obj_uri).key})
            if len(batch) == 1000:
                count += self._delete_batch(location.bucket, batch)
                batch = []
        if batch:
            count += self._delete_batch(location.bucket, batch)
        return count

    def _delete_batch(self, bucket: str, objects: list[dict]) -> int:
        response = self.riding_out_outages(
            lambda: self.client().delete_objects(Bucket=bucket, Delete={"Objects": objects,
                                                                        "Quiet": True}),
            f"deleting {len(objects)} objects in s3://{bucket}")
        failed = response.get("Errors") or []
        if failed:  # a quiet batch delete reports what it could not delete, and raises nothing
            first = failed[0]
            raise StorageError(f"could not delete {len(failed)} of {len(objects)} objects in "
                               f"s3://{bucket}, e.g. {first.get('Key')}: {first.get('Code')} "
                               f"{first.get('Message', '')}".rstrip())
        return len(objects)

    def ensure_bucket(self, uri: str) -> None:
        """Create the bucket of ``uri`` if missing (local set-up and demos only)."""
        location = _as_location(uri)
        if not location.is_s3:
            os.makedirs(location.key, exist_ok=True)
            return
        import botocore.exceptions as bx

        try:
            self.client().head_bucket(Bucket=location.bucket)
        except bx.ClientError as exc:
            if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") != 404:
                raise self._explain(exc, location) from exc
            self.client().create_bucket(Bucket=location.bucket)
        except Exception as exc:
            raise self._explain(exc, location) from exc


def _local_etag(path: str) -> str:
    stat = os.stat(path)
    return f"{stat.st_mtime_ns}-{stat.st_size}"


def _as_location(location: Location | str) -> Location:
    return location if isinstance(location, Location) else Location.parse(location)


def _nearest_existing(path: str) -> str:
    while path and not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path or "."
