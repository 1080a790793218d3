"""Nightly (incremental) scoring on the real SeaweedFS and Ray: only new objects are scored,
a killed run is resumed without rescoring or duplicates, and one lease keeps two runs apart."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

from covidray.incremental import merged_state, not_yet_scored
from covidray.layout import RunLayout, ScoreLayout
from covidray.lease import Lease, LeaseHeld
from covidray.stages.score import ScoreConfig, score_archive
from covidray.synthetic import encode, synthetic_xray

from conftest import REPO


def add_images(storage, root: str, names, seed: int = 0):
    rng = np.random.default_rng(seed)
    for i, name in enumerate(names):
        label = "covid" if i % 2 else "non_covid"
        storage.write_bytes(f"{root}/{label}/{name}",
                            encode(synthetic_xray(label == "covid", rng, size=(96, 96)), "png"))


def cumulative(storage, output: str) -> pd.DataFrame:
    """What a reader sees: the predictions of every committed run part."""
    current = storage.read_json(ScoreLayout(output).current)
    return pd.concat([storage.read_parquet_dir(ScoreLayout(part).predictions)
                      for part in current["parts"]], ignore_index=True)


def test_sorted_merges_find_new_and_changed_objects():
    listed = [pd.DataFrame({"uri": ["a", "b", "c", "d"], "etag": ["1", "2", "3", "4"],
                            "size": [1, 2, 3, 4]})]
    done = iter([("a", "1", 1, "r1"), ("b", "X", 2, "r1"), ("d", "4", 4, "r1")])
    todo = pd.concat(list(not_yet_scored(iter(listed), done)))
    assert todo["uri"].tolist() == ["b", "c"]  # b changed, c new
    merged = list(merged_state(iter([("a", 1), ("b", 1), ("d", 1)]),
                               iter([("b", 2), ("c", 2)])))
    assert merged == [("a", 1), ("b", 2), ("c", 2), ("d", 1)]


def test_a_second_nightly_run_scores_only_what_is_new_or_changed(storage, trained_run, prefix,
                                                                ray_local):
    archive, output = f"{prefix}/archive", f"{prefix}/nightly"
    model = RunLayout(trained_run["run"]).onnx
    add_images(storage, archive, [f"img-{i}.png" for i in range(6)])
    first = score_archive(ScoreConfig(archive, model, output, incremental=True), storage)
    assert (first["listed"], first["new"], first["scored"]) == (6, 6, 6)

    add_images(storage, archive, ["img-6.png", "img-7.png"], seed=1)  # two new objects
    add_images(storage, archive, ["img-0.png"], seed=2)  # one rewritten: a new ETag
    second = score_archive(ScoreConfig(archive, model, output, incremental=True), storage)
    assert (second["listed"], second["new"], second["scored"]) == (8, 3, 3)
    part = storage.read_parquet_dir(ScoreLayout(second["predictions"].rsplit("/", 1)[0])
                                    .predictions)
    assert sorted(u.rsplit("/", 1)[-1] for u in part["uri"]) == ["img-0.png", "img-6.png",
                                                                 "img-7.png"]
    started = time.monotonic()
    third = score_archive(ScoreConfig(archive, model, output, incremental=True), storage)
    assert third["nothing_new"] and third["listed"] == 8
    assert time.monotonic() - started < 30
    current = storage.read_json(ScoreLayout(output).current)
    assert len(current["runs"]) == 2  # a run with nothing new adds no part
    seen = cumulative(storage, output)
    assert len(seen) == 9 and seen["uri"].nunique() == 8  # img-0 in both parts, new ETag last
    state = storage.read_parquet_dir(current["state"])
    assert state["uri"].is_unique and len(state) == 8 and state["uri"].is_monotonic_increasing


def test_a_killed_run_is_resumed_without_rescoring_or_duplicates(storage, trained_run, prefix,
                                                                 ray_local, s3_env):
    archive, output = f"{prefix}/archive", f"{prefix}/nightly"
    model = RunLayout(trained_run["run"]).onnx
    add_images(storage, archive, [f"img-{i:03d}.png" for i in range(240)])
    command = [sys.executable, "-m", "covidray.cli", "score", "--archive", archive, "--model",
               model, "--output", output, "--incremental", "--lease-seconds", "6",
               "--progress-seconds", "1", "--batch-size", "8"]
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    driver = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    layout = ScoreLayout(output)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:  # kill it once some results are durably written
        written = [u for u in storage.list_files(layout.runs, (".parquet",))
                   if "/predictions/" in u]
        if written or driver.poll() is not None:
            break
        time.sleep(0.5)
    assert driver.poll() is None, driver.stdout.read()[-3000:]
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    assert not storage.exists(layout.current)

    with pytest.raises(LeaseHeld, match="another run holds the lease"):
        score_archive(ScoreConfig(archive, model, output, incremental=True), storage)
    time.sleep(7)  # the killed run's lease lapses
    resumed = score_archive(ScoreConfig(archive, model, output, incremental=True), storage)
    assert resumed["adopted"] > 0 and resumed["new"] < 240
    assert resumed["new"] + resumed["adopted"] == 240 == resumed["scored"] + resumed["failed"]
    seen = cumulative(storage, output)
    assert len(seen) == 240 and seen["uri"].is_unique  # every image once, none rescored


def test_a_second_run_while_one_holds_the_lease_exits_with_a_clear_message(storage, prefix):
    lease_uri = ScoreLayout(f"{prefix}/out").lease
    with Lease(storage, lease_uri, ttl=30, what="night 1"):
        with pytest.raises(LeaseHeld, match=r"another run holds the lease .*night 1"):
            Lease(storage, lease_uri, ttl=30, what="night 2").acquire()
    assert not storage.exists(lease_uri)  # released
    second = Lease(storage, lease_uri, ttl=30, what="night 2").acquire()
    second.release()


def test_an_expired_lease_is_taken_over_and_its_old_holder_notices(storage, prefix):
    lease_uri = ScoreLayout(f"{prefix}/out").lease
    stalled = Lease(storage, lease_uri, ttl=2, what="stalled")
    stalled.acquire()
    stalled._stop.set()  # its heartbeat stops, as if the process hung
    time.sleep(2.5)
    fresh = Lease(storage, lease_uri, ttl=30, what="fresh").acquire()
    assert json.loads(storage.read_bytes(lease_uri))["what"] == "fresh"
    assert not stalled.renew()  # the stalled run wakes up and finds the lease gone ...
    with pytest.raises(LeaseHeld, match="lost its lease"):
        stalled.check()  # ... so it publishes nothing
    stalled.release()
    assert json.loads(storage.read_bytes(lease_uri))["what"] == "fresh"  # not released by it
    fresh.release()
