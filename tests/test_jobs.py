"""`ray job submit` against a real `ray start --head` cluster runs every stage."""

import asyncio
import time

import pytest

import ray_head
from covidray.layout import RunLayout, ScoreLayout

from conftest import BUCKET, REPO, free_port

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory, s3_env):
    directory = str(tmp_path_factory.mktemp("ray-head"))
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
                                        "--epochs 1 --weights none",
                           {k: s3_env[k] for k in LOCATIONS_ONLY})
    assert "covidray demo summary" in logs
    run, scores = f"{workdir}/run", f"{workdir}/scores/test"
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


def test_score_job_with_wrong_credentials_fails_with_a_clear_message(ray_cluster, s3_env):
    from ray.job_submission import JobStatus

    env = {**s3_env, "AWS_SECRET_ACCESS_KEY": "wrong"}
    status, logs = run_job(
        ray_cluster, f"python jobs/score.py --archive s3://{BUCKET}/x --model s3://{BUCKET}/m.onnx "
                     f"--output s3://{BUCKET}/y", env, timeout=300)
    assert status == JobStatus.FAILED
    assert "rejected the credentials" in logs
