"""`covidray score` on a real local Ray instance, real S3 server and real onnxruntime: every
listed image scored or recorded as failed with its reason, manifests and keys taken
verbatim, a result published only whole, and memory bounded whatever the archive holds."""

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import confusion_matrix, roc_auc_score

from covidray.imaging.recipe import preprocess
from covidray.layout import RunLayout, ScoreLayout
from covidray.metrics import is_positive
from covidray.onnx_runtime import onnx_session
from covidray.scoring.fault_points import armed
from covidray.scoring.metrics_files import sorted_labelled_scores
from covidray.scoring.parts import RESULT_PART_ROWS
from covidray.stages.score import ScoreConfig, score_archive
from covidray.storage.location import Location, StorageError
from covidray.synthetic import encode, synthetic_xray

from conftest import bad_archive, process_tree


def test_scoring_an_archive_with_unreadable_files(storage, trained_run, prefix, ray_local):
    archive, output = f"{prefix}/archive", f"{prefix}/out"
    bad_archive(storage, archive)
    model = RunLayout(trained_run["run"]).onnx
    summary = score_archive(ScoreConfig(archive, model, output, threshold=0.5, batch_size=4),
                            storage)
    layout = ScoreLayout(output)

    assert (summary["listed"], summary["scored"], summary["failed"]) == (9, 6, 3)
    assert summary["reconciled"] and storage.read_json(layout.success)["listed"] == 9
    errors = storage.read_parquet_dir(layout.errors).set_index("uri")
    assert set(errors.index) == {f"{archive}/non_covid/truncated.jpg", f"{archive}/covid/empty.png",
                                 f"{archive}/covid/text.png"}
    assert "truncated" in errors.loc[f"{archive}/non_covid/truncated.jpg", "error"]
    assert "empty file" in errors.loc[f"{archive}/covid/empty.png", "error"]
    assert "not an image" in errors.loc[f"{archive}/covid/text.png", "error"]

    predictions = storage.read_parquet_dir(layout.predictions)
    assert len(predictions) == 6 and predictions["uri"].is_unique
    # Each score is what onnxruntime gives for the library's preprocessing of that file.
    session = onnx_session(storage.read_bytes(model))
    for row in predictions.itertuples():
        expected = session.run(["probabilities"], {"input": preprocess(storage.read_bytes(row.uri))})[0][0, 1]
        assert row.score == pytest.approx(float(expected), abs=1e-5)
        assert row.prediction == ("covid" if row.score >= 0.5 else "non_covid")

    # The published metrics agree with scikit-learn on the predictions table.
    metrics = storage.read_json(layout.metrics_json)
    targets = (predictions["label"] == "covid").astype(int).to_numpy()
    assert metrics["roc_auc"] == pytest.approx(roc_auc_score(targets, predictions["score"]), abs=1e-12)
    for row in metrics["sweep"]:
        expected = confusion_matrix(targets, is_positive(predictions["score"], row["threshold"]),
                                    labels=[0, 1])
        assert [[row["tn"], row["fp"]], [row["fn"], row["tp"]]] == expected.tolist()
    for threshold in ("0.10", "0.15", "0.20", "0.25"):
        png = storage.read_bytes(layout.confusion_png(float(threshold)))
        assert png.startswith(b"\x89PNG")
    assert storage.read_bytes(layout.histogram_png).startswith(b"\x89PNG")
    assert storage.read_bytes(layout.sweep_csv).decode().count("\n") == 102
    assert not list(storage.list_files(layout.staging))  # staging cleaned up

    # The driver's sort (up to RESULT_PART_ROWS predictions) and the Ray sort (beyond)
    # give the labelled scores in the same order.
    def in_order(scored):
        batches = list(sorted_labelled_scores(storage, layout, scored))
        return list(zip(np.concatenate([b["score"] for b in batches]),
                        np.concatenate([b["label"] for b in batches])))
    on_driver, by_ray = in_order(summary["scored"]), in_order(RESULT_PART_ROWS + 1)
    assert len(on_driver) == 6 and [s for s, _ in on_driver] == sorted(s for s, _ in on_driver)
    assert [s for s, _ in on_driver] == [s for s, _ in by_ray] and sorted(on_driver) == sorted(by_ray)


def test_manifest_archive_records_missing_objects_and_skips_metrics_without_labels(
        storage, trained_run, prefix, ray_local):
    storage.write_bytes(f"{prefix}/a.png", encode(synthetic_xray(True, np.random.default_rng(1)), "png"))
    manifest = f"{prefix}/archive.parquet"
    storage.write_table(manifest, pd.DataFrame({"uri": [f"{prefix}/a.png", f"{prefix}/gone.png"]}))
    summary = score_archive(ScoreConfig(manifest, RunLayout(trained_run["run"]).onnx,
                                        f"{prefix}/out"), storage)
    assert (summary["listed"], summary["scored"], summary["failed"]) == (2, 1, 1)
    assert "metrics" not in summary
    errors = storage.read_parquet_dir(ScoreLayout(f"{prefix}/out").errors)
    assert errors["error"].iloc[0].startswith("read failed")


def test_scoring_refuses_a_missing_model_before_any_work(storage, prefix):
    storage.write_bytes(f"{prefix}/archive/x.png", b"")
    with pytest.raises(StorageError, match="not found: run `covidray export`"):
        score_archive(ScoreConfig(f"{prefix}/archive", f"{prefix}/nope.onnx", f"{prefix}/out"),
                      storage)


def test_keys_with_question_marks_and_hashes_are_scored_from_their_own_bytes(
        storage, trained_run, prefix, ray_local):
    """'a.jpg?v=2.jpg' is its own object, never 'a.jpg' read under another name."""
    rng = np.random.default_rng(11)
    names = ["good_0.jpg", "good_0.jpg?v=2.jpg", "good_0.jpg#copy.png"]
    for i, name in enumerate(names):
        storage.write_bytes(f"{prefix}/archive/{name}",
                            encode(synthetic_xray(i % 2 == 1, rng), "png"))
    model = RunLayout(trained_run["run"]).onnx
    summary = score_archive(ScoreConfig(f"{prefix}/archive", model, f"{prefix}/out"), storage)
    assert (summary["listed"], summary["scored"]) == (3, 3)
    predictions = storage.read_parquet_dir(ScoreLayout(f"{prefix}/out").predictions)
    session = onnx_session(storage.read_bytes(model))
    assert sorted(predictions["uri"]) == sorted(f"{prefix}/archive/{n}" for n in names)
    for row in predictions.itertuples():
        own = session.run(["probabilities"], {"input": preprocess(storage.read_bytes(row.uri))})
        assert row.score == pytest.approx(float(own[0][0, 1]), abs=1e-6)
    assert predictions["score"].nunique() == 3  # three different images, three scores


def test_a_rerun_into_a_used_output_leaves_nothing_of_the_previous_run(
        storage, trained_run, prefix, ray_local):
    model, output = RunLayout(trained_run["run"]).onnx, f"{prefix}/out"
    labelled_archive = f"{prefix}/labelled"
    bad_archive(storage, labelled_archive)
    score_archive(ScoreConfig(labelled_archive, model, output, threshold=0.3), storage)
    assert storage.exists(ScoreLayout(output).confusion_png(0.3, operating=True))

    unlabelled = f"{prefix}/unlabelled.csv"
    storage.write_bytes(f"{prefix}/x.png", encode(synthetic_xray(True, np.random.default_rng(2)),
                                                  "png"))
    storage.write_table(unlabelled, pd.DataFrame({"uri": [f"{prefix}/x.png"]}))
    summary = score_archive(ScoreConfig(unlabelled, model, output), storage)
    layout = ScoreLayout(output)
    assert "metrics" not in summary
    assert list(storage.list_files(layout.metrics)) == []  # no metrics of the old archive
    assert len(storage.read_parquet_dir(layout.predictions)) == 1
    assert storage.read_parquet_dir(layout.errors).empty
    assert storage.read_json(layout.success)["listed"] == 1
    assert storage.read_json(layout.config)["archive"] == unlabelled


def test_a_partly_labelled_manifest_is_scored_whole_and_measured_on_its_labels(
        storage, trained_run, prefix, ray_local):
    # A missing label must reach the result blocks as None (pd.NA once broke them).
    rng = np.random.default_rng(3)
    uris = [f"{prefix}/img-{i}.png" for i in range(6)]
    for i, uri in enumerate(uris):
        storage.write_bytes(uri, encode(synthetic_xray(i % 2 == 1, rng), "png"))
    labels = ["covid", "non_covid", None, "covid", None, "non_covid"]
    manifest = storage.write_table(f"{prefix}/manifest.csv",
                                   pd.DataFrame({"uri": uris, "label": labels}))
    output = f"{prefix}/out"
    summary = score_archive(ScoreConfig(manifest, RunLayout(trained_run["run"]).onnx, output,
                                        threshold=0.5), storage)
    assert (summary["listed"], summary["scored"], summary["failed"]) == (6, 6, 0)
    predictions = storage.read_parquet_dir(ScoreLayout(output).predictions)
    got = predictions.set_index("uri")["label"]
    assert got.dropna().to_dict() == {u: label for u, label in zip(uris, labels) if label}
    assert sorted(got[got.isna()].index) == [uris[2], uris[4]]
    metrics = storage.read_json(ScoreLayout(output).metrics_json)
    assert (metrics["images"], metrics["covid"]) == (4, 2)  # the labelled rows only


def test_an_output_inside_the_archive_prefix_is_refused_before_anything_is_written(
        storage, trained_run, prefix):
    """The next run would list this one's figures (PNGs) as X-rays."""
    import ray

    archive = f"{prefix}/archive"
    bad_archive(storage, archive)
    listed = sorted(storage.list_files(prefix))
    connected = ray.is_initialized()
    for output in (archive, f"{archive}/scores"):
        with pytest.raises(ValueError, match=r"is inside --archive .* outside the archive"):
            score_archive(ScoreConfig(archive, RunLayout(trained_run["run"]).onnx, output),
                          storage)
    assert ray.is_initialized() == connected and sorted(storage.list_files(prefix)) == listed
    assert Location.parse(f"{prefix}/arch").contains(Location.parse(f"{prefix}/arch/x"))
    assert not Location.parse(f"{prefix}/arch").contains(Location.parse(f"{prefix}/archive"))


@pytest.mark.parametrize("rows,reason", [
    ({"uri": ["/etc/passwd"]}, "local path"),
    ({"uri": [""], "label": ["covid"]}, "empty 'uri'"),
    ({"uri": ["a.png"], "label": ["pneumonia"]}, "labels outside"),
    ({"uri": ["a.png", "b.png", "a.png"]}, r"names '.*/a.png' twice \(rows 1 and 3"),
])
def test_a_bad_manifest_is_refused_before_any_cluster_work(storage, trained_run, prefix, rows,
                                                           reason):
    import ray

    manifest = storage.write_table(f"{prefix}/manifest.csv", pd.DataFrame(rows))
    connected = ray.is_initialized()
    with pytest.raises(ValueError, match=reason):
        score_archive(ScoreConfig(manifest, RunLayout(trained_run["run"]).onnx,
                                  f"{prefix}/out"), storage)
    assert ray.is_initialized() == connected  # refused before connecting to Ray
    assert not storage.exists(ScoreLayout(f"{prefix}/out").success)
    assert not list(storage.list_files(ScoreLayout(f"{prefix}/out").staging))


def test_an_unreconciled_result_is_never_published(storage, trained_run, prefix, ray_local):
    archive = f"{prefix}/archive"
    bad_archive(storage, archive)

    def losing_one(counts):  # as if one result went missing on the way
        counts.scored -= 1

    with armed("scoring.results_counted", losing_one):
        with pytest.raises(RuntimeError, match="not published: listed 9"):
            score_archive(ScoreConfig(archive, RunLayout(trained_run["run"]).onnx,
                                      f"{prefix}/out"), storage)
    assert not storage.exists(ScoreLayout(f"{prefix}/out").success)


def test_an_archive_changed_while_the_run_is_under_way_is_scored_as_listed(
        storage, trained_run, prefix, ray_local):
    """The manifest is rewritten and objects added right after the run read its index: the
    run scores exactly the snapshot it took and reconciles against it."""
    rng = np.random.default_rng(4)
    uris = [storage.write_bytes(f"{prefix}/img-{i}.png", encode(synthetic_xray(i % 2 == 1, rng),
                                                                  "png")) for i in range(6)]
    manifest = storage.write_table(f"{prefix}/manifest.csv", pd.DataFrame({"uri": uris}))

    def the_archive_changes(archive):
        more = [storage.write_bytes(f"{prefix}/late-{i}.png", b"late") for i in range(4)]
        storage.write_table(archive, pd.DataFrame({"uri": uris[:3] + more}))

    with armed("scoring.snapshot_taken", the_archive_changes):
        summary = score_archive(ScoreConfig(manifest, RunLayout(trained_run["run"]).onnx,
                                            f"{prefix}/out"), storage)
    assert (summary["listed"], summary["scored"], summary["failed"]) == (6, 6, 0)
    predictions = storage.read_parquet_dir(ScoreLayout(f"{prefix}/out").predictions)
    assert sorted(predictions["uri"]) == sorted(uris)
    assert len(storage.read_table(manifest)) == 7  # it did change under the run


def _png_stream(width: int, height: int, bit_depth: int, row: bytes, color: int = 0) -> bytes:
    """A PNG whose every row is ``row``, compressed row by row: a small file that claims a
    large image, without ever holding that image here (``color``: PNG colour type, 0 gray,
    6 RGBA)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    compressor, body = zlib.compressobj(9), []
    for _ in range(height):
        body.append(compressor.compress(b"\0" + row))
    body.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(body))
            + chunk(b"IEND", b""))


def _worker_peak_rss(stop, peaks: dict) -> None:
    """Every 0.1 s: the RSS of each Ray worker process (``ray::...``) this test process
    started (the local Ray instance's raylet is its child, the workers the raylet's)."""
    import os

    while not stop.wait(0.1):
        for pid in process_tree(os.getpid()) - {os.getpid()}:
            statm = f"/proc/{pid}/statm"
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as fh:
                    if not fh.read(5) == b"ray::":
                        continue
                with open(statm) as fh:
                    rss = int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            except OSError:
                continue
            peaks[pid] = max(peaks.get(pid, 0), rss)


WORKER_MEMORY_CEILING = 1_500_000_000  # bytes per Ray worker, whatever the archive holds


def scored_with_worker_peaks(storage, config: ScoreConfig) -> tuple[dict, dict]:
    """``score_archive(config)`` while each Ray worker's peak RSS is sampled: (summary,
    {pid: peak bytes})."""
    import threading

    peaks, stop = {}, threading.Event()
    sampler = threading.Thread(target=_worker_peak_rss, args=(stop, peaks), daemon=True)
    sampler.start()
    try:
        return score_archive(config, storage), peaks
    finally:
        stop.set()
        sampler.join()


def test_large_and_hostile_images_score_under_a_memory_ceiling(storage, trained_run, prefix,
                                                               ray_local):
    """A 16 MP 16-bit hospital export and a 36 MP 8-bit image are scored; files whose headers
    claim 144 MP or a 1x60000 strip are refused from the header. No Ray worker's memory goes
    above the stated ceiling (before the limits, the strip alone took 3.4 GB)."""
    gradient16 = (np.linspace(0, 4095, 4000).astype(">u2")).tobytes()
    archive = f"{prefix}/archive"
    files = {"export-16bit-4000x4000.png": _png_stream(4000, 4000, 16, gradient16),
             "large-8bit-6000x6000.png": _png_stream(6000, 6000, 8, bytes(range(256)) * 23
                                                     + bytes(112)),
             "claims-144mp-16bit.png": _png_stream(12000, 12000, 16, bytes(24000)),
             "strip-1x60000.png": _png_stream(60000, 1, 8, bytes(60000))}
    for name, data in files.items():
        assert len(data) < 2_000_000, (name, len(data))  # small files, large claims
        storage.write_bytes(f"{archive}/{name}", data)
    summary, peaks = scored_with_worker_peaks(storage, ScoreConfig(
        archive, RunLayout(trained_run["run"]).onnx, f"{prefix}/out", threshold=0.5,
        batch_size=4))
    assert (summary["listed"], summary["scored"], summary["failed"]) == (4, 2, 2)
    errors = storage.read_parquet_dir(ScoreLayout(f"{prefix}/out").errors).set_index("uri")
    assert "image too large: 12000x12000" in errors.loc[f"{archive}/claims-144mp-16bit.png", "error"]
    assert "aspect ratio" in errors.loc[f"{archive}/strip-1x60000.png", "error"]
    assert peaks and max(peaks.values()) < WORKER_MEMORY_CEILING, sorted(peaks.values())[-3:]


def test_rgba_and_32_bit_images_decode_under_the_memory_ceiling(storage, trained_run, prefix,
                                                              ray_local):
    """One batch of four 6300x6300 RGBA PNGs and four 32-bit TIFFs of that size (under the
    40 MP limit): every image is scored and no Ray worker goes above the stated ceiling (an
    RGBA decode used to hold four copies of the image: 1.33-1.67 GB with such a batch, 1.60 GB
    with the TIFFs)."""
    import io

    from PIL import Image

    side, archive = 6300, f"{prefix}/large"
    rgba_row = bytes(range(256)) * (side * 4 // 256) + bytes(side * 4 % 256)
    gradient = Image.fromarray(np.broadcast_to(np.arange(side, dtype=np.int32) * 300_000,
                                               (side, side)).copy(), "I")
    tiff = io.BytesIO()
    gradient.save(tiff, format="TIFF", compression="tiff_deflate")
    del gradient
    for i in range(4):
        storage.write_bytes(f"{archive}/rgba-{i}.png", _png_stream(side, side, 8, rgba_row, 6))
        storage.write_bytes(f"{archive}/int32-{i}.tif", tiff.getvalue())
    summary, peaks = scored_with_worker_peaks(storage, ScoreConfig(
        archive, RunLayout(trained_run["run"]).onnx, f"{prefix}/out", threshold=0.5,
        batch_size=8))
    assert (summary["listed"], summary["scored"], summary["failed"]) == (8, 8, 0)
    assert peaks and max(peaks.values()) < WORKER_MEMORY_CEILING, sorted(peaks.values())[-3:]
    print("largest worker peak (MB):", max(peaks.values()) // 1_000_000)


def test_manifest_keys_are_taken_verbatim_a_leading_space_included(storage, trained_run, prefix,
                                                                    ray_local):
    """' lead.png' and 'lead.png' are two S3 keys: each is scored as itself, once."""
    rng = np.random.default_rng(21)
    spaced = storage.write_bytes(f"{prefix}/ lead.png", encode(synthetic_xray(True, rng), "png"))
    plain = storage.write_bytes(f"{prefix}/lead.png", encode(synthetic_xray(False, rng), "png"))
    manifest = storage.write_table(f"{prefix}/manifest.csv",
                                   pd.DataFrame({"file": [" lead.png", "lead.png"]}))
    summary = score_archive(ScoreConfig(manifest, RunLayout(trained_run["run"]).onnx,
                                        f"{prefix}/out"), storage)
    assert (summary["listed"], summary["scored"]) == (2, 2)
    predictions = storage.read_parquet_dir(ScoreLayout(f"{prefix}/out").predictions)
    assert sorted(predictions["uri"]) == sorted([spaced, plain])
    assert predictions.set_index("uri")["etag"].to_dict() == {
        uri: storage.identity(uri)[0] for uri in (spaced, plain)}


EDGE_KEYS = [" lead.png", "lead.png", "trail.png ", "trail.png", "in  side.png", "UPPER.PNG",
             "q?v=2.png", "h#copy.png"]  # all legal S3 keys, each its own object


def test_a_prefix_listing_keeps_every_key_as_s3_returns_it(storage, trained_run, prefix,
                                                           ray_local):
    """Leading, trailing and inner spaces, case, '?' and '#': listed is what ListObjectsV2
    returns for the prefix, and every one of those objects is scored from its own bytes."""
    import boto3

    rng = np.random.default_rng(23)
    archive = f"{prefix}/edge"
    written = [storage.write_bytes(f"{archive}/{key}", encode(
        synthetic_xray(bool(i % 2), rng, size=(64, 64)), "png")) for i, key in enumerate(EDGE_KEYS)]
    location = Location.parse(archive)
    client = boto3.client("s3", endpoint_url=storage.settings.endpoint_url)
    returned = client.list_objects_v2(Bucket=location.bucket, Prefix=location.key + "/")
    assert len(returned["Contents"]) == len(EDGE_KEYS)
    summary = score_archive(ScoreConfig(archive, RunLayout(trained_run["run"]).onnx,
                                        f"{prefix}/out"), storage)
    assert (summary["listed"], summary["scored"], summary["failed"]) == (len(EDGE_KEYS),) * 2 + (0,)
    predictions = storage.read_parquet_dir(ScoreLayout(f"{prefix}/out").predictions)
    assert sorted(predictions["uri"]) == sorted(written)
    assert predictions.set_index("uri")["etag"].to_dict() == {
        uri: storage.identity(uri)[0] for uri in written}


def test_an_object_rewritten_during_the_run_is_recorded_with_the_etag_of_the_bytes_scored(
        storage, trained_run, prefix, ray_local):
    rng = np.random.default_rng(22)
    archive = f"{prefix}/archive"
    for i in range(6):
        storage.write_bytes(f"{archive}/img-{i}.png", encode(synthetic_xray(i % 2 == 0, rng), "png"))
    rewritten = [f"{archive}/img-1.png", f"{archive}/img-4.png"]

    def rewrite(archive):  # after the listing, before any image is read
        for uri in rewritten:
            storage.write_bytes(uri, encode(synthetic_xray(True, rng, size=(200, 240)), "png"))

    with armed("scoring.snapshot_taken", rewrite):
        summary = score_archive(ScoreConfig(archive, RunLayout(trained_run["run"]).onnx,
                                            f"{prefix}/out"), storage)
    assert summary["changed_since_listing"] == 2
    assert sorted(summary["changed_examples"]) == sorted(rewritten)
    predictions = storage.read_parquet_dir(ScoreLayout(f"{prefix}/out").predictions)
    for uri, etag, size in predictions[["uri", "etag", "size"]].itertuples(index=False):
        assert (etag, size) == storage.identity(uri), uri  # what was read, not what was listed
    assert set(predictions.loc[predictions["width"] == 200, "uri"]) == set(rewritten)
