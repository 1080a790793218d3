"""Indexes, patient-level splits, class growth and augmentation."""

import os
import random

import numpy as np
import pandas as pd
import pytest

from covidray.augment import AugmentConfig, Augmenter
from covidray.datasets import assign_splits, grow_class, manifest_to_index
from covidray.labels import label_index
from covidray.synthetic import synthetic_xray

from conftest import SHARED_CXR


def manifest(n_patients=40, images_per_patient=3):
    rows = []
    for patient in range(n_patients):
        label = "covid" if patient % 4 == 0 else "non_covid"
        for image in range(images_per_patient):
            rows.append({"file": f"{label}/p{patient}-{image}.png", "label": label,
                         "patient_id": f"p{patient}"})
    return pd.DataFrame(rows)


def test_manifest_paths_resolve_against_its_folder():
    index = manifest_to_index(manifest(2, 1), "s3://bucket/data/manifest.csv")
    assert index["uri"].tolist() == ["s3://bucket/data/covid/p0-0.png",
                                     "s3://bucket/data/non_covid/p1-0.png"]
    assert index["group"].tolist() == ["p0", "p1"]


def test_manifest_label_aliases_and_bad_labels():
    table = pd.DataFrame({"uri": ["/a.png", "/b.png", "/c.png"],
                          "label": ["COVID-19", "normal", None]})
    assert manifest_to_index(table, "/m.csv")["label"].tolist() == ["covid", "non_covid", None]
    with pytest.raises(ValueError, match="labels outside"):
        manifest_to_index(pd.DataFrame({"uri": ["/a.png"], "label": ["pneumonia"]}), "/m.csv")


def test_manifest_without_image_column_is_refused():
    with pytest.raises(ValueError, match="needs one of the columns"):
        manifest_to_index(pd.DataFrame({"label": ["covid"]}), "/m.csv")


def test_splits_are_patient_disjoint_deterministic_and_stratified():
    index = manifest_to_index(manifest(), "/data/manifest.csv")
    first = assign_splits(index, 0.2, 0.2, seed=3)
    again = assign_splits(index, 0.2, 0.2, seed=3)
    assert first["split"].tolist() == again["split"].tolist()
    assert first.groupby("patient_id")["split"].nunique().max() == 1
    for split in ("train", "val", "test"):
        assert set(first.loc[first["split"] == split, "label"]) == {"covid", "non_covid"}


def test_existing_train_val_test_column_is_kept():
    table = manifest(4, 1).assign(split=["test", "train", "val", "train"])
    index = assign_splits(manifest_to_index(table, "/m.csv"), 0.5, 0.5, seed=0)
    assert index["split"].tolist() == ["test", "train", "val", "train"]


def test_grow_class_reaches_target_and_copies_stay_with_original():
    index = assign_splits(manifest_to_index(manifest(), "/m.csv"), 0.2, 0.2, seed=0)
    train = index[index["split"] == "train"]
    grown = grow_class(train, "covid", 50)
    assert (grown["label"] == "covid").sum() == 50
    copies = grown[grown["copy"] > 0]
    originals = train.set_index("uri")
    assert (copies["group"].to_numpy() == originals.loc[copies["uri"], "group"].to_numpy()).all()
    assert (grown["label"] == "non_covid").sum() == (train["label"] == "non_covid").sum()


def test_label_index_maps_positive_class_to_one():
    assert label_index(["covid", "non_covid", None]).tolist() == [1, 0, -1]


def test_augmentation_is_repeatable_per_image_and_copy():
    image = synthetic_xray(True, np.random.default_rng(0))
    augmenter = Augmenter(AugmentConfig(rotate_probability=1, crop_probability=1), seed=11)
    state = random.getstate()
    a = np.asarray(augmenter(image, "s3://b/x.png", 1))
    b = np.asarray(augmenter(image, "s3://b/x.png", 1))
    c = np.asarray(augmenter(image, "s3://b/x.png", 2))
    assert random.getstate() == state  # the caller's random state is untouched
    assert np.array_equal(a, b)
    assert a.shape != c.shape or not np.array_equal(a, c)


def test_augmentation_is_repeatable_when_threads_augment_at_once():
    # load_pixels augments a batch's images in a thread pool, and Augmentor draws from the
    # process-wide random state: concurrent images must not draw from each other's seeds.
    from concurrent.futures import ThreadPoolExecutor

    image = synthetic_xray(True, np.random.default_rng(0))
    augmenter = Augmenter(AugmentConfig(), seed=11)
    jobs = [(f"s3://b/x-{i % 24}.png", 1 + i // 24) for i in range(96)]
    alone = [np.asarray(augmenter(image, uri, copy)) for uri, copy in jobs]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda job: np.asarray(augmenter(image, *job)), jobs))
    assert all(np.array_equal(a, t) for a, t in zip(alone, together))


@pytest.mark.skipif(not os.path.exists(os.path.join(SHARED_CXR, "metadata.csv")),
                    reason="shared real chest X-ray set not present")
def test_real_metadata_splits_by_split_group():
    index = manifest_to_index(pd.read_csv(os.path.join(SHARED_CXR, "metadata.csv")),
                              os.path.join(SHARED_CXR, "metadata.csv"))
    split = assign_splits(index, 0.15, 0.15, seed=0)
    assert split.groupby("group")["split"].nunique().max() == 1
    # patients are never split either, since split_group merges them
    assert split.groupby("patient_id")["split"].nunique().max() == 1
    assert set(split["split"]) == {"train", "val", "test"}
