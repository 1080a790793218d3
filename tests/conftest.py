"""Shared fixtures: a real SeaweedFS S3 server, a real local Ray instance, a trained run.

Nothing here is mocked. The S3 server runs on a free port in a temporary directory
(so a developer's own server on 8333 is untouched); tests share one bucket and each
writes under its own prefix.
"""

from __future__ import annotations

import io
import os
import socket
import sys
import uuid

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # same mode as infra/local/ray_head.py
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "infra", "local"))

import s3_server  # noqa: E402

from covidray.storage import Storage, StorageSettings  # noqa: E402

BUCKET = "covidray-test"
SHARED_CXR = os.path.join(REPO, "..", "shared", "data", "cxr")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_env(tmp_path_factory):
    """A running SeaweedFS S3 server; its client variables are exported to this process."""
    directory = str(tmp_path_factory.mktemp("s3"))
    env = s3_server.start(directory, free_port())
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env
    s3_server.stop(directory)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def storage(s3_env) -> Storage:
    st = Storage(StorageSettings(endpoint_url=s3_env["AWS_ENDPOINT_URL"], region="us-east-1"))
    st.ensure_bucket(f"s3://{BUCKET}")
    return st


@pytest.fixture
def prefix(request, storage) -> str:
    """A fresh s3:// prefix for this test."""
    return f"s3://{BUCKET}/{request.node.name[:40]}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray instance with 2 logical CPUs, like this 2-core machine."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    from covidray.cluster import quiet_data_progress

    quiet_data_progress()
    yield ray
    ray.shutdown()


def upload_synthetic(storage: Storage, data_uri: str, n_covid: int, n_non_covid: int,
                     seed: int = 0) -> str:
    """Synthetic labelled images + manifest.csv under ``data_uri``; returns the manifest URI."""
    import pandas as pd

    from covidray.synthetic import synthetic_dataset

    rows = []
    for relative, label, patient, data in synthetic_dataset(n_covid, n_non_covid, seed):
        storage.write_bytes(f"{data_uri}/{relative}", data)
        rows.append({"file": relative, "label": label, "patient_id": patient,
                     "source": f"synthetic-{label}"})
    manifest = f"{data_uri}/manifest.csv"
    storage.write_bytes(manifest, pd.DataFrame(rows).to_csv(index=False).encode())
    return manifest


@pytest.fixture(scope="session")
def trained_run(storage, ray_local):
    """A run trained for 2 epochs on synthetic data and exported: the shared model under test."""
    from covidray.export import export_run
    from covidray.train import TrainConfig, fit

    root = f"s3://{BUCKET}/session-run-{uuid.uuid4().hex[:8]}"
    manifest = upload_synthetic(storage, f"{root}/data", 16, 16)
    config = TrainConfig(data=manifest, output=f"{root}/run", epochs=2, batch_size=8, lr=1e-3,
                         weights="none", covid_target=20, val_fraction=0.25, test_fraction=0.25)
    summary = fit(config, storage)
    report = export_run(config.output, storage)
    return {"root": root, "manifest": manifest, "run": config.output, "config": config,
            "train": summary, "export": report}


def read_parquet_dir(storage: Storage, uri: str):
    import pandas as pd

    parts = [pd.read_parquet(io.BytesIO(storage.read_bytes(u)))
             for u in storage.list_files(uri, (".parquet",))]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
