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


def already_running(path: str, ready, what: str) -> bool:
    """True if the process recorded at ``path`` runs and ``ready()``; False if none runs;
    SystemExit if it runs but does not answer (a restart would orphan it)."""
    pid = running_pid(path)
    if pid is None:
        return False
    if ready():
        return True
    raise SystemExit(f"{what} (PID {pid}, recorded in {path}) runs but does not answer: "
                     "run `stop` first")


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
            os.waitpid(pid, os.WNOHANG)  # reap it if we started it (else it lingers as a zombie)
        except ChildProcessError:
            pass
        try:
            os.kill(pid, 0)
            time.sleep(0.1)
        except OSError:
            break
    else:
        os.killpg(pid, signal.SIGKILL)
    os.unlink(path)
    return True


def launch(command: list[str], log_path: str, pid_path: str, ready, timeout: float,
           whole_group: bool, env: dict | None = None) -> None:
    """Start ``command`` in its own session (output appended to ``log_path``), record its PID,
    and wait until ``ready()``; on exit or timeout, stop it and raise SystemExit."""
    import subprocess

    name = os.path.basename(command[0])
    with open(log_path, "ab") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    record(pid_path, process.pid)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{name} exited with {process.returncode}; see {log_path}")
        if ready():
            return
        time.sleep(0.5)
    stop_recorded(pid_path, whole_group)
    raise SystemExit(f"{name} did not become ready in {timeout:.0f}s; see {log_path}")
