"""PID files for the local services: stop exactly the process a start recorded."""

from __future__ import annotations

import os
import signal
import time


def running_pid(path: str) -> int | None:
    """The PID recorded at ``path`` if that process is alive, else None."""
    try:
        with open(path) as fh:
            pid = int(fh.read().strip())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def record(path: str, pid: int) -> None:
    with open(path, "w") as fh:
        fh.write(str(pid))


def stop_recorded(path: str, whole_group: bool, timeout: float = 30) -> bool:
    """SIGTERM the recorded process (or its whole process group), wait, then SIGKILL the
    group; remove the PID file. True if something was running."""
    pid = running_pid(path)
    if pid is None:
        return False
    (os.killpg if whole_group else os.kill)(pid, signal.SIGTERM)
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
            time.sleep(0.1)
        except OSError:
            break
    else:
        os.killpg(pid, signal.SIGKILL)
    os.unlink(path)
    return True
