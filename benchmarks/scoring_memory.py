"""Scoring memory: peak RSS of the driver and of the Ray workers, 10,000 vs 100,000 objects.

    python benchmarks/scoring_memory.py [--small 10000] [--large 100000]

Starts its own SeaweedFS server, uploads ``--large`` small X-ray-like PNGs (16 distinct
images repeated under distinct keys, in ten folders: the first folder is the small
archive), and scores each archive with ``covidray score`` in a fresh process (fresh
driver, fresh local Ray instance with every core). A sampler reads, every 0.2 s, the RSS
of the driver and of every process it started (GCS, raylet, Ray Data workers and the
onnxruntime actors). The model is a stand-in with the real input and output (3x224x224 ->
2 classes, covidray metadata): what is measured is the pipeline, whose memory must not
grow with the archive, and a ResNet18 would make the 100,000-image run take an hour here.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "infra", "local"))

import ray_head  # noqa: E402
import s3_server  # noqa: E402

BUCKET = "s3://covidray-memory"
FOLDERS = 10


def tiny_model() -> bytes:
    """An ONNX model with covidray's input, output and metadata, and almost no compute."""
    from torch import nn

    from covidray.onnx_export import export_onnx, model_metadata

    model = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2)).eval()
    return export_onnx(model, model_metadata(0.5, "none (memory benchmark stand-in)", {}, 0))


def small_pngs(count: int = 16) -> list[bytes]:
    from PIL import Image

    from covidray.synthetic import synthetic_xray

    rng, out = np.random.default_rng(0), []
    for i in range(count):
        buffer = io.BytesIO()
        synthetic_xray(bool(i % 2), rng, size=(96, 96)).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def descendants(pid: int) -> set[int]:
    found, todo = set(), [pid]
    while todo:
        current = todo.pop()
        for children in _glob(f"/proc/{current}/task/*/children"):
            try:
                with open(children) as fh:
                    for child in fh.read().split():
                        if int(child) not in found:
                            found.add(int(child))
                            todo.append(int(child))
            except OSError:
                pass
    return found


def _glob(pattern: str) -> list[str]:
    import glob

    return glob.glob(pattern)


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def name_of(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return "?"


def measure(archive: str, model_uri: str, output: str) -> dict:
    """Score ``archive`` in this process, sampling RSS; returns the peaks."""
    from covidray.stages.score import ScoreConfig, score_archive
    from covidray.storage import Storage

    peaks: dict[str, int] = {}
    total_workers = [0]
    stop = threading.Event()

    def sample():
        while not stop.wait(0.2):
            workers = 0
            for pid in descendants(os.getpid()):
                rss, name = rss_bytes(pid), name_of(pid)
                kind = ("gcs_server" if "gcs_server" in name else "raylet" if "raylet" in name
                        else "worker" if name.startswith("ray::") else "other")
                peaks[kind] = max(peaks.get(kind, 0), rss)
                if kind == "worker":
                    workers += rss
            total_workers[0] = max(total_workers[0], workers)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.time()
    summary = score_archive(ScoreConfig(archive, model_uri, output, threshold=0.5,
                                        progress_seconds=60), Storage())
    seconds = time.time() - started
    stop.set()
    sampler.join()
    assert summary["scored"] == summary["listed"], summary
    return {"listed": summary["listed"], "seconds": round(seconds, 1),
            "driver_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "worker_peak_mb": peaks.get("worker", 0) / 2**20,
            "workers_total_peak_mb": total_workers[0] / 2**20,
            "raylet_peak_mb": peaks.get("raylet", 0) / 2**20,
            "gcs_peak_mb": peaks.get("gcs_server", 0) / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", type=int, default=10_000)
    parser.add_argument("--large", type=int, default=100_000)
    parser.add_argument("--measure", nargs=3, metavar=("ARCHIVE", "MODEL", "OUTPUT"),
                        help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return
    if args.large % FOLDERS or args.large // FOLDERS != args.small:
        raise SystemExit(f"--large must be {FOLDERS} x --small (the small archive is one folder)")

    from covidray.storage import Storage, StorageSettings

    directory = tempfile.mkdtemp(prefix="covidray-memory-")
    env = s3_server.start(directory, s3_server.free_port())
    os.environ.update(env)
    os.environ.update(ray_head.token_env(directory))
    try:
        storage = Storage(StorageSettings(endpoint_url=env["AWS_ENDPOINT_URL"]))
        storage.ensure_bucket(BUCKET)
        model_uri = storage.write_bytes(f"{BUCKET}/model/model.onnx", tiny_model())
        images = small_pngs()
        started = time.time()
        keys = [f"{BUCKET}/archive/folder-{i % FOLDERS:02d}/img-{i:06d}.png"
                for i in range(args.large)]
        with ThreadPoolExecutor(32) as pool:
            list(pool.map(lambda i: storage.write_bytes(keys[i], images[i % len(images)]),
                          range(args.large)))
        print(f"uploaded {args.large} objects in {time.time() - started:.0f} s", flush=True)
        rows = {}
        for name, archive in (("small", f"{BUCKET}/archive/folder-00"),
                              ("large", f"{BUCKET}/archive")):
            child = subprocess.run(
                [sys.executable, __file__, "--measure", archive, model_uri,
                 f"{BUCKET}/scores-{name}"], stdout=subprocess.PIPE, text=True, env=os.environ,
                timeout=7200)
            if child.returncode:
                raise SystemExit(f"measuring {name} failed (its output is above)")
            rows[name] = json.loads(child.stdout.strip().splitlines()[-1])
            print(f"{name}: {rows[name]}", flush=True)
    finally:
        s3_server.stop(directory)
    small, large = rows["small"], rows["large"]
    print(f"\n| measure | {small['listed']:,} objects | {large['listed']:,} objects | ratio |")
    print("|---|---:|---:|---:|")
    for key, label in (("driver_peak_mb", "driver peak RSS (MB)"),
                       ("worker_peak_mb", "largest worker peak RSS (MB)"),
                       ("workers_total_peak_mb", "all workers together, peak (MB)"),
                       ("raylet_peak_mb", "raylet peak RSS (MB)"),
                       ("gcs_peak_mb", "GCS peak RSS (MB)"),
                       ("seconds", "wall time (s)")):
        print(f"| {label} | {small[key]:.0f} | {large[key]:.0f} | {large[key] / small[key]:.2f}x |")


if __name__ == "__main__":
    main()
