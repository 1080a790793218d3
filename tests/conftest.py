"""Shared fixtures: a real SeaweedFS S3 server, a real local Ray instance, a trained run.

Nothing here is mocked. The S3 server runs on a free port in a temporary directory
(so a developer's own server on 8333 is untouched); tests share one bucket and each
writes under its own prefix.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import uuid

import pytest

os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "infra", "local"))

import ray_head  # noqa: E402
import s3_server  # noqa: E402

# Every Ray instance the tests start (ray.init, `ray start`) asks for a token, as the local
# head of infra/local does: one token file (0600) for the session, found through the env.
os.environ.update(ray_head.token_env(tempfile.mkdtemp(prefix="covidray-ray-auth-")))

from covidray.storage import Storage, StorageSettings  # noqa: E402

BUCKET = "covidray-test"
# The real X-rays beside the clone (never committed); COVIDRAY_REAL_XRAYS points elsewhere.
SHARED_CXR = os.environ.get("COVIDRAY_REAL_XRAYS",
                            os.path.join(os.path.dirname(REPO), "shared", "data", "cxr"))


def process_tree(root: int) -> set[int]:
    """``root`` and every process below it, read from /proc (ones that exit meanwhile are
    skipped)."""
    import glob

    pids, todo = {root}, [root]
    while todo:
        for children in glob.glob(f"/proc/{todo.pop()}/task/*/children"):
            try:
                with open(children) as fh:
                    found = {int(child) for child in fh.read().split()}
            except OSError:
                continue
            todo += found - pids
            pids |= found
    return pids


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_service(tmp_path_factory):
    """Where the session's SeaweedFS server keeps its data, and its port (fault tests stop
    and restart it there)."""
    return {"directory": str(tmp_path_factory.mktemp("s3")), "port": s3_server.free_port()}


@pytest.fixture(scope="session")
def s3_env(s3_service):
    """A running SeaweedFS S3 server; its client variables are exported to this process."""
    directory = s3_service["directory"]
    env = s3_server.start(directory, s3_service["port"])
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
    return storage.write_table(manifest, pd.DataFrame(rows))


@pytest.fixture(scope="session")
def trained_run(storage, ray_local):
    """A run trained for 2 epochs on synthetic data and exported: the shared model under test."""
    from covidray.stages.export import ExportConfig, export_run
    from covidray.stages.train import TrainConfig, fit

    root = f"s3://{BUCKET}/session-run-{uuid.uuid4().hex[:8]}"
    manifest = upload_synthetic(storage, f"{root}/data", 16, 16)
    config = TrainConfig(data=manifest, run=f"{root}/run", epochs=2, batch_size=8, lr=1e-3,
                         weights="none", covid_target=20, val_fraction=0.25, test_fraction=0.25)
    summary = fit(config, storage)
    report = export_run(ExportConfig(run=config.run), storage)
    return {"root": root, "manifest": manifest, "run": config.run, "config": config,
            "train": summary, "export": report}


def bad_archive(storage, root):
    """A labelled prefix archive with a truncated JPEG, an empty file and a text '.png'."""
    import numpy as np

    from covidray.synthetic import encode, synthetic_xray

    rng = np.random.default_rng(5)
    for i in range(6):
        label = "covid" if i % 2 else "non_covid"
        storage.write_bytes(f"{root}/{label}/img-{i}.{'png' if i % 3 else 'jpg'}",
                            encode(synthetic_xray(label == "covid", rng), "png" if i % 3 else "jpg"))
    good_jpeg = encode(synthetic_xray(False, rng), "jpg")
    storage.write_bytes(f"{root}/non_covid/truncated.jpg", good_jpeg[: len(good_jpeg) // 2])
    storage.write_bytes(f"{root}/covid/empty.png", b"")
    storage.write_bytes(f"{root}/covid/text.png", b"not an image at all")
    storage.write_bytes(f"{root}/README.txt", b"not listed: not an image suffix")


def in_a_browser(page: bytes, tmp_path) -> dict:
    """An HTML page opened in headless Chromium (Debian's; ``.ci/run`` installs it; the test
    skips where there is none, except in CI): its tables (header, rows), its figures (loaded,
    caption), how many ``<pre>`` blocks, and its visible text."""
    import shutil

    browser_path = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser_path is None:
        assert os.environ.get("CI") != "true", "CI installs chromium: .ci/run"
        pytest.skip("no chromium here (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    page_file = tmp_path / "page.html"
    page_file.write_bytes(page)
    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=browser_path,
                                         args=["--no-sandbox", "--disable-gpu"])
        tab = browser.new_page()
        tab.goto(page_file.as_uri())
        shown = tab.evaluate("""() => ({
            tables: [...document.querySelectorAll('table')].map(t => ({
                header: [...t.querySelectorAll('thead th')].map(c => c.textContent),
                rows: [...t.querySelectorAll('tbody tr')].map(
                    r => [...r.querySelectorAll('td')].map(c => c.textContent))})),
            images: [...document.querySelectorAll('figure img')].map(i => ({
                loaded: i.complete && i.naturalWidth > 0,
                caption: i.parentElement.querySelector('figcaption').textContent})),
            pre: document.querySelectorAll('pre').length,
            text: document.body.innerText})""")
        browser.close()
    return shown
