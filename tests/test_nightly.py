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
import pyarrow as pa
import pytest

from covidray.scoring.fault_points import armed
from covidray.scoring.merge import STATE_COLUMNS, STATE_SCHEMA, ViewChange, merged_state, reconcile
from covidray.metrics import predicted_labels
from covidray.layout import RunLayout, ScoreLayout
from covidray.storage.lease import Lease, LeaseHeld, lapses_at
from covidray.stages.score import ScoreConfig, score_archive
from covidray.synthetic import encode, synthetic_xray

from conftest import REPO


def add_images(storage, root: str, names, seed: int = 0):
    rng = np.random.default_rng(seed)
    for i, name in enumerate(names):
        label = "covid" if i % 2 else "non_covid"
        storage.write_bytes(f"{root}/{label}/{name}",
                            encode(synthetic_xray(label == "covid", rng, size=(96, 96)), "png"))


def in_parts(storage, output: str) -> pd.DataFrame:
    """The predictions of every committed run part."""
    current = storage.read_json(ScoreLayout(output).current)
    return pd.concat([storage.read_parquet_dir(ScoreLayout(part).predictions)
                      for part in current["parts"]], ignore_index=True)


def cumulative(storage, output: str) -> pd.DataFrame:
    """What a reader sees: the state table that ``_CURRENT.json`` names, every part of it in
    the one schema (so any Parquet reader takes the folder as one table)."""
    import pyarrow.parquet as pq

    state = storage.read_json(ScoreLayout(output).current)["state"]
    for part in storage.list_files(state, (".parquet",)):
        schema = pq.read_schema(pa.BufferReader(storage.read_bytes(part)))
        assert schema.remove_metadata() == STATE_SCHEMA
    return storage.read_parquet_dir(state)


def state_row(uri, etag="1", size=1, score=0.4, threshold=0.5, error=""):
    prediction = None if error else str(predicted_labels([score], threshold)[0])
    return (uri, etag, size, "r1", "covid", "", None if error else score, None, prediction,
            None if error else threshold, error)


def test_sorted_merges_find_new_changed_and_unlisted_objects():
    listed = [pd.DataFrame({"uri": ["a", "b", "c", "d"], "etag": ["1", "2", "3", "4"],
                            "size": [1, 2, 3, 4]})]
    done = iter([state_row("a"), state_row("b", "X", 2), state_row("bb", score=0.9),
                 state_row("d", "4", 4), state_row("z", error="truncated")])
    change = ViewChange(threshold=0.5)
    (todo, kept), = reconcile(iter(listed), done, change)
    assert todo["uri"].tolist() == ["b", "c"]  # b changed, c new
    assert [row[0] for row in kept] == ["a", "d"]
    assert (change.listed, change.previous, change.kept, change.removed) == (4, 5, 2, 2)
    assert change.rethresholded == 0 and change.changes_view  # bb and z are no longer listed

    twice = [pd.DataFrame({"uri": ["c", "c"], "etag": ["3", "3"], "size": [3, 3]}),
             pd.DataFrame({"uri": ["c", "e"], "etag": ["3", "5"], "size": [3, 5]})]
    change = ViewChange(threshold=0.3)
    out = list(reconcile(iter(twice), iter([state_row("c", "3", 3)]), change))
    assert pd.concat([t for t, _ in out])["uri"].tolist() == ["e"]  # c listed 3 times, kept once
    assert [row[0] for _, k in out for row in k] == ["c"] and change.listed == 2
    assert change.rethresholded == 1 and change.removed == 0  # scored at 0.5, the run at 0.3

    moved = dict(zip(STATE_COLUMNS, change.at_threshold(state_row("c", score=0.4))))
    assert (moved["prediction"], moved["threshold"], moved["score"]) == ("covid", 0.3, 0.4)
    failed = state_row("f", error="not an image")
    assert change.at_threshold(failed) == failed  # no score: nothing to re-apply
    # a new site card: same threshold, another map -> the probability is re-applied
    card = ViewChange(threshold=0.5, calibration={"method": "isotonic", "x": [0, 1],
                                                  "y": [0.2, 0.6]}, recalibrated=True)
    same = dict(zip(STATE_COLUMNS, card.at_threshold(state_row("c", score=0.5))))
    assert same["probability"] == pytest.approx(0.4) and card.rethresholded == 0
    merged = list(merged_state(iter([("a", 1), ("b", 1), ("d", 1)]),
                               iter([("b", 2), ("c", 2)])))
    assert merged == [("a", 1), ("b", 2), ("c", 2), ("d", 1)]


def test_a_second_nightly_run_scores_only_what_is_new_or_changed(storage, trained_run, prefix,
                                                                ray_local):
    archive, output = f"{prefix}/archive", f"{prefix}/nightly"
    model = RunLayout(trained_run["run"]).onnx
    add_images(storage, archive, [f"img-{i}.png" for i in range(6)])
    storage.write_bytes(f"{archive}/covid/broken.png", b"not a png")
    first = score_archive(ScoreConfig(archive, model, output, incremental=True), storage)
    assert (first["listed"], first["new"], first["scored"], first["failed"]) == (7, 7, 6, 1)

    add_images(storage, archive, ["img-6.png", "img-7.png"], seed=1)  # two new objects
    add_images(storage, archive, ["img-0.png"], seed=2)  # one rewritten: a new ETag
    second = score_archive(ScoreConfig(archive, model, output, incremental=True), storage)
    assert (second["listed"], second["new"], second["scored"]) == (9, 3, 3)
    part = storage.read_parquet_dir(ScoreLayout(second["predictions"].rsplit("/", 1)[0])
                                    .predictions)
    assert sorted(u.rsplit("/", 1)[-1] for u in part["uri"]) == ["img-0.png", "img-6.png",
                                                                 "img-7.png"]
    started = time.monotonic()
    third = score_archive(ScoreConfig(archive, model, output, incremental=True), storage)
    assert third["nothing_new"] and third["listed"] == 9
    assert time.monotonic() - started < 30
    current = storage.read_json(ScoreLayout(output).current)
    assert current["runs"] == [first["run"], second["run"]]  # nothing new adds no part
    parts = in_parts(storage, output)
    assert len(parts) == 9 and parts["uri"].nunique() == 8  # img-0 in both parts

    view = cumulative(storage, output).set_index("uri")  # one row per object, the latest
    assert view.index.is_unique and len(view) == 9 and view.index.is_monotonic_increasing
    rescored = part.set_index("uri")
    assert (view.loc[rescored.index, "run"] == second["run"]).all()
    assert (view.loc[rescored.index, "score"] == rescored["score"]).all()
    kept = view.drop(rescored.index)
    assert (kept["run"] == first["run"]).all()
    broken = kept.loc[f"{archive}/covid/broken.png"]
    assert np.isnan(broken["score"]) and broken["error"] and broken["label"] == "covid"
    scored = view.drop(broken.name)
    assert (scored["error"] == "").all() and scored["score"].between(0, 1).all()
    assert set(scored["prediction"]) <= {"covid", "non_covid"}


def wait_until_it_lapses(storage, lease_uri: str, timeout: float = 60) -> None:
    """Poll the lease until the time it says it lapses has passed."""
    deadline = time.monotonic() + timeout
    while (until := lapses_at(storage, lease_uri)) is not None and time.time() <= until:
        assert time.monotonic() < deadline, "the lease never lapsed"
        time.sleep(max(0.05, min(0.5, until - time.time())))


def test_a_killed_run_is_resumed_without_rescoring_or_duplicates(storage, trained_run, prefix,
                                                                 ray_local, s3_env, capsys):
    archive, output = f"{prefix}/archive", f"{prefix}/nightly"
    model = RunLayout(trained_run["run"]).onnx
    add_images(storage, archive, [f"img-{i:03d}.png" for i in range(240)])
    command = [sys.executable, "-m", "covidray.cli", "score", "--archive", archive, "--model",
               model, "--output", output, "--incremental", "--lease-seconds", "300",
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

    # The killed driver was a process of this host: its lease (300 s) is taken over at once.
    resumed = score_archive(ScoreConfig(archive, model, output, incremental=True), storage)
    assert "taking over the lease" in capsys.readouterr().out
    assert resumed["adopted"] > 0 and resumed["new"] < 240
    assert resumed["new"] + resumed["adopted"] == 240 == resumed["scored"] + resumed["failed"]
    seen = in_parts(storage, output)
    assert len(seen) == 240 and seen["uri"].is_unique  # every image once, none rescored
    assert not list(storage.list_files(layout.staging))  # the killed run's staging removed
    view = cumulative(storage, output)
    assert sorted(view["uri"]) == sorted(seen["uri"]) and (view["run"] == resumed["run"]).all()


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
    stalled.stop_renewing()  # its heartbeat stops, as if the process hung
    wait_until_it_lapses(storage, lease_uri)
    fresh = Lease(storage, lease_uri, ttl=30, what="fresh").acquire()
    assert json.loads(storage.read_bytes(lease_uri))["what"] == "fresh"
    assert not stalled.renew()  # the stalled run wakes up and finds the lease gone ...
    with pytest.raises(LeaseHeld, match=r"lost its lease .* to .*\(fresh, until"):
        stalled.check()  # ... so it publishes nothing, and says who holds it
    stalled.release()
    assert json.loads(storage.read_bytes(lease_uri))["what"] == "fresh"  # not released by it
    fresh.release()


def test_a_run_that_died_between_its_marker_and_the_cumulative_view_is_adopted(
        storage, trained_run, prefix, ray_local):
    """Its part is complete but the cumulative view never took it in: the next run adopts it
    (no rescoring), and the view then holds every object once."""
    archive, output = f"{prefix}/archive", f"{prefix}/nightly"
    model = RunLayout(trained_run["run"]).onnx
    add_images(storage, archive, [f"img-{i}.png" for i in range(4)])
    first = score_archive(ScoreConfig(archive, model, output, incremental=True), storage)
    add_images(storage, archive, ["img-4.png", "img-5.png"], seed=1)

    def dies(summary):
        raise RuntimeError("killed before _CURRENT.json moved")

    with armed("scoring.part_committed", dies):
        with pytest.raises(RuntimeError, match="killed before"):
            score_archive(ScoreConfig(archive, model, output, incremental=True), storage)
    third = score_archive(ScoreConfig(archive, model, output, incremental=True), storage)
    assert (third["new"], third["adopted"], third["scored"]) == (0, 2, 2)
    current = storage.read_json(ScoreLayout(output).current)
    assert current["runs"] == [first["run"], third["run"]]
    view = cumulative(storage, output)
    assert len(view) == 6 and view["uri"].is_unique
    assert sorted(p.rsplit("/", 1)[-1] for p in storage.list_files(ScoreLayout(output).runs)
                  if p.endswith("config.json")) == ["config.json"] * 2  # the dead part is gone


def nightly_archive(storage, trained_run, prefix):
    """Six images and a broken file under a prefix, and a nightly run over it into an output
    of its own; returns (archive, output, run), ``run(**options)`` one night."""
    archive, output = f"{prefix}/archive", f"{prefix}/nightly"
    model = RunLayout(trained_run["run"]).onnx
    add_images(storage, archive, [f"img-{i}.png" for i in range(6)])
    storage.write_bytes(f"{archive}/covid/broken.png", b"not a png")

    def night(**options):
        return score_archive(ScoreConfig(archive, model, output, incremental=True, **options),
                             storage)

    return archive, output, night


def test_the_view_follows_the_listing_and_a_new_threshold_without_rescoring(
        storage, trained_run, prefix, ray_local):
    """An object deleted from the archive leaves the view; a new threshold re-applies to
    every row (no rescoring), on a night with nothing new to score."""
    archive, output, night = nightly_archive(storage, trained_run, prefix)
    first = night(threshold=0.5)
    storage.delete(f"{archive}/non_covid/img-0.png")
    second = night(threshold=0.3)  # nothing to score, yet the view changes
    assert (second["new"], second["scored"], second["removed"], second["rethresholded"]) == \
        (0, 0, 1, 5)
    current = storage.read_json(ScoreLayout(output).current)
    assert current["runs"] == [first["run"], second["run"]] and current["objects"] == 6
    assert (current["threshold"], current["archive"]) == (0.3, archive)
    view = cumulative(storage, output).set_index("uri")
    assert sorted(u.rsplit("/", 1)[-1] for u in view.index) == \
        ["broken.png", *(f"img-{i}.png" for i in range(1, 6))]
    scored = view[view["error"] == ""]
    assert len(scored) == 5 and (scored["threshold"] == 0.3).all()
    assert (scored["prediction"] == predicted_labels(scored["score"], 0.3)).all()
    assert (scored["run"] == first["run"]).all()  # re-thresholded, not rescored
    assert len(in_parts(storage, output)) == 6  # the first run's six; the second's is empty


def test_a_listing_that_would_drop_most_of_the_view_fails_and_leaves_it(
        storage, trained_run, prefix, ray_local):
    archive, output, night = nightly_archive(storage, trained_run, prefix)
    night(threshold=0.3)
    current = storage.read_json(ScoreLayout(output).current)
    for i in range(1, 5):  # 4 of the view's 7 objects gone: more than --max-removed 0.5
        storage.delete(f"{archive}/{'covid' if i % 2 else 'non_covid'}/img-{i}.png")
    with pytest.raises(ValueError, match="4 of the 7 objects in the cumulative view are no "
                                         "longer listed"):
        night(threshold=0.3)
    assert storage.read_json(ScoreLayout(output).current) == current  # the view as it was
    with pytest.raises(ValueError, match="--max-removed 50: must be from 0 to 1"):
        night(max_removed=50)  # a count, not a share: refused before any work
    fourth = night(threshold=0.3, max_removed=1.0)  # the archive really shrank
    assert (fourth["removed"], fourth["new"]) == (4, 0)
    assert sorted(u.rsplit("/", 1)[-1] for u in cumulative(storage, output)["uri"]) == \
        ["broken.png", "img-0.png", "img-5.png"]


def test_a_run_of_another_archive_into_the_view_writes_nothing(storage, trained_run, prefix,
                                                                 ray_local):
    _, output, night = nightly_archive(storage, trained_run, prefix)
    night()
    parts = sorted(storage.list_files(ScoreLayout(output).runs))
    with pytest.raises(ValueError, match="holds the nightly view of the archive"):
        score_archive(ScoreConfig(f"{prefix}/other", RunLayout(trained_run["run"]).onnx, output,
                                  incremental=True), storage)
    assert sorted(storage.list_files(ScoreLayout(output).runs)) == parts  # nothing written


def test_a_new_views_policy_scores_what_the_old_one_skipped(storage, trained_run, prefix,
                                                             ray_local):
    _, output, night = nightly_archive(storage, trained_run, prefix)
    first = night()
    again = night(views="all")  # the policy changed: everything is scored again
    assert (again["new"], again["scored"] + again["failed"]) == (7, 7)
    assert (first["scored"], first["failed"]) == (again["scored"], again["failed"])
    assert storage.read_json(ScoreLayout(output).current)["views"] == "all"


def test_a_manifest_without_etags_still_sees_an_object_rewritten_under_its_key(
        storage, trained_run, prefix, ray_local):
    """A manifest names objects, not versions: each row's ETag and size are read from the
    object, so a rewritten one is scored again, and a missing one is not retried as new."""
    images, manifest = f"{prefix}/images", f"{prefix}/manifest.csv"
    output, model = f"{prefix}/nightly", RunLayout(trained_run["run"]).onnx
    add_images(storage, images, ["a.png", "b.png", "c.png"])
    uris = [f"{images}/non_covid/a.png", f"{images}/covid/b.png", f"{images}/non_covid/c.png",
            f"{images}/covid/gone.png"]
    storage.write_table(manifest, pd.DataFrame({"uri": uris, "label": [
        "non_covid", "covid", "non_covid", "covid"]}))
    first = score_archive(ScoreConfig(manifest, model, output, incremental=True), storage)
    assert (first["new"], first["scored"], first["failed"]) == (4, 3, 1)

    rng = np.random.default_rng(5)  # b.png rewritten under its key: the manifest is the same
    storage.write_bytes(uris[1], encode(synthetic_xray(True, rng, size=(96, 96)), "png"))
    second = score_archive(ScoreConfig(manifest, model, output, incremental=True), storage)
    assert (second["new"], second["scored"], second["failed"]) == (1, 1, 0)
    view = cumulative(storage, output).set_index("uri")
    assert view.loc[uris[1], "run"] == second["run"]
    assert (view.loc[uris[1], "etag"], view.loc[uris[1], "size"]) == storage.identity(uris[1])
    assert view.loc[uris[3], "run"] == first["run"] and view.loc[uris[3], "error"]


RECORD_ROWS = ("run.json", "whole", "nightly", "_CURRENT.json", "drift")  # the table's rows


def documented_fields() -> dict[str, set[str]]:
    """docs/outputs.md's table of a scoring run's record: row -> its fields."""
    import re

    text = open(os.path.join(REPO, "docs", "outputs.md")).read().split("<!-- run-record -->")[1]
    rows = re.findall(r"^\| (.+?) \| (.+?) \|$", text.split("\n\n")[0], re.M)[1:]
    assert len(rows) == len(RECORD_ROWS)
    return {row: set(re.findall(r"`([^`]+)`", fields))
            for row, (_, fields) in zip(RECORD_ROWS, rows)}


def test_the_run_records_hold_the_documented_fields(storage, trained_run, prefix, ray_local):
    """The JSON a whole run and a nightly run publish is what docs/outputs.md says, field for
    field, and reads back through the typed record unchanged."""
    from covidray.layout import drift_reference_beside
    from covidray.scoring.record import RunIdentity, RunSummary

    fields = documented_fields()
    archive, model = f"{prefix}/archive", RunLayout(trained_run["run"]).onnx
    add_images(storage, archive, [f"img-{i}.png" for i in range(4)])
    whole = ScoreLayout(f"{prefix}/whole")
    returned = score_archive(ScoreConfig(archive, model, whole.root), storage)
    success = storage.read_json(whole.success)
    assert set(success) == fields["whole"]
    referenced = storage.exists(drift_reference_beside(model))  # drift_json only then
    assert set(success["drift"]) == fields["drift"] - (set() if referenced else {"drift_json"})
    assert set(storage.read_json(whole.run_record)) == fields["run.json"]
    assert success == json.loads(json.dumps(returned))
    assert RunSummary.from_json(success).to_json() == success
    assert RunIdentity.from_json(storage.read_json(whole.run_record)).run == success["run"]

    nightly = ScoreLayout(f"{prefix}/nightly")
    score_archive(ScoreConfig(archive, model, nightly.root, incremental=True), storage)
    current = storage.read_json(nightly.current)
    assert set(current) == fields["_CURRENT.json"]
    part = storage.read_json(ScoreLayout(current["parts"][0]).success)
    assert set(part) == fields["whole"] | fields["nightly"]
    assert current["last_run"] == part
    assert RunSummary.from_json(part).to_json() == part


def test_a_lease_whose_holder_is_gone_is_taken_over_at_once(storage, prefix):
    """A lease left by a process of this host that no longer exists (killed, or failed with
    its storage away) does not hold the next run off until it lapses; one of a live holder
    still does."""
    import socket

    lease_uri = ScoreLayout(f"{prefix}/out").lease
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)
    dead = f"{socket.gethostname()}:{ended.stdout.strip()}:0a0a0a0a"
    storage.write_bytes(lease_uri, json.dumps({"owner": dead, "what": "night 1",
                                               "renewed_at": time.time(),
                                               "expires_at": time.time() + 3600}).encode())
    taken = Lease(storage, lease_uri, ttl=30, what="night 2").acquire()
    assert json.loads(storage.read_bytes(lease_uri))["what"] == "night 2"
    with pytest.raises(LeaseHeld, match="another run holds the lease .*night 2"):
        Lease(storage, lease_uri, ttl=30, what="night 3").acquire()  # its holder is alive
    taken.release()
    assert not storage.exists(lease_uri)
