"""``covidray upload``: stage a local labelled folder (``metadata.csv`` + images) in storage.

Writes the images and ``<dest>/manifest.csv`` with every metadata column (label,
patient_id, split_group, source, ...): the dataset layout :class:`covidray.layout.DataLayout`.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pandas as pd

from covidray.config import DEFAULT_SEED, option, to_dict, validate
from covidray.datasets import unit_hash
from covidray.labels import LABELS, POSITIVE_LABEL
from covidray.layout import DataLayout
from covidray.storage import Storage

UPLOAD_THREADS = 8
MIN_POSITIVE_SHARE = 0.3  # a sample keeps at least this share of COVID images


@dataclass(frozen=True)
class UploadConfig:
    source: str = option("", "folder with metadata.csv (file, label, ...)", required=True)
    dest: str = option("", "where to put it, e.g. s3://bucket/cxr", required=True)
    images: int | None = option(None, "at most this many images, whole patient groups "
                                      "(default: all)", bounds=(1, None))
    seed: int = option(DEFAULT_SEED, "seeds the choice of groups")

    def __post_init__(self):
        validate(self)


def upload_dataset(config: UploadConfig, storage: Storage, ray_address: str | None = None) -> dict:
    """Upload ``source/metadata.csv``'s images (all, or a sample of whole patient groups with
    both classes kept) and write the manifest; runs in this process."""
    storage.ensure_bucket(config.dest)
    layout = DataLayout(config.dest)
    metadata = pd.read_csv(os.path.join(config.source, "metadata.csv"))
    subset = metadata if config.images is None else sample_groups(metadata, config.images,
                                                                   config.seed)

    def read(relative: str) -> tuple[str, bytes]:
        with open(os.path.join(config.source, relative), "rb") as fh:
            return layout.image(relative), fh.read()

    upload(storage, (read(relative) for relative in subset["file"]))
    storage.write_json(layout.config, to_dict(config))
    return {"manifest": storage.write_table(layout.manifest, subset), "images": len(subset)}


def sample_groups(metadata: pd.DataFrame, images: int, seed: int) -> pd.DataFrame:
    """About ``images`` rows made of whole patient groups, both classes kept (COVID at least
    :data:`MIN_POSITIVE_SHARE`), chosen by a seeded hash of the group."""
    group_column = "split_group" if "split_group" in metadata.columns else "patient_id"
    positive_share = max(metadata["label"].eq(POSITIVE_LABEL).mean(), MIN_POSITIVE_SHARE)
    chosen = []
    for label in LABELS:
        share = positive_share if label == POSITIVE_LABEL else 1.0 - positive_share
        budget = int(images * share)
        members = metadata[metadata["label"] == label]
        groups = members[group_column].astype(str)
        order = sorted(groups.unique(), key=lambda g: unit_hash(seed, g))
        sizes = members.groupby(groups).size()
        taken, total = [], 0
        for group in order:
            if total >= budget:
                break
            taken.append(group)
            total += int(sizes[group])
        chosen.append(members[groups.isin(taken)])
    return pd.concat(chosen)


def upload(storage: Storage, items) -> None:
    """Write ``(uri, bytes)`` pairs, a few at a time."""
    with ThreadPoolExecutor(max_workers=UPLOAD_THREADS) as pool:
        list(pool.map(lambda item: storage.write_bytes(*item), items))
