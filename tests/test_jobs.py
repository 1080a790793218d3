"""`ray job submit` against a real `ray start --head` cluster runs every stage."""

import asyncio
import os
import time

import pytest

import ray_head
from covidray.backbones import get_backbone
from covidray.layout import EvalLayout, RunLayout, ScoreLayout

from conftest import BUCKET, REPO, SHARED_CXR, free_port, process_tree

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def ray_head_directory(tmp_path_factory):
    return str(tmp_path_factory.mktemp("ray-head"))


@pytest.fixture(scope="module")
def ray_cluster(ray_head_directory, s3_env):
    directory = ray_head_directory
    # Free ports throughout, so a developer's own local head can keep running beside it.
    # The node carries the S3 credentials in its environment (jobs and workers inherit them).
    address = ray_head.start(directory, port=free_port(), dashboard_port=free_port(), num_cpus=2,
                             client_port=free_port(), agent_port=free_port(), env=s3_env)
    yield address
    ray_head.stop(directory)


def run_job(address: str, entrypoint: str, env: dict, timeout: float = 600) -> tuple[str, str]:
    """Submit a job and wait until it ends (its log stream closes); returns (status, logs)."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    job = client.submit_job(entrypoint=entrypoint,
                            runtime_env={"working_dir": REPO, "env_vars": env})

    async def follow():
        async for _ in client.tail_job_logs(job):  # ends when the job reaches a final state
            pass

    try:
        asyncio.run(asyncio.wait_for(follow(), timeout))
    except TimeoutError:
        client.stop_job(job)
        raise AssertionError(f"job {job} did not finish in {timeout}s") from None
    return client.get_job_status(job), client.get_job_logs(job)


def submit_and_wait(address: str, entrypoint: str, env: dict) -> str:
    from ray.job_submission import JobStatus

    status, logs = run_job(address, entrypoint, env)
    assert status == JobStatus.SUCCEEDED, logs[-4000:]
    return logs


LOCATIONS_ONLY = ("AWS_ENDPOINT_URL", "AWS_REGION", "AWS_EC2_METADATA_DISABLED")


def test_demo_job_runs_train_export_and_score_on_a_ray_start_cluster(ray_cluster, s3_env, storage):
    """The job carries locations only; the node carries the credentials (its environment)."""
    import os
    import subprocess
    import sys

    workdir = f"s3://{BUCKET}/job-demo-{int(time.time())}"
    logs = submit_and_wait(ray_cluster, f"python jobs/demo.py --workdir {workdir} --images 24 "
                                        "--epochs 1",
                           {k: s3_env[k] for k in LOCATIONS_ONLY})
    assert "covidray demo summary" in logs
    run, scores = f"{workdir}/run", f"{workdir}/scores/test"
    # The demo's default: MobileNetV2 from its installed ImageNet file (set-up installs it).
    mobilenet = get_backbone("mobilenet_v2").imagenet
    started = storage.read_json(RunLayout(run).model_card)["starting_weights"]
    assert (started["backbone"], started["weights"]) == ("mobilenet_v2", "imagenet"), started
    assert started["sha256"] == mobilenet.sha256 and "ImageNet" in started["licence"]
    assert f"weights imagenet: {mobilenet.description}" in logs
    for artifact in (RunLayout(run).model_checkpoint, RunLayout(run).onnx,
                     ScoreLayout(scores).metrics_json, ScoreLayout(scores).sweep_csv,
                     ScoreLayout(scores).confusion_png(0.10), ScoreLayout(scores).success):
        assert storage.exists(artifact), artifact
    summary = storage.read_json(ScoreLayout(scores).success)
    assert summary["failed"] == 3 and summary["listed"] == summary["scored"] + 3
    assert len(storage.read_parquet_dir(ScoreLayout(scores).errors)) == 3

    # No secret where others can read it: the job list, the job's logs, any artifact.
    secret = s3_env["AWS_SECRET_ACCESS_KEY"]
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    listed = subprocess.run([ray_cli, "job", "list", "--address", ray_cluster],
                            capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0 and "demo.py" in listed.stdout, listed.stderr[-2000:]
    assert secret not in listed.stdout + listed.stderr
    assert secret not in logs
    artifacts = list(storage.list_files(workdir))
    assert len(artifacts) > 20
    for uri in artifacts:
        assert secret.encode() not in storage.read_bytes(uri), uri


@pytest.mark.skipif(not os.path.isfile(os.path.join(SHARED_CXR, "metadata.csv")),
                    reason=f"no real X-rays at {SHARED_CXR} (set COVIDRAY_REAL_XRAYS)")
def test_demo_job_on_real_xrays_runs_through_evaluate(ray_cluster, s3_env, storage):
    """The README's real-data demo (`infra/local/demo.sh --data ../shared/data/cxr`) on a small
    sample: real X-rays from several sources, where subgroups with every COVID image found or
    none flagged are common, through evaluate's report and forest plot to scoring."""
    workdir = f"s3://{BUCKET}/job-demo-real-{int(time.time())}"
    logs = submit_and_wait(ray_cluster, f"python jobs/demo.py --data {SHARED_CXR} --workdir "
                                        f"{workdir} --images 120 --epochs 20",
                           {k: s3_env[k] for k in LOCATIONS_ONLY})
    assert "covidray demo summary" in logs and "report " in logs
    run = RunLayout(f"{workdir}/run")
    evaluation = EvalLayout(run.eval_dir)
    report = storage.read_json(evaluation.report_file("report.json"))
    assert report["test_images"] > 0 and report["breakdown"]["source"]
    for name in ("forest.png", "roc_pr.png", "calibration.png", "audit.png"):
        assert storage.read_bytes(evaluation.report_file(name)).startswith(b"\x89PNG"), name
    assert storage.exists(run.model_card)
    assert storage.read_json(ScoreLayout(f"{workdir}/scores/test").success)["reconciled"]


def test_score_job_with_wrong_credentials_fails_with_a_clear_message(ray_cluster, s3_env):
    from ray.job_submission import JobStatus

    env = {**s3_env, "AWS_SECRET_ACCESS_KEY": "wrong"}
    status, logs = run_job(
        ray_cluster, f"python jobs/score.py --archive s3://{BUCKET}/x --model s3://{BUCKET}/m.onnx "
                     f"--output s3://{BUCKET}/y", env, timeout=300)
    assert status == JobStatus.FAILED
    assert "rejected the credentials" in logs


def _listening_sockets(root_pid: int) -> list[tuple[str, int, str]]:
    """(address, port, process name) of every TCP socket in LISTEN state held by
    ``root_pid`` or its descendants, read from /proc (IPv4 and IPv6)."""
    import glob
    import ipaddress
    import os

    owner = {}
    for pid in process_tree(root_pid):
        for fd in glob.glob(f"/proc/{pid}/fd/*"):
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                with open(f"/proc/{pid}/comm") as fh:
                    owner[target[8:-1]] = fh.read().strip()
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as fh:
            for line in fh.readlines()[1:]:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if state != "0A" or inode not in owner:  # 0A: LISTEN
                    continue
                hex_ip, hex_port = local.split(":")
                raw = bytes.fromhex(hex_ip)
                if len(raw) == 4:
                    address = ipaddress.IPv4Address(raw[::-1])
                else:  # four little-endian 32-bit words; ::ffff:a.b.c.d is IPv4 a.b.c.d
                    address = ipaddress.IPv6Address(b"".join(raw[i:i + 4][::-1]
                                                             for i in range(0, 16, 4)))
                    address = address.ipv4_mapped or address
                found.append((str(address), int(hex_port, 16), owner[inode]))
    return found


# One real method of each Ray gRPC service: a server that checks tokens answers UNAUTHENTICATED
# to the one it serves (and UNIMPLEMENTED to the others).
GRPC_PROBES = ("/ray.rpc.NodeInfoGcsService/GetClusterId", "/ray.rpc.NodeManagerService/GetNodeStats",
               "/ray.rpc.ObjectManagerService/Pull", "/ray.rpc.CoreWorkerService/NumPendingTasks",
               "/ray.rpc.ReporterService/HealthCheck", "/ray.rpc.RayletDriver/ClusterInfo")


def _refuses_without_token(host: str, port: int, secrets: list[str]) -> str:
    """How a port answers a caller without the token: 'http 401', 'grpc unauthenticated',
    or 'metrics' (a read-only Prometheus page, checked to hold no secret)."""
    import http.client
    import urllib.error
    import urllib.request

    import grpc

    try:
        with urllib.request.urlopen(f"http://{host}:{port}/", timeout=10) as response:
            body = response.read().decode(errors="replace")
        assert body.startswith("# HELP"), (port, body[:200])  # metrics, nothing else
        assert not any(secret in body for secret in secrets), port
        return "metrics"
    except urllib.error.HTTPError as refused:
        assert refused.code == 401, (port, refused.code)
        return "http 401"
    except (http.client.HTTPException, ConnectionError):
        pass  # not HTTP/1: gRPC
    channel = grpc.insecure_channel(f"{host}:{port}")
    codes = []
    for method in GRPC_PROBES:
        try:
            channel.unary_unary(method)(b"", timeout=10)
            codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as error:
            codes.append(error.code())
    channel.close()
    if set(codes) == {grpc.StatusCode.UNAVAILABLE}:
        return "unreachable"  # closed under us (a worker that exited): checked by the caller
    assert grpc.StatusCode.OK not in codes, (port, codes)
    assert grpc.StatusCode.UNAUTHENTICATED in codes, (port, codes)
    return "grpc unauthenticated"


def test_every_port_of_the_local_head_is_loopback_or_asks_for_the_token(ray_cluster, s3_env,
                                                                        ray_head_directory):
    """Ray's servers listen on the node's address whatever --node-ip-address says, so the local
    head runs with token authentication: every port its processes (and the jobs' workers) hold
    is loopback-only, or refuses a caller without the token, or is a read-only metrics page."""
    import ipaddress
    import os

    import pidfile

    sockets = _listening_sockets(pidfile.running_pid(os.path.join(ray_head_directory, "ray.pid")))
    exposed = [(a, p, name) for a, p, name in sockets if not ipaddress.ip_address(a).is_loopback]
    assert any(name == "gcs_server" for _, _, name in exposed), sockets  # the probe sees them
    with open(os.environ["RAY_AUTH_TOKEN_PATH"]) as fh:
        secrets = [s3_env["AWS_SECRET_ACCESS_KEY"], fh.read().strip()]
    answers = {}
    for address, port, name in exposed:
        ip = ipaddress.ip_address(address)
        host = "127.0.0.1" if ip.is_unspecified else f"[{ip}]" if ip.version == 6 else str(ip)
        answers[(port, name)] = _refuses_without_token(host, port, secrets)
    still = {(p, name) for _, p, name in _listening_sockets(
        pidfile.running_pid(os.path.join(ray_head_directory, "ray.pid")))}
    for key, answer in answers.items():
        assert answer != "unreachable" or key not in still, (key, answer)  # gone, not open
    assert answers[next(k for k in answers if k[1] == "gcs_server")] == "grpc unauthenticated"
    assert list(answers.values()).count("metrics") <= 3, answers
