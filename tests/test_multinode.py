"""`ray job submit` to a cluster of two nodes (a head and a `ray start --address` node on
this machine, each with its own CPUs and a resource label): training places its two
workers on different nodes, scoring runs actors on both, data lives only in S3, and a
local path is refused with a message that says why."""

import os
import time

import pytest

import ray_head
from covidray.layout import RunLayout, ScoreLayout

from conftest import BUCKET, free_port, upload_synthetic
from test_jobs import run_job, submit_and_wait

pytestmark = pytest.mark.cluster

LOCATIONS_ONLY = ("AWS_ENDPOINT_URL", "AWS_REGION", "AWS_EC2_METADATA_DISABLED")


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory, s3_env):
    head, second = (str(tmp_path_factory.mktemp(name)) for name in ("head", "second-node"))
    port, dashboard_port = free_port(), free_port()
    # Each node carries the S3 credentials in its environment, as a pod does.
    address = ray_head.start(head, port=port, dashboard_port=dashboard_port, num_cpus=2,
                             client_port=free_port(), agent_port=free_port(), env=s3_env)
    try:
        ray_head.join(second, port, dashboard_port, num_cpus=2, resources={"second_node": 1},
                      env=s3_env, agent_port=free_port())
        nodes = ray_head.alive_nodes(dashboard_port, os.environ["RAY_AUTH_TOKEN_PATH"])
        yield {"address": address, "nodes": nodes}
    finally:  # both drain at once (a node takes up to 30 s)
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(2) as pool:
            list(pool.map(ray_head.stop, (second, head)))


def _actor_nodes(address: str, submission_id: str) -> set[str]:
    """The nodes on which the job's Ray Data actors ran (alive or finished)."""
    from ray.job_submission import JobSubmissionClient
    from ray.util.state import list_actors

    job_id = JobSubmissionClient(address).get_job_info(submission_id).job_id
    actors = list_actors(address=address, filters=[("job_id", "=", job_id)], limit=1000,
                         detail=True, raise_on_missing_output=False)
    return {actor.node_id for actor in actors if "MapWorker" in actor.class_name}


def test_two_nodes_train_on_both_and_score_on_both(two_nodes, storage, s3_env, tmp_path):
    from ray.job_submission import JobStatus

    assert len(two_nodes["nodes"]) == 2
    second = next(n["node_id"] for n in two_nodes["nodes"]
                  if "second_node" in n["resources_total"])
    env = {k: s3_env[k] for k in LOCATIONS_ONLY}  # locations only: no secret in the job
    root = f"s3://{BUCKET}/multinode-{int(time.time())}"
    manifest = upload_synthetic(storage, f"{root}/data", 16, 16)
    run = f"{root}/run"

    submit_and_wait(two_nodes["address"],
                    f"python jobs/protocol.py --data {manifest} --run {run} --workers 2 "
                    "--epochs 2 --batch-size 8 --lr 0.001 --weights none --covid-target 20 "
                    "--val-fraction 0.25 --test-fraction 0.25 --bootstrap 50", env)
    placement = storage.read_json(RunLayout(run).placement)
    assert sorted(worker["rank"] for worker in placement) == [0, 1]
    assert len({worker["node_id"] for worker in placement}) == 2, placement
    assert storage.exists(RunLayout(run).onnx)

    output = f"{root}/scores"
    status, logs = run_job(two_nodes["address"],
                           f"python jobs/score.py --archive {manifest} --model {RunLayout(run).onnx} "
                           f"--output {output} --actors 2", env)
    assert status == JobStatus.SUCCEEDED, logs[-4000:]
    summary = storage.read_json(ScoreLayout(output).success)
    assert summary["scored"] == summary["listed"] == 32
    from ray.job_submission import JobSubmissionClient

    jobs = JobSubmissionClient(two_nodes["address"]).list_jobs()
    scoring = max((j for j in jobs if "jobs/score.py" in j.entrypoint),
                  key=lambda j: j.start_time or 0)
    nodes = _actor_nodes(two_nodes["address"], scoring.submission_id)
    assert len(nodes) == 2 and second in nodes, nodes

    # A local path names a file on one machine: refused on a cluster of two nodes.
    local = tmp_path / "archive"
    local.mkdir()
    (local / "one.jpg").write_bytes(storage.read_bytes(next(
        uri for uri in storage.list_files(f"{root}/data") if uri.endswith((".jpg", ".png")))))
    status, logs = run_job(two_nodes["address"],
                           f"python jobs/score.py --archive {local} --model {RunLayout(run).onnx} "
                           f"--output {root}/local-scores", env, timeout=300)
    assert status == JobStatus.FAILED
    assert f"--archive {local} is a local path, but this Ray cluster has 2 nodes" in logs, logs[-3000:]
