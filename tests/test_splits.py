"""train_val_test and stratified_kfold (ferlab.data.splits)."""

from __future__ import annotations

import numpy as np
import pytest

from ferlab.data.splits import stratified_kfold, train_val_test
from ferlab.data.types import FerData


def make_data(split: list[str], labels: np.ndarray | None = None, seed: int = 0) -> FerData:
    n = len(split)
    rng = np.random.default_rng(seed)
    if labels is None:
        labels = rng.integers(0, 7, n)
    return FerData(
        images=np.zeros((n, 48, 48), np.uint8),
        labels=np.asarray(labels, np.int64),
        split=np.asarray(split),
        ids=np.arange(n, dtype=np.int64),
    )


def check_partition(parts: dict[str, np.ndarray]) -> None:
    assert set(parts) == {"train", "val", "test"}
    for idx in parts.values():
        assert idx.dtype == np.int64 and (np.diff(idx) > 0).all()
    together = np.concatenate(list(parts.values()))
    assert len(np.unique(together)) == len(together)  # disjoint


def test_source_val_split_used_as_is():
    split = ["train"] * 50 + ["val"] * 10 + ["test"] * 12 + ["unlabeled"] * 3
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(split))
    data = make_data([split[i] for i in perm])
    parts = train_val_test(data, val_fraction=0.3, seed=5)
    check_partition(parts)
    for name in ("train", "val", "test"):
        np.testing.assert_array_equal(parts[name], np.flatnonzero(data.split == name))


def test_carves_stratified_val_from_train():
    labels = np.repeat(np.arange(7), [200, 20, 100, 300, 150, 80, 150])
    split = ["train"] * len(labels)
    split[::10] = ["test"] * len(split[::10])
    data = make_data(split, labels)
    data.split[5] = "unlabeled"
    data.labels[5] = -1
    pool = np.flatnonzero(data.split == "train")
    parts = train_val_test(data, val_fraction=0.2, seed=0)
    check_partition(parts)
    np.testing.assert_array_equal(np.union1d(parts["train"], parts["val"]), pool)
    np.testing.assert_array_equal(parts["test"], np.flatnonzero(data.split == "test"))
    assert abs(len(parts["val"]) - 0.2 * len(pool)) <= 1
    # class proportions preserved (stratified)
    want = np.bincount(labels[pool], minlength=7) * 0.2
    got = np.bincount(labels[parts["val"]], minlength=7)
    assert np.abs(got - want).max() <= 1.5
    # deterministic in the seed, different across seeds
    np.testing.assert_array_equal(train_val_test(data, val_fraction=0.2, seed=0)["val"], parts["val"])
    assert not np.array_equal(train_val_test(data, val_fraction=0.2, seed=1)["val"], parts["val"])


def test_no_test_rows_gives_empty_test():
    parts = train_val_test(make_data(["train"] * 70), val_fraction=0.1)
    check_partition(parts)
    assert len(parts["test"]) == 0 and len(parts["val"]) == 7


def test_rare_class_and_tiny_val_do_not_crash():
    labels = np.array([0] * 30 + [1] * 30 + [2])  # class 2 has a single member: it stays in train
    parts = train_val_test(make_data(["train"] * len(labels), labels), val_fraction=0.1, seed=3)
    check_partition(parts)
    assert 60 in parts["train"] and len(parts["val"]) >= 6
    with pytest.warns(UserWarning, match="plain shuffle"):  # 1 val row for 7 classes: cannot stratify
        parts = train_val_test(make_data(["train"] * 14, np.arange(14) % 7), val_fraction=0.05)
    assert len(parts["val"]) == 1 and len(parts["train"]) == 13


def test_val_fraction_validated_and_zero_means_no_val():
    data = make_data(["train"] * 20)
    assert len(train_val_test(data, val_fraction=0.0)["val"]) == 0
    with pytest.raises(ValueError):
        train_val_test(data, val_fraction=1.0)


def test_stratified_kfold():
    labels = np.repeat(np.arange(7), [50, 10, 40, 60, 30, 20, 40])
    folds = stratified_kfold(labels, 5, seed=2)
    assert len(folds) == 5
    vals = np.concatenate([va for _, va in folds])
    np.testing.assert_array_equal(np.sort(vals), np.arange(len(labels)))  # each row validated exactly once
    for tr, va in folds:
        assert tr.dtype == va.dtype == np.int64
        assert len(np.intersect1d(tr, va)) == 0 and len(tr) + len(va) == len(labels)
        assert np.abs(np.bincount(labels[va], minlength=7) - np.bincount(labels, minlength=7) / 5).max() <= 1
    again = stratified_kfold(labels, 5, seed=2)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(folds, again, strict=True))
    other = stratified_kfold(labels, 5, seed=3)
    assert not all(np.array_equal(a[1], b[1]) for a, b in zip(folds, other, strict=True))
    with pytest.raises(ValueError):
        stratified_kfold(labels, 1)
