"""Storage against the real SeaweedFS server: round trips and fail-fast messages."""

import os
import pickle
import subprocess
import sys

import pytest

from covidray.storage import Location, Storage, StorageError, StorageSettings

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


def test_pickled_storage_carries_resolved_credentials(storage, prefix, s3_env, monkeypatch):
    storage.write_bytes(f"{prefix}/p.txt", b"hello")
    clone = pickle.loads(pickle.dumps(storage))
    # A worker without any AWS configuration can still read.
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    assert clone.read_bytes(f"{prefix}/p.txt") == b"hello"


def test_check_passes_for_a_writable_bucket(storage, prefix):
    storage.check(prefix, writable=True)


def test_wrong_endpoint_fails_fast_naming_the_setting(s3_env):
    dead = Storage(StorageSettings(endpoint_url=f"http://127.0.0.1:{free_port()}"))
    with pytest.raises(StorageError, match="cannot reach the S3 endpoint .*AWS_ENDPOINT_URL"):
        dead.check(f"s3://{BUCKET}/x")


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
