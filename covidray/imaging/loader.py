"""Loading images for a Ray Data pipeline: a batch of index rows -> the recipe's pixels.

:func:`load_pixels` fetches, decodes and preprocesses rows; it is the function every
pipeline maps over batches (training, feature extraction and scoring alike), and
:func:`loaded_batches` the one loader of the driver's own passes. A row that fails keeps its
reason in ``error``. A scoring batch leaves with the identity (ETag, size) of the bytes
actually read.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from covidray.imaging.decode import decode_with_tags, declared_pixels
from covidray.imaging.dicom import DICOM_COLUMNS
from covidray.imaging.pixels import DecodeBudget, DecodeError
from covidray.imaging.profile import NUMBERS, PROFILE_COLUMNS, empty_profile, image_profile
from covidray.imaging.recipe import INPUT_SIZE, to_input_pixels
from covidray.imaging.views import VIEW_POLICIES, view_check
from covidray.labels import label_index
from covidray.storage import Storage, StorageOutage

_TAG_COLUMNS = [*DICOM_COLUMNS, "view_check"]
LOADED_COLUMNS = [*_TAG_COLUMNS, *PROFILE_COLUMNS]  # what loading an image adds to its row
UNKNOWN_ETAG, UNKNOWN_SIZE = "", -1  # not known (yet): a manifest row without them
LARGE_BLOCK_BYTES = 1 << 20


def return_large_blocks_to_the_os() -> None:
    """Decoded images are large and short-lived. glibc keeps what a thread frees in that
    thread's arena and, once a large block was freed, serves blocks up to 32 MB from the
    arenas too: with 8 loading threads a worker kept up to 8 images' worth of memory. A
    fixed mmap threshold maps every block of 1 MB or more on its own and unmaps it when
    freed, so a worker's memory follows the images it holds (elsewhere than glibc: no-op)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, LARGE_BLOCK_BYTES)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


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
    return_large_blocks_to_the_os()  # this process's policy, set before its threads decode
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
