"""A lease in storage: at most one run at a time works on a scoring output.

The lease is one object (``<output>/_LEASE.json``) created with a conditional write
(S3 ``If-None-Match: *``; locally ``O_EXCL``), renewed by a heartbeat thread with
``If-Match`` on its ETag, and taken over only once expired (again with ``If-Match``), so
two overlapping nightly runs never both score an archive into one output. A run killed
without releasing its lease blocks others for at most ``ttl`` seconds.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid

from covidray.storage import Storage


class LeaseHeld(RuntimeError):
    """Another live run holds the lease; the message says which and until when."""


class Lease:
    def __init__(self, storage: Storage, uri: str, ttl: float, what: str):
        self.storage, self.uri, self.ttl, self.what = storage, uri, ttl, what
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._etag: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False
        self.holder: dict | None = None  # who took the lease over, once lost

    def _body(self) -> bytes:
        now = time.time()
        return json.dumps({"owner": self.owner, "what": self.what, "renewed_at": now,
                           "expires_at": now + self.ttl}).encode()

    def acquire(self) -> "Lease":
        etag = self.storage.put_if_absent(self.uri, self._body())
        if etag is None:  # someone holds it, or held it and died
            current, current_etag = self.storage.read_with_etag(self.uri)
            holder = json.loads(current)
            if holder["expires_at"] > time.time():
                raise LeaseHeld(
                    f"another run holds the lease {self.uri} ({holder['owner']}, "
                    f"{holder['what']}) until {_when(holder['expires_at'])}; not starting a "
                    "second one. Try again after it ends")
            etag = self.storage.put_if_match(self.uri, self._body(), current_etag)
            if etag is None:
                raise LeaseHeld(f"another run took over the expired lease {self.uri} first")
        self._etag = etag
        self._thread = threading.Thread(target=self._renew, name="lease-heartbeat", daemon=True)
        self._thread.start()
        return self

    def renew(self) -> bool:
        """Extend the lease; False (and :attr:`lost`, :attr:`holder`) if another run has taken
        it over. Idempotent: a renewal whose first attempt landed although its answer was
        lost (a frozen server, a timeout, then a retry that meets the new ETag) finds its
        own lease there and keeps it."""
        etag = self.storage.put_if_match(self.uri, self._body(), self._etag)
        if etag is None:
            current, current_etag = self.storage.read_with_etag(self.uri)
            holder = json.loads(current)
            if holder.get("owner") == self.owner:  # our own write: still ours
                self._etag = current_etag
                return True
            self.lost, self.holder = True, holder
            return False
        self._etag = etag
        return True

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                if not self.renew():
                    return
            except Exception:  # storage briefly away: try again at the next beat
                continue

    def check(self) -> None:
        """Raise if the lease was lost (taken over after this run stalled past its ttl),
        saying who holds it now."""
        if self.lost:
            holder = self.holder or {}
            raise LeaseHeld(f"this run lost its lease {self.uri} to {holder.get('owner')} "
                            f"({holder.get('what')}, until {_when(holder.get('expires_at'))}): "
                            "not publishing")

    def stop_renewing(self) -> None:
        """Stop the heartbeat (the lease then lapses after its ttl unless released)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def release(self) -> None:
        self.stop_renewing()
        if not self.lost and self._etag is not None:
            self.storage.delete_if_match(self.uri, self._etag)

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _when(epoch: float | None) -> str:
    return "unknown" if epoch is None else time.strftime("%Y-%m-%d %H:%M:%S UTC",
                                                         time.gmtime(epoch))


def lapses_at(storage: Storage, uri: str) -> float | None:
    """When the lease at ``uri`` lapses (epoch seconds), or None when nobody holds it."""
    if not storage.exists(uri):
        return None
    return json.loads(storage.read_bytes(uri))["expires_at"]

