"""Scoring rides out a storage outage within its bound, and fails without publishing beyond it.

The real SeaweedFS server of the session is stopped in the middle of a scoring run and
started again on the same data directory and port.
"""

import re
import threading
import time

import numpy as np
import pandas as pd

import pytest
import s3_server
from covidray.layout import RunLayout, ScoreLayout
from covidray.scoring.fault_points import armed
from covidray.stages.score import ScoreConfig, score_archive
from covidray.storage import Storage, StorageOutage, StorageSettings
from covidray.synthetic import encode, synthetic_xray


def small_archive(storage, root: str, n: int) -> str:
    rng = np.random.default_rng(3)
    images = [encode(synthetic_xray(i % 2 == 1, rng, size=(96, 96)), "png") for i in range(8)]
    rows = []
    for i in range(n):
        uri = storage.write_bytes(f"{root}/img-{i:04d}.png", images[i % len(images)])
        rows.append({"uri": uri, "label": "covid" if i % 2 else "non_covid"})
    return storage.write_table(f"{root}/manifest.csv", pd.DataFrame(rows))


def outage_at_the_first_part(s3_service, down_for: float) -> threading.Thread:
    """A thread, not yet started, that the run starts at its first written result part (a
    fault point): the S3 server stops there, mid-run, for ``down_for`` seconds (then starts
    again on the same directory and port)."""
    def run():
        time.sleep(down_for)
        s3_server.start(s3_service["directory"], s3_service["port"])

    return threading.Thread(target=run, daemon=True)


def score_through_an_outage(storage, run, prefix, s3_service, down_for: float, bound: float):
    """Score 400 images while the S3 server is down for ``down_for`` seconds from the run's
    first result part on, riding out outages up to ``bound`` seconds; returns (output, the
    summary or the exception)."""
    manifest = small_archive(storage, f"{prefix}/archive", 400)
    output = f"{prefix}/out"
    restart = outage_at_the_first_part(s3_service, down_for)

    def the_server_stops(part):
        if restart.ident is None:  # the first part only
            s3_server.stop(s3_service["directory"])
            restart.start()

    bounded = Storage(StorageSettings(endpoint_url=storage.settings.endpoint_url,
                                      outage_seconds=bound))
    with armed("scoring.part_written", the_server_stops):
        try:
            result = score_archive(ScoreConfig(manifest, RunLayout(run).onnx, output,
                                               batch_size=16, progress_seconds=0.5), bounded)
        except Exception as exc:
            result = exc
    assert restart.ident is not None, "the run wrote no part before it ended"
    restart.join(timeout=60)
    assert not restart.is_alive()
    return output, result


def kill_processes_when(pattern: str, ready, settle: float = 0.0, timeout: float = 300):
    """A thread that SIGKILLs every process whose command line matches ``pattern`` once
    ``ready()`` holds (and ``settle`` seconds more); ``thread.killed`` lists the PIDs."""
    import os
    import signal
    import subprocess

    killed: list[str] = []

    def run():
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not killed:
            found = subprocess.run(["pgrep", "-f", pattern], capture_output=True,
                                   text=True).stdout.split()
            if found and ready():
                time.sleep(settle)
                for pid in found:
                    os.kill(int(pid), signal.SIGKILL)
                killed.extend(found)
            time.sleep(0.2)

    thread = threading.Thread(target=run, daemon=True)
    thread.killed = killed
    thread.start()
    return thread


def test_an_s3_restart_mid_run_is_ridden_out_and_every_image_is_scored(
        storage, trained_run, prefix, ray_local, s3_service):
    output, summary = score_through_an_outage(storage, trained_run["run"], prefix, s3_service,
                                              down_for=6.0, bound=60)
    assert (summary["listed"], summary["scored"], summary["failed"]) == (400, 400, 0)
    assert storage.read_parquet_dir(ScoreLayout(output).errors).empty


def test_an_outage_longer_than_the_bound_fails_and_leaves_the_last_result_in_place(
        storage, trained_run, prefix, ray_local, s3_service):
    layout = ScoreLayout(f"{prefix}/out")
    last_good = score_archive(ScoreConfig(small_archive(storage, f"{prefix}/earlier", 12),
                                          RunLayout(trained_run["run"]).onnx, layout.root),
                              storage)
    began = time.monotonic()
    output, failure = score_through_an_outage(storage, trained_run["run"], prefix, s3_service,
                                              down_for=15.0, bound=4)
    assert isinstance(failure, Exception), failure
    assert time.monotonic() - began < 120
    assert "kept failing for 4 s" in str(failure) or isinstance(failure, StorageOutage)
    # The failed run published nothing, and the last good result is still whole.
    assert storage.read_json(layout.success)["run"] == last_good["run"]
    assert storage.read_json(layout.config)["archive"] == last_good["archive"]
    assert len(storage.read_parquet_dir(layout.predictions)) == 12
    assert storage.read_json(layout.metrics_json)["images"] == 12


def test_a_run_that_dies_while_it_swaps_its_result_in_is_finished_by_the_next(
        storage, trained_run, prefix, ray_local, monkeypatch):
    """The old result was removed and the new one half copied when the run died (here: an
    outage past its bound in the copy). The next run into the output finishes that swap
    before anything else, so even when it then fails itself, the output holds a whole result."""
    import pytest

    model, layout = RunLayout(trained_run["run"]).onnx, ScoreLayout(f"{prefix}/out")
    score_archive(ScoreConfig(small_archive(storage, f"{prefix}/earlier", 6), model,
                              layout.root), storage)
    archive = small_archive(storage, f"{prefix}/archive", 12)
    copy_prefix = Storage.copy_prefix

    def dies_half_way(self, source, target):
        for uri in list(self.list_files(source))[:3]:
            self.copy(uri, target + uri[len(source):])
        raise StorageOutage("the server kept failing while copying (test)")

    with monkeypatch.context() as patched:
        patched.setattr(Storage, "copy_prefix", dies_half_way)
        with pytest.raises(StorageOutage):
            score_archive(ScoreConfig(archive, model, layout.root), storage)
    assert not storage.exists(layout.success)  # unpublished, half replaced
    assert Storage.copy_prefix is copy_prefix

    empty = f"{prefix}/empty"
    storage.write_table(f"{empty}/manifest.csv", pd.DataFrame({"uri": [], "label": []}))
    with pytest.raises(Exception, match="no images found"):  # the next run fails, after ...
        score_archive(ScoreConfig(f"{empty}/manifest.csv", model, layout.root), storage)
    marker = storage.read_json(layout.success)  # ... finishing the dead run's swap
    assert marker["archive"] == archive and marker["scored"] == 12 and marker["reconciled"]
    assert storage.read_json(layout.config)["archive"] == archive
    assert sorted(storage.read_parquet_dir(layout.predictions)["uri"]) == sorted(
        storage.read_table(archive)["uri"])
    assert storage.read_json(layout.metrics_json)["images"] == 12
    assert not list(storage.list_files(layout.staging))


def test_an_inference_actor_killed_mid_run_is_restarted_and_the_counts_reconcile(
        storage, trained_run, prefix, ray_local):
    """SIGKILL the onnxruntime actor's process while it scores: Ray restarts it, its batches
    are retried, and every image ends in predictions exactly once."""
    import os
    import signal
    import subprocess

    manifest = small_archive(storage, f"{prefix}/archive", 400)
    output = f"{prefix}/out"
    killed: list[str] = []

    def kill_the_actor(part):  # at the first result part: the actor has scored a batch
        if not killed:
            killed.extend(subprocess.run(["pgrep", "-f", "OnnxScorer"], capture_output=True,
                                         text=True).stdout.split())
            for pid in killed:
                os.kill(int(pid), signal.SIGKILL)

    with armed("scoring.part_written", kill_the_actor):
        summary = score_archive(ScoreConfig(manifest, RunLayout(trained_run["run"]).onnx,
                                            output, batch_size=16, progress_seconds=0.5),
                                storage)
    assert killed, "no onnxruntime actor was found to kill"
    assert (summary["listed"], summary["scored"], summary["failed"]) == (400, 400, 0)
    predictions = storage.read_parquet_dir(ScoreLayout(output).predictions)
    assert len(predictions) == 400 and predictions["uri"].is_unique


def test_training_survives_a_killed_worker_and_resumes_from_its_checkpoint(
        storage, prefix, ray_local):
    """SIGKILL the Ray Train worker after its first checkpoint: Ray Train restarts it from
    that checkpoint (FailureConfig), and the run completes every epoch exactly once."""
    import dataclasses

    from covidray.model import load_checkpoint
    from covidray.stages.train import TrainConfig, fit

    from conftest import upload_synthetic

    manifest = upload_synthetic(storage, f"{prefix}/data", 8, 8)
    config = TrainConfig(data=manifest, run=f"{prefix}/run", epochs=5, batch_size=4, lr=1e-3,
                         weights="none", train_layers="all", covid_target=0,
                         val_fraction=0.25, test_fraction=0.0, max_failures=2)
    killer = kill_processes_when("RayTrainWorker", lambda: any(
        u.endswith("checkpoint.pt") for u in storage.list_files(RunLayout(config.run).checkpoints)))
    summary = fit(dataclasses.replace(config), storage)
    killer.join(timeout=10)
    killed = killer.killed
    assert killed, "the training worker was never killed"
    history = load_checkpoint(storage, RunLayout(config.run).model_checkpoint)["history"]
    assert summary["epochs"] == 5 and [h["epoch"] for h in history] == [0, 1, 2, 3, 4]


def restarted_after(s3_service, seconds: float):
    """Stop the S3 server now; a thread starts it again ``seconds`` later (same data)."""
    s3_server.stop(s3_service["directory"])

    def run():
        time.sleep(seconds)
        s3_server.start(s3_service["directory"], s3_service["port"])

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_exists_rides_out_a_restart_of_the_server(storage, prefix, s3_service):
    uri = storage.write_bytes(f"{prefix}/there.json", b"{}")
    restart = restarted_after(s3_service, 3)
    assert storage.exists(uri)  # asked while the server is down: answered once it is back
    restart.join(timeout=60)
    assert not storage.exists(f"{prefix}/not-there.json")


def test_a_manifest_read_rides_out_a_restart_of_the_server_mid_read(storage, prefix, s3_service):
    from covidray.datasets import manifest_frames

    manifest = small_archive(storage, f"{prefix}/archive", 300)
    whole = storage.read_bytes(manifest)
    with storage.open_read(manifest, buffer_bytes=1024) as stream:  # ranged GETs of 1 KB
        first = stream.read(1500)
        restart = restarted_after(s3_service, 3)
        rest = stream.read()  # the server is down at the next ranged GET
    restart.join(timeout=60)
    assert first + rest == whole
    restart = restarted_after(s3_service, 3)
    frames = list(manifest_frames(storage, manifest, rows=64))  # opened while it is down
    restart.join(timeout=60)
    assert [len(f) for f in frames] == [64, 64, 64, 64, 44]
    assert pd.concat(frames)["uri"].tolist() == storage.read_table(manifest)["uri"].tolist()



def frozen(s3_service, seconds: float):
    """SIGSTOP the real weed server (its whole process group) for ``seconds``, in a thread:
    it accepts connections (the kernel queues them) and answers nothing, then resumes."""
    import os
    import signal

    with open(os.path.join(s3_service["directory"], "weed.pid")) as fh:
        group = os.getpgid(int(fh.read().split()[0]))

    def run():
        os.killpg(group, signal.SIGSTOP)
        try:
            time.sleep(seconds)
        finally:
            os.killpg(group, signal.SIGCONT)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_a_frozen_server_does_not_fake_a_lost_lease(storage, prefix, s3_service):
    """The renewal's first PUT lands while its answer is lost to the freeze; the retry meets
    the new ETag (412). That is this run's own lease: it is kept, not lost."""
    import json

    from covidray.storage.lease import Lease

    bounded = Storage(StorageSettings(endpoint_url=storage.settings.endpoint_url,
                                      outage_seconds=12))  # 2 s read timeouts
    lease = Lease(bounded, f"{prefix}/_LEASE.json", ttl=3, what="frozen").acquire()
    freeze = frozen(s3_service, 5)  # a renewal (every 1 s) is under way when it freezes
    freeze.join(timeout=30)
    time.sleep(4)  # renewals go on after the thaw
    assert not lease.lost
    lease.check()
    assert json.loads(storage.read_bytes(f"{prefix}/_LEASE.json"))["owner"] == lease.owner
    lease.release()
    assert not storage.exists(f"{prefix}/_LEASE.json")


def test_a_frozen_server_fails_a_request_within_about_its_bound(storage, prefix, s3_service):
    bounded = Storage(StorageSettings(endpoint_url=storage.settings.endpoint_url,
                                      outage_seconds=6))
    uri = bounded.write_bytes(f"{prefix}/x.json", b"{}")
    freeze = frozen(s3_service, 20)
    started = time.monotonic()
    try:
        with pytest.raises(StorageOutage, match="kept failing for 6 s"):
            bounded.read_bytes(uri)
        took = time.monotonic() - started
    finally:
        freeze.join(timeout=40)
    assert took < 6 * 1.5, took  # boto3's 60 s read timeout x 3 attempts came first before


def kill_the_server(s3_service) -> None:
    """SIGKILL the real weed process group, as a crash would (no clean shutdown)."""
    import os
    import signal

    from pidfile import running_pid

    pid = running_pid(os.path.join(s3_service["directory"], "weed.pid"))
    assert pid is not None
    os.killpg(pid, signal.SIGKILL)


def test_a_server_left_down_fails_the_run_within_its_bound_and_blocks_nothing_after(
        storage, trained_run, prefix, ray_local, s3_service):
    """The S3 server is SIGKILLed mid-run and stays down: the run fails within 1.5x its
    outage bound, its error names the first operation that failed and its object, and once
    the server is back the next run is not held off by the dead run's lease and leaves no
    staging behind."""
    bound = 20.0
    manifest = small_archive(storage, f"{prefix}/archive", 400)
    layout = ScoreLayout(f"{prefix}/out")
    model = RunLayout(trained_run["run"]).onnx
    killed_at: list[float] = []

    def the_server_dies(part):
        if not killed_at:
            kill_the_server(s3_service)
            killed_at.append(time.monotonic())

    bounded = Storage(StorageSettings(endpoint_url=storage.settings.endpoint_url,
                                      outage_seconds=bound))
    try:
        with armed("scoring.part_written", the_server_dies):
            with pytest.raises(StorageOutage) as failed:
                score_archive(ScoreConfig(manifest, model, layout.root, batch_size=16,
                                          progress_seconds=0.5), bounded)
        took = time.monotonic() - killed_at[0]
    finally:
        s3_server.stop(s3_service["directory"])  # reaps the killed process, clears its PID
        s3_server.start(s3_service["directory"], s3_service["port"])
    last_line = str(failed.value).strip().splitlines()[-1]
    print(f"failed {took:.1f} s after the kill: {last_line}")
    assert took <= 1.5 * bound, (took, last_line)
    # the first operation that failed, an image read or a result write, not a clean-up step
    assert f"kept failing for {bound:g} s" in last_line, last_line
    assert re.search(r"while (reading|writing) s3://\S+\.(png|parquet) ", last_line), last_line

    began = time.monotonic()
    summary = score_archive(ScoreConfig(manifest, model, layout.root, batch_size=16), storage)
    assert (summary["listed"], summary["scored"], summary["failed"]) == (400, 400, 0)
    assert time.monotonic() - began < 120  # not held off by the dead run's lease (300 s)
    assert not list(storage.list_files(layout.staging))
    assert not storage.exists(layout.lease)
