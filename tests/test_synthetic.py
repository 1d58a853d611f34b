"""The embedded synthetic faces: format, splits, determinism, and that expressions are drawn."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from ferlab import CLASS_NAMES
from ferlab.data.synthetic import (
    CLASS_WEIGHTS,
    SYNTHETIC_VERSION,
    make_synthetic,
    synthetic_fingerprint,
)
from ferlab.data.types import FerData

HAPPY, SAD, DISGUST = CLASS_NAMES.index("Happy"), CLASS_NAMES.index("Sad"), CLASS_NAMES.index("Disgust")


@pytest.fixture(scope="module")
def small() -> FerData:
    return make_synthetic(210, 70, 70, seed=0)


def test_format(small: FerData) -> None:
    assert isinstance(small, FerData)
    assert small.images.shape == (350, 48, 48) and small.images.dtype == np.uint8
    assert small.labels.shape == (350,) and small.labels.dtype == np.int64
    assert small.labels.min() >= 0 and small.labels.max() <= 6
    assert small.ids.dtype == np.int64 and np.array_equal(small.ids, np.arange(350))
    assert set(np.unique(small.split)) == {"train", "val", "test"}
    assert small.layout == "synthetic"
    assert small.source == "synthetic:seed=0"
    assert small.class_names == CLASS_NAMES
    # the full gray range is used, not a sliver of it
    assert small.images.min() < 40 and small.images.max() > 215


def test_split_sizes_and_order(small: FerData) -> None:
    assert len(small.indices("train")) == 210
    assert len(small.indices("val")) == 70
    assert len(small.indices("test")) == 70
    assert np.array_equal(small.indices("train"), np.arange(210))  # rows: train, val, test
    d = make_synthetic(14, 0, 7, seed=1)
    assert len(d) == 21 and len(d.indices("val")) == 0 and len(d.indices("test")) == 7


def test_all_classes_in_every_split(small: FerData) -> None:
    for split in ("train", "val", "test"):
        assert set(small.labels[small.indices(split)]) == set(range(7)), split
    tiny = make_synthetic(7, 7, 7, seed=3)
    for split in ("train", "val", "test"):
        assert sorted(tiny.labels[tiny.indices(split)]) == list(range(7))


def test_class_balance_disgust_rarer() -> None:
    counts = np.bincount(make_synthetic(7000, 0, 0, seed=0).labels[:7000], minlength=7)
    expected = 7000 * CLASS_WEIGHTS / CLASS_WEIGHTS.sum()
    assert np.all(np.abs(counts - expected) <= 1)
    others = np.delete(counts, DISGUST)
    assert 0.3 < counts[DISGUST] / others.mean() < 0.5


def test_deterministic_same_seed(small: FerData) -> None:
    again = make_synthetic(210, 70, 70, seed=0)
    assert np.array_equal(small.images, again.images)
    assert np.array_equal(small.labels, again.labels)
    assert np.array_equal(small.split, again.split)
    assert small.fingerprint == again.fingerprint


def test_deterministic_across_thread_counts(small: FerData) -> None:
    before = cv2.getNumThreads()
    try:
        cv2.setNumThreads(1)
        single = make_synthetic(210, 70, 70, seed=0)
    finally:
        cv2.setNumThreads(before)
    assert np.array_equal(small.images, single.images)


def test_other_seed_differs(small: FerData) -> None:
    other = make_synthetic(210, 70, 70, seed=1)
    assert not np.array_equal(small.images, other.images)
    assert not np.array_equal(small.labels, other.labels)
    assert other.source == "synthetic:seed=1"
    assert other.fingerprint != small.fingerprint


def test_difficulty_changes_output(small: FerData) -> None:
    easy = make_synthetic(210, 70, 70, seed=0, difficulty=0.5)
    assert np.array_equal(easy.labels, small.labels)  # same labels, different faces
    assert not np.array_equal(easy.images, small.images)
    assert easy.fingerprint != small.fingerprint
    assert "difficulty=0.5" in easy.source
    make_synthetic(7, 7, 7, difficulty=0.0)
    make_synthetic(7, 7, 7, difficulty=2.0)


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        make_synthetic(-1, 10, 10)
    with pytest.raises(ValueError):
        make_synthetic(10, 10, 10, difficulty=-0.5)
    with pytest.raises(ValueError):
        make_synthetic(10, 10, 10, difficulty=float("nan"))


def test_images_not_constant(small: FerData) -> None:
    std = small.images.reshape(len(small), -1).astype(np.float64).std(axis=1)
    assert std.min() > 5.0
    # no two images are the same
    assert len({im.tobytes() for im in small.images}) == len(small)


def test_fingerprint_stable() -> None:
    fp = synthetic_fingerprint(7000, 1400, 1400, 0, 1.0)
    assert fp == synthetic_fingerprint(7000, 1400, 1400, 0, 1.0)
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert SYNTHETIC_VERSION == 1 and fp == "0a33beb5dc00fb6a"  # changes only with SYNTHETIC_VERSION
    assert fp != synthetic_fingerprint(7000, 1400, 1400, 1, 1.0)
    assert fp != synthetic_fingerprint(7000, 1400, 1400, 0, 2.0)
    assert make_synthetic(7, 7, 7, seed=5).fingerprint == synthetic_fingerprint(7, 7, 7, 5, 1.0)


def test_expressions_are_drawn() -> None:
    """Mean Happy and Sad faces differ in the mouth region, far beyond sampling noise (two halves of Happy)."""
    d = make_synthetic(1400, 0, 0, seed=0, difficulty=0.5)
    x = d.images.astype(np.float64)
    happy, sad = x[d.labels == HAPPY], x[d.labels == SAD]
    mouth = (slice(30, 42), slice(14, 34))
    between = np.abs(happy.mean(0) - sad.mean(0))[mouth].mean()
    within = np.abs(happy[::2].mean(0) - happy[1::2].mean(0))[mouth].mean()
    assert between > 2.5 * within, (between, within)
    # and the difference is concentrated on the mouth, not spread evenly over the image
    assert between > 1.5 * np.abs(happy.mean(0) - sad.mean(0))[:10, :].mean()
