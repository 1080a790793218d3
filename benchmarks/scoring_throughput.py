"""Scoring throughput: end to end against the bounds, in one run on one machine.

    python benchmarks/scoring_throughput.py [--jpegs 2000] [--pngs 300] [--small 40]

Starts its own SeaweedFS server (temporary directory, free port) and a local Ray instance
with every core, exports a ResNet18 (random weights: speed does not depend on them) and
prints, each measured here and now:

* the model-only bound: onnxruntime alone, batch 32, every core;
* the decode-only rate: fetch from S3 + decode + preprocess, one process;
* end to end (`covidray score`) for (a) small JPEGs and (b) full-resolution 16-bit
  2048x2048 PNGs, with the ratio to the bound (for (b) the bound is min(model, decode));
* the wall time of a small archive on the warm cluster.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "infra", "local"))

import ray_head  # noqa: E402
import s3_server  # noqa: E402

from covidray.datasets import load_pixels  # noqa: E402
from covidray.model import build_model  # noqa: E402
from covidray.onnx_model import export_onnx, model_metadata, onnx_session  # noqa: E402
from covidray.stages.score import ScoreConfig, score_archive  # noqa: E402
from covidray.storage import Storage, StorageSettings  # noqa: E402
from covidray.synthetic import encode, synthetic_xray  # noqa: E402

BUCKET = "s3://covidray-bench"


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def sixteen_bit_png(rng: np.random.Generator) -> bytes:
    """A full-resolution hospital-like export: 2048x2048, 16-bit, 12 bits used."""
    base = np.asarray(synthetic_xray(bool(rng.integers(2)), rng, size=(512, 512)), np.float32)
    big = np.asarray(Image.fromarray(base).resize((2048, 2048), Image.Resampling.BILINEAR))
    values = (big * 16 + rng.normal(0, 20, big.shape)).clip(0, 4095).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(values).save(buffer, format="PNG")
    return buffer.getvalue()


def upload_archive(storage: Storage, root: str, count: int, distinct: list[bytes],
                   suffix: str) -> str:
    """``count`` objects cycling through ``distinct`` contents, and a manifest of them."""
    uris = [f"{root}/img-{i:05d}.{suffix}" for i in range(count)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda i: storage.write_bytes(uris[i], distinct[i % len(distinct)]),
                      range(count)))
    return storage.write_table(f"{root}/manifest.csv", pd.DataFrame({"uri": uris}))


def model_only(model: bytes, threads: int, batches: int = 12) -> float:
    session = onnx_session(model, threads)
    x = np.random.default_rng(0).normal(size=(32, 3, 224, 224)).astype(np.float32)
    session.run(None, {"input": x})  # warm-up
    started = time.perf_counter()
    for _ in range(batches):
        session.run(None, {"input": x})
    return 32 * batches / (time.perf_counter() - started)


def decode_only(storage: Storage, manifest: str, count: int) -> float:
    uris = storage.read_table(manifest)["uri"].head(count).to_numpy()
    load_pixels({"uri": uris[:8]}, storage)  # warm-up
    started = time.perf_counter()
    for start in range(0, len(uris), 32):
        out = load_pixels({"uri": uris[start:start + 32]}, storage)
        assert (out["error"] == "").all(), out["error"]
    return len(uris) / (time.perf_counter() - started)


def end_to_end(storage: Storage, manifest: str, model_uri: str, output: str) -> tuple[float, dict]:
    started = time.perf_counter()
    summary = score_archive(ScoreConfig(manifest, model_uri, output, progress_seconds=3600),
                            storage)
    seconds = time.perf_counter() - started
    assert summary["scored"] == summary["listed"], summary
    return summary["listed"] / seconds, {**summary, "wall": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jpegs", type=int, default=2000)
    parser.add_argument("--pngs", type=int, default=300)
    parser.add_argument("--small", type=int, default=40)
    args = parser.parse_args()

    cpus = os.cpu_count() or 1
    directory = tempfile.mkdtemp(prefix="covidray-bench-")
    os.environ.update(ray_head.token_env(directory))
    import ray  # after the token variables: Ray reads them when it is imported

    env = s3_server.start(directory, free_port())
    os.environ.update(env)
    try:
        storage = Storage(StorageSettings(endpoint_url=env["AWS_ENDPOINT_URL"]))
        storage.ensure_bucket(BUCKET)
        model = export_onnx(build_model("none"), model_metadata(0.5, "none", {}, 0))
        model_uri = storage.write_bytes(f"{BUCKET}/model/model.onnx", model)
        rng = np.random.default_rng(0)
        jpegs = [encode(synthetic_xray(bool(i % 2), rng), "jpg") for i in range(64)]
        pngs = [sixteen_bit_png(rng) for _ in range(6)]
        small = upload_archive(storage, f"{BUCKET}/small", args.small, jpegs, "jpg")
        archive_a = upload_archive(storage, f"{BUCKET}/a", args.jpegs, jpegs, "jpg")
        archive_b = upload_archive(storage, f"{BUCKET}/b", args.pngs, pngs, "png")
        print(f"archives: (a) {args.jpegs} JPEGs of {np.mean([len(j) for j in jpegs]) / 1e3:.0f}"
              f" KB, (b) {args.pngs} 16-bit 2048x2048 PNGs of "
              f"{np.mean([len(p) for p in pngs]) / 1e6:.1f} MB; {cpus} cores", flush=True)

        bound = model_only(model, cpus)
        decode_a = decode_only(storage, archive_a, 256)
        decode_b = decode_only(storage, archive_b, 24)
        ray.init(address="local", num_cpus=cpus, include_dashboard=False,
                 logging_level="WARNING")
        end_to_end(storage, small, model_uri, f"{BUCKET}/out/warm-up")  # warms the cluster
        small_rate, small_run = end_to_end(storage, small, model_uri, f"{BUCKET}/out/small")
        rate_a, _ = end_to_end(storage, archive_a, model_uri, f"{BUCKET}/out/a")
        rate_b, _ = end_to_end(storage, archive_b, model_uri, f"{BUCKET}/out/b")
        bound_b = min(bound, decode_b)
        print()
        print(f"model only (onnxruntime, batch 32, {cpus} threads)   {bound:7.1f} images/s")
        print(f"decode only, one process: (a) JPEG                {decode_a:7.1f} images/s")
        print(f"decode only, one process: (b) 16-bit PNG          {decode_b:7.1f} images/s")
        print(f"end to end (a) {args.jpegs} JPEGs                      {rate_a:7.1f} images/s"
              f" = {rate_a / bound:.2f}x the model-only bound")
        print(f"end to end (b) {args.pngs} 16-bit PNGs                  {rate_b:7.1f} images/s"
              f" = {rate_b / bound_b:.2f}x min(model, decode) = {bound_b:.1f}")
        print(f"small archive ({args.small} images) on a warm cluster   "
              f"{small_run['wall']:7.1f} s")
    finally:
        ray.shutdown()
        s3_server.stop(directory)


if __name__ == "__main__":
    main()
