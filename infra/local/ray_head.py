#!/usr/bin/env python3
"""Start, stop and check a local Ray head node (``ray start --head``) on 127.0.0.1.

    python infra/local/ray_head.py start [--dir .local/ray] [--port 6380] [--dashboard-port 8265]
    python infra/local/ray_head.py stop

Every port the head fixes is configurable, so two local clusters (yours and the tests', or
two checkouts) run side by side: GCS ``COVIDRAY_RAY_PORT`` (6380), dashboard
``COVIDRAY_RAY_DASHBOARD_PORT`` (8265), Ray client ``COVIDRAY_RAY_CLIENT_PORT`` (10001),
dashboard agent ``COVIDRAY_RAY_AGENT_PORT`` (52365); Ray picks the others itself. Each is
checked free before the start, and a taken one is named with its variable.

``ray start --block`` runs under a PID recorded in ``<dir>/ray.pid``; ``stop`` sends it
SIGTERM, which ends the processes that node started and nothing else (no ``ray stop``,
which would end every Ray process on the machine). Idempotent.

Authentication: Ray's servers (GCS, raylets, workers, Ray client, agents) listen on the
machine's address whatever ``--node-ip-address`` says (Ray 2.60), so the local head runs
with ``RAY_AUTH_MODE=token``: every RPC and HTTP entry point asks for the token in
``<dir>/auth_token`` (0600, generated on the first start). Clients need the same two
variables, which :func:`token_env` returns and ``.local/env.sh`` exports. The dashboard
listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import shutil
import sys
import tempfile
import urllib.request

from pidfile import already_running, launch, stop_recorded

DEFAULT_DIR = os.path.join(os.environ.get("COVIDRAY_LOCAL") or os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", ".local"), "ray")
# The ports the head fixes: what each is, its variable, its default.
PORTS = {"port": ("the Ray GCS", "COVIDRAY_RAY_PORT", 6380),
         "dashboard_port": ("the Ray dashboard", "COVIDRAY_RAY_DASHBOARD_PORT", 8265),
         "client_port": ("the Ray client server", "COVIDRAY_RAY_CLIENT_PORT", 10001),
         "agent_port": ("the Ray dashboard agent", "COVIDRAY_RAY_AGENT_PORT", 52365)}


def configured_port(name: str) -> int:
    """A port of :data:`PORTS` from its variable, else its default."""
    _, variable, default = PORTS[name]
    value = os.environ.get(variable) or str(default)
    if not value.isdigit() or not 0 < int(value) < 65536:
        raise SystemExit(f"{variable}={value} is not a port number")
    return int(value)


# Where `ray start` takes its workers' ports (its --min/--max-worker-port defaults): a fixed
# port in this range makes `ray start` fail with a long traceback.
WORKER_PORTS = range(10002, 20000)


def require_free(ports: dict) -> None:
    """Refuse to start when a port (``name -> number``, names of :data:`PORTS`) is taken
    on this machine or lies among the workers' ports, naming the port, what it is for and
    the variable that moves it."""
    import socket

    for name, port in ports.items():
        if port in WORKER_PORTS:
            what, variable, _ = PORTS[name]
            raise SystemExit(f"port {port} ({what}) is among the ports Ray gives its workers "
                             f"({WORKER_PORTS.start}-{WORKER_PORTS.stop - 1}): set {variable} "
                             "to a port outside that range and run infra/local/up.sh again")
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("0.0.0.0", port))  # Ray's servers listen on every interface
            except OSError:
                what, variable, _ = PORTS[name]
                raise SystemExit(f"port {port} ({what}) is taken on this machine: another Ray "
                                 f"cluster, or another program, uses it. Set {variable} to a "
                                 "free port and run infra/local/up.sh again") from None


def token_env(directory: str = DEFAULT_DIR) -> dict:
    """The client and node variables for token authentication: ``RAY_AUTH_TOKEN_PATH`` from
    the environment when it is set, else ``<directory>/auth_token`` (created 0600)."""
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.join(os.path.abspath(directory),
                                                                  "auth_token")
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": path}


def _pid_file(directory: str) -> str:
    return os.path.join(directory, "ray.pid")


def temp_dir(directory: str) -> str:
    """The Ray node's own temp dir (sessions, logs, sockets), one per ``directory``. Ray
    records the latest cluster it started in ``<temp dir>/ray_current_cluster``, and a job's
    supervisor finds its own cluster there: with the default ``/tmp/ray`` shared, a job
    submitted to the first of two local clusters connected to the second, and failed on its
    token. Short, for the sockets inside it (a Unix socket path holds at most 107 bytes)."""
    digest = hashlib.sha256(os.path.abspath(directory).encode()).hexdigest()[:12]
    return os.path.join(tempfile.gettempdir(), f"covidray-ray-{digest}")


def dashboard_up(dashboard_port: int, token_path: str) -> bool:
    """The dashboard answers an authenticated request."""
    with open(token_path) as fh:
        request = urllib.request.Request(f"http://127.0.0.1:{dashboard_port}/api/version",
                                         headers={"Authorization": f"Bearer {fh.read().strip()}"})
    try:
        with urllib.request.urlopen(request, timeout=2) as r:
            return r.status == 200
    except Exception:
        return False


def start(directory: str = DEFAULT_DIR, port: int = 6380, dashboard_port: int = 8265,
          num_cpus: int | None = None, env: dict | None = None, timeout: float = 90,
          client_port: int = 10001, agent_port: int = 52365) -> str:
    """Start the head (or find it running); returns the dashboard address for ``ray job submit``."""
    directory = os.path.abspath(directory)
    address = f"http://127.0.0.1:{dashboard_port}"
    auth = token_env(directory)
    up = lambda: dashboard_up(dashboard_port, auth["RAY_AUTH_TOKEN_PATH"])  # noqa: E731
    if already_running(_pid_file(directory), up, "a Ray head"):
        return address
    if up():
        raise SystemExit(f"another Ray dashboard already answers on port {dashboard_port}: "
                         "stop it or set COVIDRAY_RAY_DASHBOARD_PORT")
    require_free({"port": port, "dashboard_port": dashboard_port, "client_port": client_port,
                  "agent_port": agent_port})
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
               f"--dashboard-agent-listen-port={agent_port}", f"--temp-dir={temp_dir(directory)}",
               "--disable-usage-stats", "--include-dashboard=true"]
    child_env = {**os.environ, **auth,
                 "PATH": f"{python_bin}{os.pathsep}{os.environ.get('PATH', '')}", **(env or {})}
    launch(command, os.path.join(directory, "ray.out"), _pid_file(directory),
           up, timeout, whole_group=False, env=child_env)
    return address


def alive_nodes(dashboard_port: int, token_path: str) -> list[dict]:
    """The cluster's alive nodes, from the dashboard's state API."""
    with open(token_path) as fh:
        request = urllib.request.Request(f"http://127.0.0.1:{dashboard_port}/api/v0/nodes",
                                         headers={"Authorization": f"Bearer {fh.read().strip()}"})
    with urllib.request.urlopen(request, timeout=5) as response:
        nodes = json.load(response)["data"]["result"]["result"]
    return [node for node in nodes if node["state"] == "ALIVE"]


def join(directory: str, head_port: int, dashboard_port: int, num_cpus: int,
         resources: dict | None = None, env: dict | None = None, timeout: float = 90,
         agent_port: int = 52366) -> None:
    """Start a second node (``ray start --address``) that joins the head on this machine, as
    another machine's node would; its PID goes to ``<directory>/ray.pid`` (:func:`stop`)."""
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    auth = token_env(directory)

    def workers() -> int:
        nodes = alive_nodes(dashboard_port, auth["RAY_AUTH_TOKEN_PATH"])
        return sum(1 for node in nodes if not node["is_head_node"])

    before = workers()
    python_bin = os.path.dirname(sys.executable)
    command = [os.path.join(python_bin, "ray"), "start", "--block",
               f"--address=127.0.0.1:{head_port}", f"--num-cpus={num_cpus}",
               f"--resources={json.dumps(resources or {})}",
               f"--dashboard-agent-listen-port={agent_port}", f"--temp-dir={temp_dir(directory)}",
               "--disable-usage-stats"]
    child_env = {**os.environ, **auth,
                 "PATH": f"{python_bin}{os.pathsep}{os.environ.get('PATH', '')}", **(env or {})}

    def joined() -> bool:
        try:
            return workers() > before
        except OSError:
            return False

    launch(command, os.path.join(directory, "ray.out"), _pid_file(directory), joined, timeout,
           whole_group=False, env=child_env)


def stop(directory: str = DEFAULT_DIR, timeout: float = 30) -> bool:
    """Stop the head that ``start`` recorded in ``directory``; True if one was running."""
    directory = os.path.abspath(directory)
    return stop_recorded(_pid_file(directory), whole_group=False)  # `ray start --block` ends what it started


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["start", "stop", "env"])
    parser.add_argument("--dir", default=os.environ.get("COVIDRAY_RAY_DIR", DEFAULT_DIR))
    for name in PORTS:
        parser.add_argument(f"--{name.replace('_', '-')}", type=int,
                            default=configured_port(name), help=f"{PORTS[name][0]} "
                            f"(default: ${PORTS[name][1]}, else {PORTS[name][2]})")
    parser.add_argument("--num-cpus", type=int, default=None,
                        help="logical CPUs to advertise (default: the machine's, at least 2)")
    args = parser.parse_args(argv)
    if args.action == "start":
        address = start(args.dir, args.port, args.dashboard_port, args.num_cpus,
                        client_port=args.client_port, agent_port=args.agent_port)
        print(f"Ray head ready; submit jobs with --address {address}", file=sys.stderr)
    elif args.action == "stop":
        print("stopped" if stop(args.dir) else "not running", file=sys.stderr)
    else:
        for key, value in token_env(args.dir).items():
            print(f"export {key}={value}")


if __name__ == "__main__":
    main()
