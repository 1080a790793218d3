"""Scoring throughput: end to end against the bounds, in one run on one machine.

    python benchmarks/scoring_throughput.py [--jpegs 2000] [--pngs 300] [--small 40] [--repeats 1]

Starts its own SeaweedFS server (temporary directory, free port) and a local Ray instance
with every core, exports a ResNet18 (random weights: speed does not depend on them) and
prints, each measured here and now:

* the model-only bound: onnxruntime alone, every core (batch 32), or the GPU where this
  machine has one and onnxruntime-gpu (batch 128: the batches scoring uses there);
* the decode-only rate: fetch from S3 + decode + preprocess, one process; and after the
  end-to-end runs the same through Ray Data on the whole cluster (the scoring pipeline
  without the model: what many cores decode, where one process's GIL would bound it);
  (both timed before and after the end-to-end runs, the best kept: noise only ever makes
  a bound too low, which would flatter the ratios);
* the same work without Ray: fetch + decode of the next batch overlapped with the model
  on this one, in one process. Its gap to the bound is fetch + decode's share of the same
  cores; its gap to end to end is what Ray's tasks, object store, scheduler and driver cost;
* the same-cores limit 1/(1/model + 1/decode): where the model and decoding share the
  cores (no GPU) each image costs both, so a pipeline reaches at most about this. Exact
  when both stages keep every core busy alone (the model and PNG decoding do); fetching
  small JPEGs is partly bound by Python's GIL, so for (a) it is a slight under-estimate;
* end to end (`covidray score`) for (a) small JPEGs and (b) full-resolution 16-bit
  2048x2048 PNGs, with the ratio to the bound (for (b) the bound is min(model, decode));
  with a GPU also the ratio to min(model, decode in Ray): there the GPU runs the model and
  the cores decode, so the slower of the two is what a pipeline can reach;
* the wall time of a small archive on the warm cluster;
* per registry backbone (``--backbones``, all by default): model only and end to end on
  archive (a), each against ResNet18's in the same run, and what a million-image archive
  takes at that rate.
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

from covidray.cluster import plan_resources  # noqa: E402
from covidray.imaging.loader import load_pixels  # noqa: E402
from covidray.imaging.decode import decode_with_tags  # noqa: E402
from covidray.imaging.recipe import normalize, to_input_pixels  # noqa: E402
from covidray.backbones import BACKBONES  # noqa: E402
from covidray.model import build_model, recipe_for  # noqa: E402
from covidray.onnx_export import export_onnx, model_metadata
from covidray.onnx_runtime import onnx_session
from covidray.cluster import score_on_gpu
from covidray.scoring.index import snapshot_index  # noqa: E402
from covidray.scoring.pipeline import loaded_images  # noqa: E402
from covidray.stages.score import ScoreConfig, score_archive  # noqa: E402
from covidray.imaging.profile import image_profile  # noqa: E402
from covidray.storage import Storage, StorageSettings  # noqa: E402
from covidray.synthetic import encode, synthetic_xray  # noqa: E402

BUCKET = "s3://covidray-bench"



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


def best_rate(work, images: int, windows: int) -> float:
    """Images/s of the fastest of ``windows`` runs of ``work()``: a bound must not drop
    because something else on the machine woke up while it was timed."""
    seconds = []
    for _ in range(windows):
        started = time.perf_counter()
        work()
        seconds.append(time.perf_counter() - started)
    return images / min(seconds)


def model_only(model: bytes, threads: int, gpu: bool, batch: int, batches: int = 8,
               windows: int = 3) -> float:
    session = onnx_session(model, threads, gpu)
    x = np.random.default_rng(0).normal(size=(batch, 3, 224, 224)).astype(np.float32)
    session.run(None, {"input": x})  # warm-up

    def run():
        for _ in range(batches):
            session.run(None, {"input": x})
    return best_rate(run, batch * batches, windows)


def decode_only(storage: Storage, manifest: str, count: int, windows: int = 2) -> float:
    uris = storage.read_table(manifest)["uri"].head(count).to_numpy()
    load_pixels({"uri": uris[:8]}, storage)  # warm-up

    def run():
        for start in range(0, len(uris), 32):
            out = load_pixels({"uri": uris[start:start + 32]}, storage)
            assert (out["error"] == "").all(), out["error"]
    return best_rate(run, len(uris), windows)


def profiling_seconds(storage: Storage, manifest: str, count: int = 256) -> float:
    """Core-seconds per image of the drift profile (covidray.imaging.profile.image_profile), which
    loading adds to every row: timed alone in this process, on the archive's own images."""
    decoded = []
    for uri in storage.read_table(manifest)["uri"].head(count):
        image, tags = decode_with_tags(storage.read_bytes(uri))
        decoded.append((image.width, image.height, tags, to_input_pixels(image)))

    def run():
        for width, height, tags, pixels in decoded:
            image_profile(width, height, tags["bit_depth"], tags["photometric"], pixels)
    return 1 / best_rate(run, len(decoded), 3)


def measure_bounds(model: bytes, cpus: int, gpu: bool, batch: int, storage: Storage,
                   archive_a: str, archive_b: str) -> np.ndarray:
    """(model only, decode (a), decode (b)) in images/s."""
    return np.array([model_only(model, cpus, gpu, batch), decode_only(storage, archive_a, 256),
                     decode_only(storage, archive_b, 24)])


def decode_in_ray(storage: Storage, manifest: str, staging: str, gpu: bool,
                  windows: int = 2) -> float:
    """The scoring pipeline up to the model (its index parts, its decode tasks and their
    reservation) on the whole cluster, the batches only counted."""
    import ray

    index = f"{staging}/index"
    listed = snapshot_index(storage, manifest, index)
    plan = plan_resources(ray.cluster_resources(), use_gpu=gpu)

    def run():
        decoded = sum(len(b["error"]) for b in loaded_images(
            storage, index, plan.inference_batch, plan.decode_cpus)
            .iter_batches(batch_size=None))
        assert decoded == listed, (decoded, listed)
    return best_rate(run, listed, windows)


def overlapped_one_process(storage: Storage, manifest: str, model: bytes, threads: int,
                           gpu: bool, batch: int, count: int) -> float:
    """Fetch + decode batch k+1 in a thread while onnxruntime scores batch k: no Ray."""
    uris = storage.read_table(manifest)["uri"].head(count).to_numpy()
    session = onnx_session(model, threads, gpu)
    batches = [uris[start:start + batch] for start in range(0, len(uris), batch)]
    session.run(None, {"input": normalize(load_pixels({"uri": batches[0]}, storage)["pixels"])})
    started = time.perf_counter()
    with ThreadPoolExecutor(1) as pool:
        loading = pool.submit(load_pixels, {"uri": batches[0]}, storage)
        for following in [*batches[1:], None]:
            pixels = loading.result()["pixels"]
            if following is not None:
                loading = pool.submit(load_pixels, {"uri": following}, storage)
            session.run(None, {"input": normalize(pixels)})
    return len(uris) / (time.perf_counter() - started)


def end_to_end(storage: Storage, manifest: str, model_uri: str, output: str) -> tuple[float, dict]:
    started = time.perf_counter()
    summary = score_archive(ScoreConfig(manifest, model_uri, output, progress_seconds=3600),
                            storage)
    seconds = time.perf_counter() - started
    assert summary["scored"] == summary["listed"], summary
    return summary["listed"] / seconds, {**summary, "wall": seconds}


def per_backbone(names: list[str], storage: Storage, archive: str, images: int, cpus: int,
                 gpu: bool, batch: int) -> None:
    """Model-only and end-to-end rates of each backbone on ``archive`` (random weights:
    speed does not depend on them), against ResNet18's measured here."""
    rows = {}
    for name in names:
        model = export_onnx(build_model("none", backbone=name),
                            model_metadata(0.5, "none", {"backbone": name}, 0,
                                           recipe_for(name)))
        uri = storage.write_bytes(f"{BUCKET}/model-{name}/model.onnx", model)
        rows[name] = (model_only(model, cpus, gpu, batch),
                      end_to_end(storage, archive, uri, f"{BUCKET}/out/backbone-{name}")[0])
    base_model, base_e2e = rows.get("resnet18", next(iter(rows.values())))
    print()
    print(f"per backbone, archive (a) {images} JPEGs: images/s (x ResNet18's); a million "
          "images at the end-to-end rate")
    for name, (model_rate, e2e_rate) in rows.items():
        print(f"  {name:<20} {BACKBONES[name].gmacs:4.2f} GMACs   model only "
              f"{model_rate:7.1f} ({model_rate / base_model:4.2f}x)   end to end "
              f"{e2e_rate:6.1f} ({e2e_rate / base_e2e:4.2f}x)   1M images: "
              f"{1e6 / e2e_rate / 3600:5.1f} h", flush=True)


def start_storage(prefix: str) -> tuple[str, Storage]:
    """A temporary directory, Ray's token variables for it (set before ``import ray``) and a
    SeaweedFS server there on a free port holding the benchmark's bucket."""
    directory = tempfile.mkdtemp(prefix=prefix)
    os.environ.update(ray_head.token_env(directory))
    env = s3_server.start(directory, s3_server.free_port())
    os.environ.update(env)
    storage = Storage(StorageSettings(endpoint_url=env["AWS_ENDPOINT_URL"]))
    storage.ensure_bucket(BUCKET)
    return directory, storage


def bench_model_and_jpegs(storage: Storage):
    """A ResNet18 export (random weights: speed does not depend on them) in the bucket, and
    64 distinct small synthetic JPEGs: (model bytes, its URI, the generator, the JPEGs)."""
    model = export_onnx(build_model("none"), model_metadata(0.5, "none", {}, 0))
    model_uri = storage.write_bytes(f"{BUCKET}/model/model.onnx", model)
    rng = np.random.default_rng(0)
    return model, model_uri, rng, [encode(synthetic_xray(bool(i % 2), rng), "jpg")
                                   for i in range(64)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jpegs", type=int, default=2000)
    parser.add_argument("--pngs", type=int, default=300)
    parser.add_argument("--small", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=1,
                        help="end-to-end runs of each archive (the median is reported)")
    parser.add_argument("--backbones", default=",".join(BACKBONES),
                        help="registry backbones to measure on archive (a); '' for none")
    args = parser.parse_args()

    cpus = os.cpu_count() or 1
    import torch

    machine = {"CPU": cpus, "GPU": torch.cuda.device_count()}
    import onnxruntime

    gpu = score_on_gpu("auto", machine, onnxruntime.get_available_providers)  # this machine
    batch = plan_resources(machine, use_gpu=gpu).inference_batch  # the batches scoring uses
    directory, storage = start_storage("covidray-bench-")
    import ray  # after the token variables: Ray reads them when it is imported

    try:
        model, model_uri, rng, jpegs = bench_model_and_jpegs(storage)
        pngs = [sixteen_bit_png(rng) for _ in range(6)]
        small = upload_archive(storage, f"{BUCKET}/small", args.small, jpegs, "jpg")
        archive_a = upload_archive(storage, f"{BUCKET}/a", args.jpegs, jpegs, "jpg")
        archive_b = upload_archive(storage, f"{BUCKET}/b", args.pngs, pngs, "png")
        print(f"archives: (a) {args.jpegs} JPEGs of {np.mean([len(j) for j in jpegs]) / 1e3:.0f}"
              f" KB, (b) {args.pngs} 16-bit 2048x2048 PNGs of "
              f"{np.mean([len(p) for p in pngs]) / 1e6:.1f} MB; {cpus} cores"
              f"{', the model on a GPU' if gpu else ''}", flush=True)

        before = measure_bounds(model, cpus, gpu, batch, storage, archive_a, archive_b)
        # A rate: the first 2,000 images are enough (one process is GIL-bound on big archives).
        ceiling_a = overlapped_one_process(storage, archive_a, model, cpus, gpu, batch,
                                           min(args.jpegs, 2000))
        ray.init(address="local", num_cpus=cpus, include_dashboard=False,
                 logging_level="WARNING")
        end_to_end(storage, small, model_uri, f"{BUCKET}/out/warm-up")  # warms the cluster
        small_rate, small_run = end_to_end(storage, small, model_uri, f"{BUCKET}/out/small")
        rates_a = [end_to_end(storage, archive_a, model_uri, f"{BUCKET}/out/a-{i}")[0]
                   for i in range(args.repeats)]
        rates_b = [end_to_end(storage, archive_b, model_uri, f"{BUCKET}/out/b-{i}")[0]
                   for i in range(args.repeats)]
        rate_a, rate_b = float(np.median(rates_a)), float(np.median(rates_b))
        # Timed again after the runs and the best kept: noise only ever slows a timing.
        after = measure_bounds(model, cpus, gpu, batch, storage, archive_a, archive_b)
        ray_a, ray_b = (decode_in_ray(storage, archive, f"{BUCKET}/staging/{name}", gpu)
                        for name, archive in (("a", archive_a), ("b", archive_b)))
        bound, decode_a, decode_b = np.maximum(before, after)
        profile_s = profiling_seconds(storage, archive_a)
        bound_b = min(bound, decode_b)
        # Where model and decode run on the same cores (no GPU), each image costs both.
        shared_a, shared_b = (1 / (1 / bound + 1 / decode) for decode in (decode_a, decode_b))
        spread = (lambda rates: f" (median of {len(rates)}: {min(rates):.1f}-{max(rates):.1f})"
                  if len(rates) > 1 else "")
        print()
        print("bounds: the best of timings before and after the end-to-end runs "
              f"(before: {before.round(1).tolist()}, after: {after.round(1).tolist()})")
        model_line = f"batch {batch}, " + ("GPU" if gpu else f"{cpus} threads")
        print(f"model only (onnxruntime, {model_line})".ljust(50) + f"{bound:7.1f} images/s")
        print(f"decode only, one process: (a) JPEG                {decode_a:7.1f} images/s")
        print(f"decode only, one process: (b) 16-bit PNG          {decode_b:7.1f} images/s")
        print(f"decode only, Ray Data, {cpus} cores: (a) JPEG".ljust(50)
              + f"{ray_a:7.1f} images/s")
        print(f"decode only, Ray Data, {cpus} cores: (b) 16-bit PNG".ljust(50)
              + f"{ray_b:7.1f} images/s")
        if not gpu:
            print(f"same cores, 1/(1/model + 1/decode): (a)           {shared_a:7.1f} images/s"
                  f" = {shared_a / bound:.2f}x the model-only bound")
            print(f"same cores, 1/(1/model + 1/decode): (b)           {shared_b:7.1f} images/s"
                  f" = {shared_b / bound_b:.2f}x min(model, decode)")
        limit = (lambda rate, shared: "" if gpu else
                 f", {rate / shared:.2f}x the same-cores limit")
        print(f"overlapped in one process, no Ray: (a) JPEG       {ceiling_a:7.1f} images/s"
              f" = {ceiling_a / bound:.2f}x the model-only bound")
        print(f"end to end (a) {args.jpegs} JPEGs                      {rate_a:7.1f} images/s"
              f" = {rate_a / bound:.2f}x the model-only bound{limit(rate_a, shared_a)}"
              f"{spread(rates_a)}")
        print(f"end to end (b) {args.pngs} 16-bit PNGs                  {rate_b:7.1f} images/s"
              f" = {rate_b / bound_b:.2f}x min(model, decode) = {bound_b:.1f}"
              f"{limit(rate_b, shared_b)}{spread(rates_b)}")
        if gpu:  # the GPU runs the model, the cores decode: the slower one bounds a pipeline
            for name, rate, decoded in (("(a)", rate_a, ray_a), ("(b)", rate_b, ray_b)):
                print(f"end to end {name} / min(model, decode in Ray)".ljust(50)
                      + f"{rate / min(bound, decoded):7.2f}x")
        # Every image costs cpus / rate core-seconds end to end; the profile is part of it.
        for name, rate in (("(a)", rate_a), ("(b)", rate_b)):
            print(f"drift profile, share of an image's cost {name}".ljust(50)
                  + f"{100 * profile_s / (cpus / rate):7.2f} %  ({1e6 * profile_s:.0f} us per "
                  "image, one core; the limit is 3%)")
        print(f"small archive ({args.small} images) on a warm cluster   "
              f"{small_run['wall']:7.1f} s", flush=True)
        names = [n for n in args.backbones.split(",") if n]
        if names:
            per_backbone(names, storage, archive_a, args.jpegs, cpus, gpu, batch)
    finally:
        ray.shutdown()
        s3_server.stop(directory)


if __name__ == "__main__":
    main()
