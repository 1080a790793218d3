#!/usr/bin/env python3
"""Frozen-backbone training both ways, same data, same process: which is faster, by how much.

    python benchmarks/paper_protocol_speed.py [--data ../shared/data/cxr] [--images 200]
           [--epochs 100] [--straightforward-epochs 3]

straightforward: the paper's loop, the ResNet18 backbone runs on every image every epoch
                 (covidray.loop.train_one_epoch with --train-layers fc);
cached:          the backbone runs once per image (covidray.features.extract_features),
                 then the head trains for all epochs on the stored features.
Both use the same decoded images (held in memory, so decoding is not timed), batch 20,
Adam lr 1e-4, the same initial head. Every straightforward epoch does the same work, so
unless --straightforward-epochs equals --epochs its time at --epochs is the measured
per-epoch time times --epochs (printed as such). The heads after the measured epochs are
compared too.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import pandas as pd
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from covidray.imaging.loader import load_pixels  # noqa: E402
from covidray.imaging.recipe import model_inputs  # noqa: E402
from covidray.features import extract_features  # noqa: E402
from covidray.model import build_model, freeze_for, head  # noqa: E402
from covidray.storage import Storage  # noqa: E402
from covidray.synthetic import encode, synthetic_xray  # noqa: E402
from covidray.loop import train_one_epoch  # noqa: E402


def load_images(data: str | None, count: int, seed: int) -> dict:
    if data and os.path.exists(os.path.join(data, "metadata.csv")):
        metadata = pd.read_csv(os.path.join(data, "metadata.csv"))
        per_class = count // 2
        chosen = pd.concat([part.sample(min(per_class, len(part)), random_state=seed)
                            for _, part in metadata.groupby("label")])
        uris = [os.path.join(data, f) for f in chosen["file"]]
        labels, source = chosen["label"].tolist(), f"{data} (real chest X-rays)"
    else:
        import tempfile

        folder, rng = tempfile.mkdtemp(), np.random.default_rng(seed)
        uris, labels = [], []
        for i in range(count):
            label = "covid" if i % 2 else "non_covid"
            path = os.path.join(folder, f"{i}.png")
            with open(path, "wb") as fh:
                fh.write(encode(synthetic_xray(label == "covid", rng), "png"))
            uris.append(path)
            labels.append(label)
        source = "synthetic images"
    loaded = load_pixels({"uri": np.asarray(uris), "label": np.asarray(labels, dtype=object)},
                         Storage())
    print(f"data: {len(uris)} images from {source}")
    return loaded


def batches_of(loaded: dict, size: int) -> list[dict]:
    n = len(loaded["uri"])
    return [{k: v[i:i + size] for k, v in loaded.items()} for i in range(0, n, size)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "..", "..",
                                                       "shared", "data", "cxr"))
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--straightforward-epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device, criterion = torch.device("cpu"), nn.CrossEntropyLoss()
    images = batches_of(load_images(args.data, args.images, args.seed), args.batch_size)

    torch.manual_seed(args.seed)
    straight = freeze_for(build_model("none"), "fc")
    torch.manual_seed(args.seed)
    cached = freeze_for(build_model("none"), "fc")

    optimizer = torch.optim.Adam([p for p in straight.parameters() if p.requires_grad], lr=1e-4)
    started = time.perf_counter()
    for _ in range(args.straightforward_epochs):
        train_one_epoch(straight, criterion, optimizer, images, device, "fc")
    straight_measured = time.perf_counter() - started
    per_epoch = straight_measured / args.straightforward_epochs

    started = time.perf_counter()
    features = [{"features": extract_features(cached, model_inputs(b)[0]), "target": b["target"],
                 "error": b["error"]} for b in images]
    extraction = time.perf_counter() - started
    optimizer = torch.optim.Adam(head(cached).parameters(), lr=1e-4)
    started = time.perf_counter()
    compare_at = None
    for epoch in range(args.epochs):
        train_one_epoch(head(cached), criterion, optimizer, features, device, "all")
        if epoch + 1 == args.straightforward_epochs:
            compare_at = (straight.fc.weight - cached.fc.weight).abs().max().item()
    head_training = time.perf_counter() - started
    cached_total = extraction + head_training

    straight_total = per_epoch * args.epochs
    how = "measured" if args.straightforward_epochs == args.epochs else \
        f"{args.straightforward_epochs} epochs measured, x{args.epochs / args.straightforward_epochs:g}"
    print(f"threads: {args.threads}, batch {args.batch_size}, images {args.images}")
    print(f"straightforward: {per_epoch:.2f} s/epoch -> {straight_total:.1f} s for "
          f"{args.epochs} epochs ({how})")
    print(f"cached:          features {extraction:.2f} s once + head {head_training:.2f} s for "
          f"{args.epochs} epochs = {cached_total:.2f} s (measured)")
    print(f"speed-up at {args.epochs} epochs: {straight_total / cached_total:.1f}x")
    if compare_at is not None:
        print(f"max |head difference| after {args.straightforward_epochs} epochs: {compare_at:.2e}")


if __name__ == "__main__":
    main()
