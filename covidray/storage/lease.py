"""A lease in storage: at most one run at a time works on a scoring output.

The lease is one object (``<output>/_LEASE.json``) created with a conditional write
(S3 ``If-None-Match: *``; locally ``O_EXCL``), renewed by a heartbeat thread with
``If-Match`` on its ETag, and taken over only once expired (again with ``If-Match``), so
two overlapping nightly runs never both score an archive into one output.

A run that fails releases its lease with one brief try (its storage may be what failed). A
lease it could not release is taken over at once by the next run that knows its holder is
gone: a run of this process that ended, or a process of this host that no longer exists.
Otherwise (a holder on another machine) it blocks others for at most ``ttl`` seconds.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid

from covidray.storage import Storage
from covidray.storage.store import CLEANUP_SECONDS


_ENDED: set[str] = set()  # owners, in this process, whose run ended holding its lease


class LeaseHeld(RuntimeError):
    """Another live run holds the lease; the message says which and until when."""


def holder_is_gone(owner: str) -> bool:
    """Whether the lease's ``owner`` (``host:pid:id``) is known to hold it no more: a run of
    this process that ended, or a process of this host that no longer exists."""
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if owner in _ENDED:
        return True
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, another user's
        return False
    return False


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
            gone = holder_is_gone(holder.get("owner", ""))
            if gone:
                print(f"taking over the lease {self.uri} of {holder['owner']} "
                      f"({holder['what']}), which ended without releasing it", flush=True)
            elif holder["expires_at"] > time.time():
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

    def stop_renewing(self, wait: float | None = None) -> None:
        """Stop the heartbeat (the lease then lapses after its ttl unless released), waiting
        for a renewal under way for at most ``wait`` seconds (None: until it ends)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(wait)

    def release(self) -> None:
        self.stop_renewing()
        self._delete(self.storage)

    def release_after_failure(self) -> None:
        """Release with one brief try: the run failed, perhaps because its storage did."""
        self.stop_renewing(wait=CLEANUP_SECONDS)
        self._delete(self.storage.bounded(CLEANUP_SECONDS))

    def _delete(self, storage: Storage) -> None:
        """Delete the lease if it is still ours. One that cannot be deleted (storage away) is
        recorded as ended, so the next run of this process takes it over at once (another
        process finds this one gone, or the lease lapsed)."""
        if self.lost or self._etag is None:
            return
        try:
            storage.delete_if_match(self.uri, self._etag)
        except Exception as exc:
            _ENDED.add(self.owner)
            print(f"could not release the lease {self.uri} ({type(exc).__name__}): the next "
                  "run takes it over", flush=True)

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.release()
        else:
            self.release_after_failure()


def _when(epoch: float | None) -> str:
    return "unknown" if epoch is None else time.strftime("%Y-%m-%d %H:%M:%S UTC",
                                                         time.gmtime(epoch))


def lapses_at(storage: Storage, uri: str) -> float | None:
    """When the lease at ``uri`` lapses (epoch seconds), or None when nobody holds it."""
    if not storage.exists(uri):
        return None
    return json.loads(storage.read_bytes(uri))["expires_at"]

