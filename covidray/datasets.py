"""Labelled X-ray collections: the index of images and its patient-level splits.

A collection is either a manifest (CSV or Parquet; one row per image) or a prefix laid
out as ``<prefix>/<label>/<file>``. Either way it becomes an *index*: a DataFrame with
the columns in :data:`INDEX_COLUMNS`. :func:`covidray.imaging.loader.load_pixels` turns a
batch of index rows into model input pixels.
"""

from __future__ import annotations

import math

import pandas as pd

from covidray.config import seeded_hash
from covidray.imaging.decode import IMAGE_SUFFIXES
from covidray.labels import LABELS
from covidray.storage import Location, Storage, StorageError

SPLITS = ("train", "val", "test")
INDEX_COLUMNS = ("uri", "label", "patient_id", "group", "split", "source", "copy")
ARCHIVE_COLUMNS = ["uri", "label", "source", "group"]  # what an index row carries to outputs
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


def split_rows(splits: pd.DataFrame, split: str) -> pd.DataFrame:
    """One split of a run's ``splits.parquet`` (original images only, never augmented
    copies), as the archive rows a scoring manifest needs."""
    rows = splits[(splits["split"] == split) & (splits["copy"] == 0)][ARCHIVE_COLUMNS]
    if rows.empty:
        raise ValueError(f"the run has no '{split}' images: train with a --{split}-fraction > 0")
    return rows
