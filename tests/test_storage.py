"""Storage against the real SeaweedFS server: round trips and fail-fast messages."""

import os
import pickle
import subprocess
import sys

import pytest

from covidray.storage.location import Location
from covidray.storage import Storage, StorageError, StorageSettings

from conftest import BUCKET, free_port


def test_location_parsing():
    s3 = Location.parse("s3://bucket/a/b/")
    assert (s3.bucket, s3.key, s3.fs_path, s3.uri) == ("bucket", "a/b", "bucket/a/b", "s3://bucket/a/b")
    assert s3.join("c", "d.png").uri == "s3://bucket/a/b/c/d.png"
    assert Location.parse("relative/dir").key == os.path.abspath("relative/dir")
    with pytest.raises(StorageError, match="no bucket"):
        Location.parse("s3:///key")
    with pytest.raises(StorageError, match="only s3://"):
        Location.parse("gs://bucket/key")


def test_keys_with_query_and_fragment_characters_are_read_exactly(storage, prefix):
    """'?' and '#' are ordinary characters of an S3 key, never a URL's query or fragment."""
    names = ["good_0.jpg", "good_0.jpg?v=2.jpg", "good_0.jpg#copy.png", "sp ace/ü.png"]
    for name in names:
        assert Location.parse(f"{prefix}/{name}").key.endswith(name)
        storage.write_bytes(f"{prefix}/{name}", name.encode())
    for name in names:
        assert storage.read_bytes(f"{prefix}/{name}") == name.encode()
    assert sorted(storage.list_files(prefix)) == sorted(f"{prefix}/{n}" for n in names)
    assert storage.copy_prefix(prefix, f"{prefix}-copy") == len(names)  # server-side copies
    for name in names:
        assert storage.read_bytes(f"{prefix}-copy/{name}") == name.encode()


def test_round_trip_list_and_delete(storage, prefix):
    for name in ("b.png", "a/c.jpg", "a/notes.txt"):
        storage.write_bytes(f"{prefix}/{name}", name.encode())
    assert storage.read_bytes(f"{prefix}/a/c.jpg") == b"a/c.jpg"
    assert list(storage.list_files(prefix, (".png", ".jpg"))) == [f"{prefix}/a/c.jpg",
                                                                  f"{prefix}/b.png"]
    assert storage.exists(f"{prefix}/b.png") and not storage.exists(f"{prefix}/zz.png")
    storage.delete(f"{prefix}/b.png")
    storage.delete(f"{prefix}/never-written.png")  # deleting what is absent is no error
    assert not storage.exists(f"{prefix}/b.png")
    assert storage.delete_prefix(prefix) == 2
    assert list(storage.list_files(prefix)) == []


def test_pyarrow_filesystem_sees_what_boto3_wrote(storage, prefix):
    storage.write_bytes(f"{prefix}/x.bin", b"12345")
    location = Location.parse(f"{prefix}/x.bin")
    with storage.filesystem(location).open_input_file(location.fs_path) as fh:
        assert fh.read() == b"12345"


def test_a_pickled_storage_carries_no_secret_and_each_process_resolves_its_own(
        storage, prefix, s3_env, monkeypatch):
    storage.write_bytes(f"{prefix}/p.txt", b"hello")
    data = pickle.dumps(storage)
    assert s3_env["AWS_SECRET_ACCESS_KEY"].encode() not in data
    assert s3_env["AWS_ACCESS_KEY_ID"].encode() not in data
    assert pickle.loads(data).read_bytes(f"{prefix}/p.txt") == b"hello"  # from this env
    # A process whose environment carries no credentials cannot read: they never travel.
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    with pytest.raises(StorageError, match="no S3 credentials found"):
        pickle.loads(data).read_bytes(f"{prefix}/p.txt")


def test_write_check_leaves_no_probe_behind(storage, prefix):
    storage.write_bytes(f"{prefix}/kept.txt", b"x")
    storage.check(prefix, writable=True)  # passes: the bucket is writable
    assert list(storage.list_files(prefix)) == [f"{prefix}/kept.txt"]  # its probe is gone


def test_check_refuses_a_missing_local_input(tmp_path):
    with pytest.raises(StorageError, match="does not exist"):
        Storage(StorageSettings()).check(str(tmp_path / "absent"))


def test_tables_round_trip_as_csv_and_parquet(storage, prefix):
    import pandas as pd

    frame = pd.DataFrame({"uri": ["s3://b/a.png", "s3://b/b.png"], "score": [0.25, 0.75]})
    for name in ("t.csv", "t.parquet", "parts/part-0.parquet"):
        storage.write_table(f"{prefix}/{name}", frame)
    for name in ("t.csv", "t.parquet"):
        pd.testing.assert_frame_equal(storage.read_table(f"{prefix}/{name}"), frame)
    storage.write_table(f"{prefix}/parts/part-1.parquet", frame.iloc[:1])
    assert storage.read_parquet_dir(f"{prefix}/parts")["uri"].tolist() == [
        "s3://b/a.png", "s3://b/b.png", "s3://b/a.png"]
    assert storage.read_parquet_dir(f"{prefix}/none", ["uri"]).empty


def test_wrong_endpoint_fails_fast_naming_the_setting(s3_env):
    dead = Storage(StorageSettings(endpoint_url=f"http://127.0.0.1:{free_port()}"))
    with pytest.raises(StorageError, match="cannot reach the S3 endpoint .*AWS_ENDPOINT_URL"):
        dead.check(f"s3://{BUCKET}/x")


def test_endpoint_without_a_scheme_says_what_to_write():
    with pytest.raises(StorageError, match="no scheme: write http://127.0.0.1:8333"):
        StorageSettings(endpoint_url="127.0.0.1:8333")


def test_a_silent_endpoint_fails_within_seconds(s3_env):
    """A server that accepts the connection but never answers (the kernel completes the
    handshake for a socket that is never accept()ed) is reported like a dead one."""
    import socket
    import time

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(StorageError, match="cannot reach the S3 endpoint"):
            Storage(StorageSettings(endpoint_url=f"http://127.0.0.1:{port}")).check(
                f"s3://{BUCKET}/x")
        assert time.monotonic() - started < 20


def test_no_repr_shows_the_secret(storage, s3_env):
    storage.client()  # credentials resolved
    assert s3_env["AWS_SECRET_ACCESS_KEY"] not in repr(storage)
    assert s3_env["AWS_SECRET_ACCESS_KEY"] not in repr(storage.settings)


def test_wrong_secret_names_the_credentials(s3_env, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    wrong = Storage(StorageSettings(endpoint_url=s3_env["AWS_ENDPOINT_URL"]))
    with pytest.raises(StorageError, match="rejected the credentials.*AWS_SECRET_ACCESS_KEY"):
        wrong.check(f"s3://{BUCKET}/x")


def test_missing_bucket_says_so(storage):
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-here' does not exist"):
        storage.check("s3://no-such-bucket-here/prefix")


def test_missing_credentials_are_reported(s3_env, monkeypatch, tmp_path):
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    with pytest.raises(StorageError, match="no S3 credentials found"):
        Storage(StorageSettings(endpoint_url=s3_env["AWS_ENDPOINT_URL"])).check(f"s3://{BUCKET}/x")


def test_local_writes_are_atomic_and_leave_no_temporary_files(tmp_path):
    storage = Storage(StorageSettings())
    target = tmp_path / "out" / "metrics.json"
    storage.write_json(str(target), {"a": 1})
    storage.write_json(str(target), {"a": 2})
    assert storage.read_json(str(target)) == {"a": 2}
    assert os.listdir(target.parent) == ["metrics.json"]


def test_cli_reports_a_wrong_endpoint_and_exits_2(s3_env, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "covidray.cli", "score", "--archive", f"s3://{BUCKET}/a",
         "--model", f"s3://{BUCKET}/m.onnx", "--output", f"s3://{BUCKET}/o",
         "--s3-endpoint", f"http://127.0.0.1:{free_port()}"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "cannot reach the S3 endpoint" in result.stderr


def test_transient_and_permanent_errors_are_told_apart(storage, prefix):
    import botocore.exceptions as bx

    from covidray.storage import is_transient

    assert is_transient(bx.EndpointConnectionError(endpoint_url="http://127.0.0.1:1"))
    assert is_transient(bx.ReadTimeoutError(endpoint_url="http://127.0.0.1:1"))
    assert is_transient(bx.ClientError({"Error": {"Code": "SlowDown"},
                                        "ResponseMetadata": {"HTTPStatusCode": 503}}, "GetObject"))
    with pytest.raises(bx.ClientError) as missing:
        storage.client().get_object(Bucket=BUCKET, Key=f"{prefix[len('s3://' + BUCKET) + 1:]}/no")
    assert not is_transient(missing.value)


def test_a_dead_endpoint_is_retried_for_the_outage_bound_then_fails(s3_env):
    import time

    from covidray.storage import StorageOutage

    dead = Storage(StorageSettings(endpoint_url=f"http://127.0.0.1:{free_port()}",
                                   outage_seconds=2))
    started = time.monotonic()
    with pytest.raises(StorageOutage, match="kept failing for 2 s"):
        dead.read_bytes(f"s3://{BUCKET}/x.png")
    assert 2 <= time.monotonic() - started < 30
