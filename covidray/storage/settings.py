"""How to reach S3-compatible storage: the settings that travel with a :class:`Storage`
to Ray workers (never a credential: each process resolves its own through the AWS chain)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from covidray.storage.location import StorageError


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
