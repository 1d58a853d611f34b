"""Stratified k-fold data sets for the study's cross-validation runs.

The trainer takes its data from a path, so fold ``i`` is written as a pack (:mod:`ferlab.data.pack`) holding the
base data's train rows minus fold ``i`` (split ``train``) and its val rows (``val``); no test rows, which a fold
model never needs in training. A fold model is thus trained on k-1 folds, selected on the untouched val split, and
reported (from the base data) on its held-out fold (the cross-validation estimate) and on test. Files are written
once, atomically, and reused.

A fold's data fingerprint is derived from the base data's fingerprint and the fold's definition, not from the
file's bytes, and the folds depend only on the base data's train rows and labels. So FER2013 with or without its
PrivateTest rows (a pack that travelled to a GPU holds only Training and PublicTest, under the CSV's fingerprint)
gives the same folds under the same fingerprints, and a fold run trained there is recognised here (``ferlab study
--adopt``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ferlab.data.pack import write_pack
from ferlab.data.splits import stratified_kfold, train_val_test
from ferlab.data.types import FerData

FOLD_PRESET = 1  # xz preset of fold files: they stay on the machine, so speed over size


def fold_indices(data: FerData, k: int, *, val_fraction: float = 0.1, split_seed: int = 0,
                 seed: int = 0) -> tuple[dict[str, np.ndarray], list[tuple[np.ndarray, np.ndarray]]]:
    """The base split (train/val/test row indices of ``data``) and k (train, held-out) row-index pairs of train."""
    base = train_val_test(data, val_fraction=val_fraction, seed=split_seed)
    train = base["train"][data.labels[base["train"]] >= 0]
    pairs = stratified_kfold(data.labels[train], k, seed=seed)
    return base, [(train[tr], train[ho]) for tr, ho in pairs]


def fold_fingerprint(base_fingerprint: str, k: int, fold: int, *, val_fraction: float = 0.1,
                     split_seed: int = 0) -> str:
    """The data fingerprint of fold ``fold`` (0-based) of ``k`` of the data fingerprinted ``base_fingerprint``."""
    spec = f"{base_fingerprint}|fold {fold + 1} of {k}|val_fraction {val_fraction:g}|split_seed {split_seed}"
    return hashlib.sha256(spec.encode()).hexdigest()[:16]


def fold_file_name(base_fingerprint: str, k: int, fold: int, *, val_fraction: float = 0.1,
                   split_seed: int = 0) -> str:
    """The file name of fold ``fold`` (0-based) of ``k``."""
    return f"{base_fingerprint[:12]}-v{val_fraction:g}-s{split_seed}-k{k}-fold{fold + 1}.ferpack"


def write_fold(data: FerData, path: str | Path, train_idx: np.ndarray, val_idx: np.ndarray,
               fingerprint: str) -> Path:
    """Write the labelled rows ``train_idx`` (as train) and ``val_idx`` (as val) of ``data`` as a pack at
    ``path`` that loads with ``fingerprint`` (see :func:`fold_fingerprint`); skipped when it already exists."""
    path = Path(path)
    if path.is_file():
        return path
    train, val = (r[data.labels[r] >= 0] for r in (train_idx, val_idx))
    fold = data.subset(np.concatenate([train, val]))
    # carved val rows are train rows of the source: mark each part as what it is for the fold
    fold.split = np.array(["train"] * len(train) + ["val"] * len(val))
    fold.fingerprint = fingerprint
    write_pack(fold, path, ("train", "val"), preset=FOLD_PRESET)
    return path


@dataclass(frozen=True)
class Fold:
    """Fold ``index`` of a study's k-fold split: its training and held-out rows, its fingerprint and file name."""

    index: int
    train: np.ndarray  # row indices of the base data
    held_out: np.ndarray
    fingerprint: str
    file_name: str


def study_folds(data: FerData, k: int, *, val_fraction: float = 0.1,
                split_seed: int = 0) -> tuple[dict[str, np.ndarray], list[Fold]]:
    """The base split of ``data`` and its k folds, as the study and a GPU machine both cut them."""
    base, pairs = fold_indices(data, k, val_fraction=val_fraction, split_seed=split_seed)
    spec = {"val_fraction": val_fraction, "split_seed": split_seed}
    return base, [Fold(i, tr, ho, fold_fingerprint(data.fingerprint, k, i, **spec),
                       fold_file_name(data.fingerprint, k, i, **spec)) for i, (tr, ho) in enumerate(pairs)]
