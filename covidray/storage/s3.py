"""The S3 backend of :class:`covidray.storage.Storage`: objects on AWS S3 or any
S3-compatible server (SeaweedFS, MinIO, Ceph), through boto3.

Every request goes through :meth:`S3Objects.riding_out_outages`, the one retry rule:
transient failures (connection refused or reset, timeouts, 5xx, throttling) are retried
with backoff for up to ``StorageSettings.outage_seconds``, then the run fails with
:class:`covidray.storage.location.StorageOutage`; a permanent failure (missing object, refused
credential) raises at once.
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
import time
from typing import Iterator
from urllib.parse import urlparse

from covidray.storage.location import Location, StorageError, StorageOutage, has_suffix

DEFAULT_REGION = "us-east-1"
CONNECT_TIMEOUT_S = 3
READ_TIMEOUT_S = 60
MIN_READ_TIMEOUT_S = 2
IO_ATTEMPTS = 3
PROBE_READ_TIMEOUT_S = 5  # check(): a server that accepts but never answers fails fast
PROBE_ATTEMPTS = 2
RETRY_FIRST_DELAY_S = 0.5
RETRY_MAX_DELAY_S = 8.0
READ_BUFFER_BYTES = 8 << 20  # one ranged GET of a streamed read (a manifest)
# boto3 clients of this process, shared by every Storage with the same settings and the same
# credential variables: a client costs ~0.1-0.2 s of CPU to build, and Ray hands each task a
# fresh (unpickled) Storage, so building one per task cost more than decoding its images.
# Clients are thread-safe; building one is not, hence the lock.
_CLIENTS: dict = {}
_CLIENTS_LOCK = threading.Lock()
_CREDENTIAL_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                         "AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE",
                         "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN")
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
        return status_of(exc) >= 500 or status_of(exc) == 429 or error_code(exc) in _TRANSIENT_CODES
    return False


def status_of(exc) -> int:
    """The HTTP status of a botocore ``ClientError`` (0 when it has none)."""
    return exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0


def error_code(exc) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


class S3Objects:
    """Object I/O on S3; every method takes a parsed ``s3`` :class:`Location`."""

    def __init__(self, settings):
        self.settings = settings
        self._client = None
        self._probe = None

    @property
    def region(self) -> str:
        return self.settings.region or DEFAULT_REGION

    @property
    def endpoint(self) -> str:
        return self.settings.endpoint_url or "AWS S3 (no endpoint set)"

    # --- clients ------------------------------------------------------------------------
    def _session(self):
        import boto3
        import botocore.exceptions

        try:
            return boto3.Session(profile_name=self.settings.profile)
        except botocore.exceptions.ProfileNotFound as exc:
            raise StorageError(f"AWS profile '{self.settings.profile}' not found: fix "
                               "--aws-profile / AWS_PROFILE or add it to ~/.aws/config") from exc

    def require_credentials(self) -> None:
        """Fail with the setting to fix when this process finds no credentials at all."""
        if self._session().get_credentials() is None:
            raise StorageError("no S3 credentials found: set AWS_ACCESS_KEY_ID and "
                               "AWS_SECRET_ACCESS_KEY on the node/pod, or AWS_PROFILE "
                               "(--aws-profile), or give it an instance/workload role")

    @property
    def read_timeout(self) -> float:
        """Seconds a request may wait for the server's next bytes. Derived from the outage
        bound, so that even a server that accepts connections but never answers (a frozen
        process) fails a request's attempts within half the bound, and the bound holds."""
        return min(READ_TIMEOUT_S, max(MIN_READ_TIMEOUT_S,
                                       self.settings.outage_seconds / (2 * IO_ATTEMPTS)))

    def client(self):
        """A boto3 S3 client for object I/O (bounded timeouts and retries)."""
        if self._client is None:
            self._client = self._shared_client(min(CONNECT_TIMEOUT_S, self.read_timeout),
                                               self.read_timeout, IO_ATTEMPTS)
        return self._client

    def probe_client(self):
        """A client for :meth:`check`: a silent endpoint fails in seconds, not minutes."""
        if self._probe is None:
            self._probe = self._shared_client(CONNECT_TIMEOUT_S, PROBE_READ_TIMEOUT_S,
                                              PROBE_ATTEMPTS)
        return self._probe

    def _shared_client(self, connect_timeout: float, read_timeout: float, attempts: int):
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

        self.require_credentials()
        # The session's credential provider refreshes temporary credentials itself.
        return self._session().client(
            "s3",
            endpoint_url=self.settings.endpoint_url,
            region_name=self.region,
            config=Config(connect_timeout=connect_timeout, read_timeout=read_timeout,
                          retries={"total_max_attempts": attempts, "mode": "standard"},
                          s3={"addressing_style": "path"}),
        )

    def filesystem(self):
        """A pyarrow S3 filesystem (for Ray Data and Ray Train) with no key in it: pyarrow's
        AWS SDK resolves (and refreshes) credentials in each process from the same chain."""
        import pyarrow.fs as pafs

        self.require_credentials()
        kwargs = dict(region=self.region, connect_timeout=CONNECT_TIMEOUT_S,
                      request_timeout=self.read_timeout)
        if self.settings.endpoint_url:
            endpoint = urlparse(self.settings.endpoint_url)
            kwargs.update(endpoint_override=endpoint.netloc or endpoint.path,
                          scheme=endpoint.scheme or "https")
        return pafs.S3FileSystem(**kwargs)

    # --- the one retry rule -------------------------------------------------------------
    def riding_out_outages(self, action, what: str):
        """``action()``, retried with exponential backoff while it fails transiently, for up
        to ``settings.outage_seconds`` from the start of the call (a frozen server's timeouts
        count); then :class:`StorageOutage`."""
        started, delay = time.monotonic(), RETRY_FIRST_DELAY_S
        deadline = started + self.settings.outage_seconds
        while True:
            try:
                return action()
            except Exception as exc:
                if not is_transient(exc):
                    raise
                now = time.monotonic()
                if now >= deadline:
                    endpoint = self.settings.endpoint_url or "AWS S3"
                    raise StorageOutage(
                        f"{endpoint} kept failing for {self.settings.outage_seconds:g} s while "
                        f"{what} ({type(exc).__name__}: {exc}); nothing was published. Check "
                        "the server, or raise --s3-outage-seconds") from exc
                time.sleep(min(delay, max(0.0, deadline - now)))
                delay = min(delay * 2, RETRY_MAX_DELAY_S)

    def _request(self, what: str, method: str, **kwargs):
        return self.riding_out_outages(lambda: getattr(self.client(), method)(**kwargs), what)

    # --- checks -------------------------------------------------------------------------
    def check(self, location: Location, writable: bool) -> None:
        client = self.probe_client()
        try:
            client.head_bucket(Bucket=location.bucket)
            if writable:
                probe = location.join(f".covidray-write-check-{os.getpid()}")
                client.put_object(Bucket=probe.bucket, Key=probe.key, Body=b"")
                client.delete_object(Bucket=probe.bucket, Key=probe.key)
        except Exception as exc:  # translate every failure into the setting to fix
            raise self.explain(exc, location) from exc

    def explain(self, exc: Exception, location: Location) -> StorageError:
        """A failure to use ``location`` as the setting to fix."""
        import botocore.exceptions as bx

        endpoint = self.endpoint
        if isinstance(exc, (bx.EndpointConnectionError, bx.ConnectTimeoutError,
                            bx.ReadTimeoutError, bx.ConnectionClosedError)):
            return StorageError(f"cannot reach the S3 endpoint {endpoint}: check --s3-endpoint "
                                "/ AWS_ENDPOINT_URL and that the server is running")
        if isinstance(exc, bx.NoCredentialsError):
            return StorageError("no S3 credentials found: set AWS_ACCESS_KEY_ID and "
                                "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE (--aws-profile)")
        if isinstance(exc, bx.ClientError):
            code, status = error_code(exc), status_of(exc)
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
    def read_with_etag(self, location: Location) -> tuple[bytes, str]:
        # The body is read inside the retry, so a body cut off by an outage is fetched again.
        def get():
            response = self.client().get_object(Bucket=location.bucket, Key=location.key)
            return response["Body"].read(), response["ETag"]

        return self.riding_out_outages(get, f"reading {location.uri}")

    def open_read(self, location: Location, buffer_bytes: int = READ_BUFFER_BYTES):
        """A buffered file object over the object, read in ranged GETs of ``buffer_bytes``
        (each riding out outages): streams a large object (a manifest) without holding it
        whole."""
        return io.BufferedReader(_RangedReader(self, location), buffer_bytes)

    def write_bytes(self, location: Location, data: bytes, content_type: str | None) -> None:
        extra = {"ContentType": content_type} if content_type else {}
        self._request(f"writing {location.uri}", "put_object", Bucket=location.bucket,
                      Key=location.key, Body=data, **extra)

    def put_if_absent(self, location: Location, data: bytes) -> str | None:
        return self._conditional_put(location, data, IfNoneMatch="*")

    def put_if_match(self, location: Location, data: bytes, etag: str) -> str | None:
        return self._conditional_put(location, data, IfMatch=etag)

    def _conditional_put(self, location: Location, data: bytes, **condition) -> str | None:
        import botocore.exceptions as bx

        try:
            response = self._request(f"writing {location.uri}", "put_object",
                                     Bucket=location.bucket, Key=location.key, Body=data,
                                     **condition)
        except bx.ClientError as exc:
            if status_of(exc) in (409, 412):
                return None
            raise
        return response["ETag"]

    def head(self, location: Location, missing=(404,)) -> tuple[str, int] | None:
        """``(etag, size)`` of the object, or None where the server answers one of the
        ``missing`` statuses (404: no such object)."""
        import botocore.exceptions as bx

        def head():
            try:
                response = self.client().head_object(Bucket=location.bucket, Key=location.key)
            except bx.ClientError as exc:
                if status_of(exc) in missing:
                    return None
                raise
            return response["ETag"], int(response["ContentLength"])

        return self.riding_out_outages(head, f"reading the version of {location.uri}")

    def list_objects(self, location: Location, wanted: tuple[str, ...] | None) -> Iterator[dict]:
        prefix = location.key + "/" if location.key else ""
        token = None
        while True:  # ListObjectsV2 pages, each request riding out outages
            extra = {"ContinuationToken": token} if token else {}
            page = self._request(f"listing s3://{location.bucket}/{prefix}", "list_objects_v2",
                                 Bucket=location.bucket, Prefix=prefix, **extra)
            for obj in page.get("Contents", []):
                if obj["Key"].endswith("/"):
                    continue  # a directory marker (pyarrow writes them), not a file
                if has_suffix(obj["Key"], wanted):
                    yield {"uri": f"s3://{location.bucket}/{obj['Key']}",
                           "etag": obj.get("ETag", ""), "size": int(obj.get("Size", -1))}
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return

    def copy(self, source: Location, target: Location) -> None:
        """Within the server, in one request."""
        self._request(f"copying {source.uri} to {target.uri}", "copy_object",
                      Bucket=target.bucket, Key=target.key,
                      CopySource={"Bucket": source.bucket, "Key": source.key})

    def delete(self, location: Location) -> None:
        self._request(f"deleting {location.uri}", "delete_object", Bucket=location.bucket,
                      Key=location.key)

    def delete_prefix(self, location: Location) -> int:
        count, batch = 0, []
        for obj in self.list_objects(location, None):
            batch.append({"Key": Location.parse(obj["uri"]).key})
            if len(batch) == 1000:
                count += self._delete_batch(location.bucket, batch)
                batch = []
        if batch:
            count += self._delete_batch(location.bucket, batch)
        return count

    def _delete_batch(self, bucket: str, objects: list[dict]) -> int:
        response = self._request(f"deleting {len(objects)} objects in s3://{bucket}",
                                 "delete_objects", Bucket=bucket,
                                 Delete={"Objects": objects, "Quiet": True})
        failed = response.get("Errors") or []
        if failed:  # a quiet batch delete reports what it could not delete, and raises nothing
            first = failed[0]
            raise StorageError(f"could not delete {len(failed)} of {len(objects)} objects in "
                               f"s3://{bucket}, e.g. {first.get('Key')}: {first.get('Code')} "
                               f"{first.get('Message', '')}".rstrip())
        return len(objects)

    def ensure_bucket(self, location: Location) -> None:
        import botocore.exceptions as bx

        try:
            self.client().head_bucket(Bucket=location.bucket)
        except bx.ClientError as exc:
            if status_of(exc) != 404:
                raise self.explain(exc, location) from exc
            self.client().create_bucket(Bucket=location.bucket)
        except Exception as exc:
            raise self.explain(exc, location) from exc


class _RangedReader(io.RawIOBase):
    """A read-only raw stream over one S3 object (its version when opened), a ranged GET
    per read."""

    def __init__(self, objects: S3Objects, location: Location):
        self.objects, self.location, self.position = objects, location, 0
        found = objects.head(location, missing=())
        self.etag, self.size = found

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence]
        self.position = max(0, base + offset)
        return self.position

    def tell(self) -> int:
        return self.position

    def readinto(self, buffer) -> int:
        if self.position >= self.size:
            return 0
        end = min(self.size, self.position + len(buffer)) - 1
        location = self.location

        def get():
            response = self.objects.client().get_object(
                Bucket=location.bucket, Key=location.key, IfMatch=self.etag,
                Range=f"bytes={self.position}-{end}")
            return response["Body"].read()

        data = self.objects.riding_out_outages(get, f"reading {location.uri}")
        buffer[:len(data)] = data
        self.position += len(data)
        return len(data)
