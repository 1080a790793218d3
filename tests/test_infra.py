"""The KubeRay manifests only name jobs that exist, with options covidray accepts."""

import glob
import os
import shlex

import pytest
import yaml

from covidray.cli import build_parser

from conftest import REPO


def entrypoints():
    for path in sorted(glob.glob(os.path.join(REPO, "infra", "k8s", "*.yaml"))):
        with open(path) as fh:
            spec = yaml.safe_load(fh)["spec"]
        spec = spec.get("jobTemplate", spec)
        if "entrypoint" in spec:
            for command in spec["entrypoint"].split("&&"):
                yield os.path.basename(path), shlex.split(command)


@pytest.mark.parametrize("manifest,command", list(entrypoints()))
def test_manifest_entrypoint_parses(manifest, command):
    assert command[0] == "python" and command[1].startswith("/home/ray/covidray/jobs/")
    job = os.path.basename(command[1])
    assert os.path.exists(os.path.join(REPO, "jobs", job)), job
    build_parser().parse_args([job.removesuffix(".py"), *command[2:]])  # exits on a bad option


def test_every_job_has_a_manifest_or_is_local_only():
    named = {os.path.basename(c[1]) for _, c in entrypoints()}
    assert {"train.py", "export.py", "score.py"} <= named


def test_local_s3_server_restarts_on_its_data_and_keeps_secrets_private(tmp_path, monkeypatch):
    """down.sh then up.sh: the server comes back on its existing data directory."""
    import stat

    import s3_server

    from covidray.storage import Storage, StorageSettings

    from conftest import free_port

    directory = str(tmp_path / "s3")
    env = s3_server.start(directory, free_port())
    try:
        def storage():
            return Storage(StorageSettings(endpoint_url=env["AWS_ENDPOINT_URL"]))

        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            monkeypatch.setenv(key, env[key])
        storage().ensure_bucket("s3://kept")
        storage().write_bytes("s3://kept/a.txt", b"still here")
        assert s3_server.stop(directory)
        env = s3_server.start(directory, int(env["AWS_ENDPOINT_URL"].rsplit(":", 1)[1]),
                              timeout=30)
        assert storage().read_bytes("s3://kept/a.txt") == b"still here"
        for name in ("credentials.json", "s3.json"):
            mode = stat.S_IMODE(os.stat(os.path.join(directory, name)).st_mode)
            assert mode == 0o600, (name, oct(mode))
    finally:
        s3_server.stop(directory)
