"""Train/val/test index splits and stratified k-fold, all seeded and deterministic."""

from __future__ import annotations

import logging
import warnings

import numpy as np

from ferlab.data.types import FerData

__all__ = ["stratified_kfold", "train_val_test"]

logger = logging.getLogger(__name__)


def _sorted(idx: np.ndarray) -> np.ndarray:
    return np.sort(np.asarray(idx, dtype=np.int64))


def _carve_val(pool: np.ndarray, labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split row indices ``pool`` into (train, val), stratified by ``labels`` (aligned with ``pool``).

    Unlabelled rows (label -1) and rows of classes with a single member stay in train; if stratification is
    impossible (e.g. fewer val rows than classes) a plain seeded shuffle split is used, with a warning.
    """
    from sklearn.model_selection import ShuffleSplit, StratifiedShuffleSplit

    classes, counts = np.unique(labels[labels >= 0], return_counts=True)
    eligible = np.isin(labels, classes[counts >= 2])
    cand, y = pool[eligible], labels[eligible]
    fixed = pool[~eligible]
    if len(cand) < 2:
        return pool, np.empty(0, np.int64)
    try:
        sss = StratifiedShuffleSplit(n_splits=1, test_size=val_fraction, random_state=seed)
        tr, va = next(sss.split(np.zeros(len(cand)), y))
    except ValueError as e:
        warnings.warn(f"stratified val split impossible ({e}); using a plain shuffle split", stacklevel=3)
        tr, va = next(ShuffleSplit(n_splits=1, test_size=val_fraction, random_state=seed).split(cand))
    return np.concatenate([cand[tr], fixed]), cand[va]


def train_val_test(data: FerData, *, val_fraction: float = 0.1, seed: int = 0) -> dict[str, np.ndarray]:
    """Row indices for "train", "val" and "test" (sorted int64 arrays).

    If the source assigns "val" rows (FER2013: Training/PublicTest/PrivateTest) its split is used as is.
    Otherwise a stratified ``val_fraction`` of the "train" rows becomes val (seeded); test is the source's
    "test" rows (possibly empty). "unlabeled" rows are in none of the three.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    train, val, test = data.indices("train"), data.indices("val"), data.indices("test")
    if len(val) == 0 and val_fraction > 0 and len(train) > 1:
        train, val = _carve_val(train, np.asarray(data.labels)[train], val_fraction, seed)
        logger.info(
            "carved a stratified val split of %d rows from %d train rows (seed %d)",
            len(val),
            len(train) + len(val),
            seed,
        )
    return {"train": _sorted(train), "val": _sorted(val), "test": _sorted(test)}


def stratified_kfold(labels: np.ndarray, k: int, *, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """``k`` (train, val) index pairs from sklearn's StratifiedKFold(shuffle=True, random_state=seed)."""
    from sklearn.model_selection import StratifiedKFold

    if k < 2:
        raise ValueError(f"k must be at least 2, got {k}")
    y = np.asarray(labels)
    folds = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(np.zeros(len(y)), y)
    return [(_sorted(tr), _sorted(va)) for tr, va in folds]
