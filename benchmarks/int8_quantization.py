"""int8 or not: onnxruntime static quantization of an exported model, measured.

    source .local/env.sh   # the local S3 server holding a run (infra/local/paper_protocol.sh)
    python benchmarks/int8_quantization.py --run s3://covidray-cxr/runs/paper-random

Quantizes the run's float ``model.onnx`` as ``covidray export --quantize int8`` does
(:func:`covidray.onnx_export.quantize_int8`: QDQ, int8 weights per channel, uint8
activations) calibrated on ``--calibration`` validation images, then, in this process:

* model-only speed, batch 32, every core: fp32 vs int8;
* ROC AUC on the run's test split: fp32 vs int8, and the change.

covidray keeps the ``export --quantize int8`` option only if int8 is >= 1.5x faster with
|delta AUC| <= 0.005 (README, "int8"): this script is how that was decided.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from covidray.imaging.loader import pixels_of  # noqa: E402
from covidray.datasets import split_rows  # noqa: E402
from covidray.imaging.recipe import normalize  # noqa: E402
from covidray.layout import RunLayout  # noqa: E402
from covidray.metrics import roc_auc  # noqa: E402
from covidray.onnx_runtime import OnnxScorer  # noqa: E402
from covidray.onnx_export import quantize_int8  # noqa: E402
from covidray.storage import Storage  # noqa: E402
from scoring_throughput import model_only  # noqa: E402  (the same bound, measured the same way)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--calibration", type=int, default=200,
                        help="validation images to calibrate on")
    args = parser.parse_args()
    storage, run = Storage(), RunLayout(args.run)
    fp32 = storage.read_bytes(run.onnx_fp32 if storage.exists(run.onnx_fp32) else run.onnx)
    splits = storage.read_table(run.splits)
    val = split_rows(splits, "val").sample(frac=1.0, random_state=0).head(args.calibration)
    test = split_rows(splits, "test")
    test = test[test["label"].notna()].reset_index(drop=True)
    started = time.time()
    int8 = quantize_int8(fp32, normalize(pixels_of(storage, val["uri"].tolist())))
    print(f"quantized in {time.time() - started:.0f} s on {len(val)} validation images; "
          f"{len(fp32) / 2**20:.1f} MB -> {len(int8) / 2**20:.1f} MB")
    pixels = pixels_of(storage, test["uri"].tolist())
    targets = (test["label"] == "covid").astype(int).to_numpy()
    rows = {}
    for name, model in (("fp32", fp32), ("int8", int8)):
        scores = OnnxScorer(model, name).scores(pixels)
        rows[name] = {"speed": model_only(model, 0), "auc": roc_auc(scores, targets)}
    speedup = rows["int8"]["speed"] / rows["fp32"]["speed"]
    delta = rows["int8"]["auc"] - rows["fp32"]["auc"]
    print(f"\n| model | images/s (batch 32, {os.cpu_count()} cores) | test ROC AUC ({len(test)} images) |")
    print("|---|---:|---:|")
    for name, row in rows.items():
        print(f"| {name} | {row['speed']:.1f} | {row['auc']:.4f} |")
    keep = speedup >= 1.5 and abs(delta) <= 0.005
    print(f"\nint8 / fp32 speed: {speedup:.2f}x; AUC change {delta:+.4f}. "
          f"{'Meets' if keep else 'Fails'} the bar (>= 1.5x and |delta AUC| <= 0.005).")


if __name__ == "__main__":
    main()
