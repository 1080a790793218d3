"""Labelled X-ray collections: the index of images, patient-level splits, and batch loading.

A collection is either a manifest (CSV or Parquet; one row per image) or a prefix laid
out as ``<prefix>/<label>/<file>``. Either way it becomes an *index*: a DataFrame with
the columns in :data:`INDEX_COLUMNS`. :func:`load_pixels` turns a batch of index rows
into model input pixels (optionally augmented) and is the function every Ray Data
pipeline maps over batches -- training, feature extraction and scoring alike.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd

from covidray.config import seeded_hash
from covidray.dicom import DICOM_COLUMNS
from covidray.incremental import UNKNOWN_ETAG
from covidray.images import (IMAGE_SUFFIXES, INPUT_SIZE, DecodeError, declared_pixels,
                             decode_with_tags, to_input_pixels)
from covidray.labels import LABELS, label_index
from covidray.pixels import DecodeBudget
from covidray.profile import NUMBERS, PROFILE_COLUMNS, empty_profile, image_profile
from covidray.location import Location, StorageError, StorageOutage
from covidray.storage import Storage
from covidray.views import VIEW_POLICIES, view_check

SPLITS = ("train", "val", "test")
INDEX_COLUMNS = ("uri", "label", "patient_id", "group", "split", "source", "copy")
ARCHIVE_COLUMNS = ["uri", "label", "source", "group"]  # what an index row carries to outputs
_TAG_COLUMNS = [*DICOM_COLUMNS, "view_check"]
LOADED_COLUMNS = [*_TAG_COLUMNS, *PROFILE_COLUMNS]  # what loading an image adds to its row
_URI_COLUMNS = ("uri", "image", "path", "file")
_LABEL_ALIASES = {"covid": "covid", "covid-19": "covid", "covid19": "covid", "positive": "covid",
                  "non_covid": "non_covid", "non-covid": "non_covid", "noncovid": "non_covid",
                  "negative": "non_covid", "normal": "non_covid"}


def is_manifest(uri: str) -> bool:
    return uri.lower().endswith((".csv", ".parquet"))


def load_index(storage: Storage, uri: str, require_labels: bool = True) -> pd.DataFrame:
    """Read a manifest or list a ``<prefix>/<label>/<file>`` tree into an index DataFrame."""
    frame = _index_from_manifest(storage, uri) if is_manifest(uri) else _index_from_prefix(storage, uri)
    if frame.empty:
        raise StorageError(f"no images found at '{uri}' (looked for {', '.join(IMAGE_SUFFIXES)})")
    if require_labels and frame["label"].isna().any():
        missing = frame.loc[frame["label"].isna(), "uri"].head(3).tolist()
        raise ValueError(f"{int(frame['label'].isna().sum())} images at '{uri}' have no label "
                         f"(e.g. {missing}); labels must be one of {LABELS}")
    return frame


def label_from_path(root: Location, uri: str) -> str | None:
    """The label of ``<root>/<label>/<file>`` (None when the first folder is not a label)."""
    relative = Location.parse(uri).key[len(root.key):].strip("/")
    first = relative.split("/", 1)[0] if "/" in relative else ""
    return first if first in LABELS else None


def iter_prefix_rows(storage: Storage, uri: str):
    """``{"uri", "label", "etag", "size"}`` for every image file under ``uri``, streamed."""
    root = Location.parse(uri)
    for obj in storage.list_objects(uri, IMAGE_SUFFIXES):
        yield {**obj, "label": label_from_path(root, obj["uri"])}


def _index_from_prefix(storage: Storage, uri: str) -> pd.DataFrame:
    return normalise_index(pd.DataFrame(list(iter_prefix_rows(storage, uri)), columns=["uri", "label"]))


def _index_from_manifest(storage: Storage, uri: str) -> pd.DataFrame:
    frames = list(manifest_frames(storage, uri))
    return manifest_to_index(pd.concat(frames, ignore_index=True) if frames else
                             pd.DataFrame(columns=["uri"]), uri)


MANIFEST_CHUNK_ROWS = 65_536


def manifest_frames(storage: Storage, uri: str, rows: int = MANIFEST_CHUNK_ROWS):
    """The one manifest reader: a CSV or Parquet manifest, streamed from storage (an outage
    is ridden out), as DataFrames of at most ``rows`` rows with every value as text (None
    where empty), for training and scoring alike: a patient ``007`` stays ``007``."""
    with storage.open_read(uri) as fh:
        if uri.lower().endswith(".parquet"):
            import pyarrow.parquet as pq

            for batch in pq.ParquetFile(fh).iter_batches(batch_size=rows):
                frame = batch.to_pandas()
                yield frame.apply(lambda column: column.map(
                    lambda v: None if v is None or v != v else str(v)).astype(object))
        else:
            for frame in pd.read_csv(fh, dtype=str, keep_default_na=False, na_values=[""],
                                     chunksize=rows):
                yield frame.astype(object).where(frame.notna(), None)


def manifest_to_index(table: pd.DataFrame, manifest_uri: str,
                      allow_local_paths: bool = False) -> pd.DataFrame:
    """Manifest rows -> index rows; relative image paths resolve against the manifest's folder.

    Refused with a one-line reason: a row without an image, a label outside
    :data:`LABELS`, and, in a manifest held in object storage, a local path (which would
    open a node's own files) unless ``allow_local_paths``.
    """
    uri_column = next((c for c in _URI_COLUMNS if c in table.columns), None)
    if uri_column is None:
        raise ValueError(f"manifest '{manifest_uri}' needs one of the columns {_URI_COLUMNS}")
    manifest = Location.parse(manifest_uri)
    base = manifest.parent
    table = table.reset_index(drop=True)
    raw_uris = table[uri_column].astype("string")  # verbatim: " a.png" is its own S3 key
    empty = raw_uris.isna() | (raw_uris == "")
    if empty.any():
        raise ValueError(f"manifest '{manifest_uri}': {int(empty.sum())} row(s) have an empty "
                         f"'{uri_column}' (first at row {int(empty.idxmax())})")
    uris = [u if ("://" in u or u.startswith("/")) else base.join(u).uri for u in raw_uris]
    if manifest.is_s3 and not allow_local_paths:
        local = [u for u in uris if not u.startswith("s3://")]
        if local:
            raise ValueError(f"manifest '{manifest_uri}' names {len(local)} local path(s), e.g. "
                             f"'{local[0]}': a manifest in object storage may name only s3:// "
                             "objects or keys relative to its folder (--allow-local-paths to "
                             "opt in)")
    table = table.assign(uri=uris)
    if "label" in table.columns:
        raw = table["label"].astype("string").str.strip().str.lower()
        table["label"] = raw.map(_LABEL_ALIASES)
        bad = raw[table["label"].isna() & raw.notna() & (raw != "")]
        if len(bad):
            raise ValueError(f"manifest '{manifest_uri}' has labels outside {LABELS}: "
                             f"{sorted(bad.unique())[:5]}")
    if "split" in table.columns and not set(table["split"].dropna().unique()) <= set(SPLITS):
        table = table.drop(columns="split")  # e.g. a 'dev' tag, not a train/val/test split
    return normalise_index(table)


def normalise_index(table: pd.DataFrame) -> pd.DataFrame:
    out = pd.DataFrame({"uri": table["uri"].astype(str)})
    out["label"] = table["label"].astype(object).where(table["label"].notna(), None) \
        if "label" in table.columns else None
    out["patient_id"] = table["patient_id"].astype(str) if "patient_id" in table.columns else None
    # Patients merged through near-duplicate images ('split_group') are the unit of splitting.
    if "split_group" in table.columns:
        out["group"] = table["split_group"].astype(str)
    elif "group" in table.columns:  # an index written back out (e.g. a run's splits)
        out["group"] = table["group"].astype(str)
    else:
        out["group"] = out["patient_id"] if "patient_id" in table.columns else out["uri"]
    out["split"] = table["split"].astype(object) if "split" in table.columns else None
    out["source"] = table["source"].astype(str) if "source" in table.columns else "unknown"
    out["copy"] = 0
    extra = [c for c in table.columns if c not in out.columns and c not in _URI_COLUMNS
             and c != "split_group"]
    return pd.concat([out, table[extra].reset_index(drop=True)], axis=1) if extra else out


def unit_hash(seed: int, key: str) -> float:
    """:func:`covidray.config.seeded_hash` as a number in [0, 1)."""
    return seeded_hash(seed, key) / 2**64


def assign_splits(index: pd.DataFrame, val_fraction: float, test_fraction: float,
                  seed: int) -> pd.DataFrame:
    """Give rows without a split a deterministic, patient-disjoint train/val/test split.

    Groups (patients) are stratified by their majority label and ordered by a seeded
    hash; the first ``test_fraction`` of each class go to test, the next ``val_fraction``
    to val. Rows that already carry a split keep it.
    """
    index = index.copy()
    todo = index["split"].isna()
    if not todo.any():
        return index
    groups = index[todo].groupby("group")["label"].agg(
        lambda s: s.mode().iloc[0] if s.notna().any() else "")
    assignment: dict[str, str] = {}
    for _, members in groups.groupby(groups):
        ordered = sorted(members.index, key=lambda g: unit_hash(seed, g))
        n_test = int(round(test_fraction * len(ordered)))
        n_val = int(round(val_fraction * len(ordered)))
        for position, group in enumerate(ordered):
            assignment[group] = ("test" if position < n_test
                                 else "val" if position < n_test + n_val else "train")
    index.loc[todo, "split"] = index.loc[todo, "group"].map(assignment)
    return index


def grow_class(index: pd.DataFrame, label: str, target: int) -> pd.DataFrame:
    """Add augmented copies (``copy`` >= 1) of ``label`` rows until the class has ``target`` rows.

    Copies are spread evenly over the originals and stay with them (same group/split).
    """
    originals = index[(index["label"] == label) & (index["copy"] == 0)]
    missing = target - len(originals)
    if missing <= 0 or originals.empty:
        return index
    rounds = math.ceil(missing / len(originals))
    copies = []
    for copy in range(1, rounds + 1):
        take = originals.head(min(len(originals), missing - (copy - 1) * len(originals)))
        copies.append(take.assign(copy=copy))
    return pd.concat([index, *copies], ignore_index=True)


def load_pixels(batch: dict, storage: Storage, augmenter=None, io_threads: int = 8,
                views: str = "frontal") -> dict:
    """Fetch, decode and preprocess a batch of index rows.

    Adds ``pixels`` (``uint8[N, 224, 224]``), ``target`` (class index), ``error`` (``""``
    when the row loaded, else the reason) and :data:`LOADED_COLUMNS`: the DICOM tags and the
    view check (empty strings where there is nothing to say), and the image's profile
    (:mod:`covidray.profile`; NaN and ``""`` where it did not load). A row that fails keeps
    all-zero pixels so the batch stays rectangular; consumers act on ``error``.
    Rows with ``copy`` >= 1 are augmented by ``augmenter``. With ``views="frontal"`` a
    lateral view (DICOM ``ViewPosition``) is an error row, "lateral view skipped".

    A batch that carries the listing's ``etag`` and ``size`` leaves with those of the bytes
    actually read (the GET's), and ``changed``: whether they differ from the listing's.
    """
    if views not in VIEW_POLICIES:
        raise ValueError(f"views must be one of {VIEW_POLICIES}, not '{views}'")
    uris = [str(u) for u in batch["uri"]]
    copies = batch.get("copy", np.zeros(len(uris), dtype=np.int64))
    blank = {**dict.fromkeys(_TAG_COLUMNS, ""), **empty_profile()}
    budget = DecodeBudget()

    def one(i: int) -> dict:
        try:
            data, etag = storage.read_with_etag(uris[i])  # rides out transient errors itself
        except StorageOutage:
            raise  # storage is down, not this image unreadable: the run fails, publishes nothing
        except Exception as exc:  # missing object, permissions
            return {**blank, "error": f"read failed: {type(exc).__name__}: {exc}"}
        found = {**blank, "read": (etag, len(data))}
        try:
            with budget.holding(declared_pixels(data)):  # bounded by pixels, not images
                return decoded(data, found, i)
        except DecodeError as exc:
            return {**found, "error": str(exc)}
        except Exception as exc:
            return {**found, "error": f"preprocessing failed: {type(exc).__name__}: {exc}"}

    def decoded(data: bytes, found: dict, i: int) -> dict:
        image, tags = decode_with_tags(data)
        found.update({c: tags[c] for c in DICOM_COLUMNS})
        pixels = to_input_pixels(image)
        lateral, note = view_check(tags["view_position"], pixels)
        found.update(view_check=note, **image_profile(
            image.width, image.height, tags["bit_depth"], tags["photometric"], pixels))
        if lateral and views == "frontal":
            return {**found, "error": f"{note} skipped: the model reads frontal views"}
        if augmenter is not None and int(copies[i]) > 0:
            pixels = to_input_pixels(augmenter(image, uris[i], int(copies[i])))
        return {**found, "pixels": pixels, "error": ""}

    with ThreadPoolExecutor(max_workers=max(1, min(io_threads, len(uris)))) as pool:
        results = list(pool.map(one, range(len(uris))))
    pixels = np.zeros((len(uris), INPUT_SIZE, INPUT_SIZE), dtype=np.uint8)
    for i, result in enumerate(results):
        if "pixels" in result:
            pixels[i] = result["pixels"]
    out = dict(batch)
    out["pixels"] = pixels
    out["target"] = label_index(batch["label"]) if "label" in batch else np.full(len(uris), -1)
    out["error"] = np.asarray([r["error"] for r in results], dtype=object)
    for column in LOADED_COLUMNS:
        out[column] = np.asarray([r[column] for r in results],
                                 dtype=np.float64 if column in NUMBERS else object)
    if "etag" in batch:
        _with_read_identity(out, [r.get("read") for r in results])
    return out


def _with_read_identity(out: dict, read: list) -> None:
    """The rows' ``etag``/``size`` become those of the bytes read where a row was read;
    ``changed`` marks a row whose object was rewritten since it was listed."""
    listed_etag, listed_size = np.asarray(out["etag"], dtype=object), np.asarray(out["size"])
    etag, size = listed_etag.copy(), listed_size.astype(np.int64).copy()
    for i, identity in enumerate(read):
        if identity is not None:
            etag[i], size[i] = identity
    out["changed"] = (listed_etag != UNKNOWN_ETAG) & ((etag != listed_etag) | (size != listed_size))
    out["etag"], out["size"] = etag, size


def loaded_batches(storage: Storage, uris: list[str], batch: int = 64, views: str = "all"):
    """:func:`load_pixels` over ``uris``, ``batch`` at a time: the one batched loader of the
    driver's own passes (export's parity and calibration images, evaluate's saliency and
    audit, the benchmarks), loading exactly as scoring loads."""
    for i in range(0, len(uris), batch):
        yield load_pixels({"uri": np.asarray(uris[i:i + batch], dtype=object)}, storage,
                          views=views)


def pixels_of(storage: Storage, uris: list[str], readable_only: bool = False) -> np.ndarray:
    """The recipe's ``uint8[N, 224, 224]`` for each image of ``uris`` (an unreadable one is
    all zeros, or with ``readable_only`` left out)."""
    parts = [loaded["pixels"][(loaded["error"] == "") if readable_only else slice(None)]
             for loaded in loaded_batches(storage, list(uris))]
    return np.concatenate(parts) if parts else np.zeros((0, INPUT_SIZE, INPUT_SIZE), np.uint8)


def split_rows(splits: pd.DataFrame, split: str) -> pd.DataFrame:
    """One split of a run's ``splits.parquet`` (original images only, never augmented
    copies), as the archive rows a scoring manifest needs."""
    rows = splits[(splits["split"] == split) & (splits["copy"] == 0)][ARCHIVE_COLUMNS]
    if rows.empty:
        raise ValueError(f"the run has no '{split}' images: train with a --{split}-fraction > 0")
    return rows
