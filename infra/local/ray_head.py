#!/usr/bin/env python3
"""Start, stop and check a local Ray head node (``ray start --head``) on 127.0.0.1.

    python infra/local/ray_head.py start [--dir .local/ray] [--port 6380] [--dashboard-port 8265]
    python infra/local/ray_head.py stop

``ray start --block`` runs under a PID recorded in ``<dir>/ray.pid``; ``stop`` sends it
SIGTERM, which ends the processes that node started and nothing else (no ``ray stop``,
which would end every Ray process on the machine). Idempotent.

Authentication: the local head runs with ``RAY_AUTH_MODE=disabled`` and binds to
127.0.0.1; set the same mode for clients (``infra/local/env.sh`` does). Clusters that
others can reach should use ``RAY_AUTH_MODE=token`` (see README).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import urllib.request

from pidfile import already_running, launch, stop_recorded

DEFAULT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".local", "ray")
AUTH_MODE = "disabled"


def _pid_file(directory: str) -> str:
    return os.path.join(directory, "ray.pid")


def dashboard_up(dashboard_port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{dashboard_port}/api/version", timeout=2) as r:
            return r.status == 200
    except Exception:
        return False


def start(directory: str = DEFAULT_DIR, port: int = 6380, dashboard_port: int = 8265,
          num_cpus: int | None = None, env: dict | None = None, timeout: float = 90,
          client_port: int = 10001, agent_port: int = 52365) -> str:
    """Start the head (or find it running); returns the dashboard address for ``ray job submit``."""
    directory = os.path.abspath(directory)
    address = f"http://127.0.0.1:{dashboard_port}"
    if already_running(_pid_file(directory), lambda: dashboard_up(dashboard_port), "a Ray head"):
        return address
    if dashboard_up(dashboard_port):
        raise SystemExit(f"another Ray dashboard already answers on port {dashboard_port}: "
                         "stop it or pick --dashboard-port")
    os.makedirs(directory, exist_ok=True)
    # The Python that runs this script runs the cluster, and is `python` in job entrypoints.
    python_bin = os.path.dirname(sys.executable)
    ray_binary = os.path.join(python_bin, "ray")
    if not os.path.exists(ray_binary):
        ray_binary = shutil.which("ray") or "ray"
    # Logical CPUs default to the machine's; more than the cores lets Train and Data
    # both schedule on very small machines (covidray sizes its work from this number).
    num_cpus = num_cpus or max(2, os.cpu_count() or 2)
    command = [ray_binary, "start", "--head", "--block", f"--port={port}",
               "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
               f"--dashboard-port={dashboard_port}", f"--num-cpus={num_cpus}",
               f"--ray-client-server-port={client_port}",
               f"--dashboard-agent-listen-port={agent_port}",
               "--disable-usage-stats", "--include-dashboard=true"]
    child_env = {**os.environ, "RAY_AUTH_MODE": AUTH_MODE,
                 "PATH": f"{python_bin}{os.pathsep}{os.environ.get('PATH', '')}", **(env or {})}
    launch(command, os.path.join(directory, "ray.out"), _pid_file(directory),
           lambda: dashboard_up(dashboard_port), timeout, whole_group=False, env=child_env)
    return address


def stop(directory: str = DEFAULT_DIR, timeout: float = 30) -> bool:
    """Stop the head that ``start`` recorded in ``directory``; True if one was running."""
    directory = os.path.abspath(directory)
    return stop_recorded(_pid_file(directory), whole_group=False)  # `ray start --block` ends what it started


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["start", "stop"])
    parser.add_argument("--dir", default=os.environ.get("COVIDRAY_RAY_DIR", DEFAULT_DIR))
    parser.add_argument("--port", type=int, default=int(os.environ.get("COVIDRAY_RAY_PORT", 6380)))
    parser.add_argument("--dashboard-port", type=int,
                        default=int(os.environ.get("COVIDRAY_RAY_DASHBOARD_PORT", 8265)))
    parser.add_argument("--num-cpus", type=int, default=None,
                        help="logical CPUs to advertise (default: the machine's, at least 2)")
    args = parser.parse_args(argv)
    if args.action == "start":
        address = start(args.dir, args.port, args.dashboard_port, args.num_cpus)
        print(f"Ray head ready; submit jobs with --address {address}", file=sys.stderr)
    else:
        print("stopped" if stop(args.dir) else "not running", file=sys.stderr)


if __name__ == "__main__":
    main()
