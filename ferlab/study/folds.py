"""Stratified k-fold data sets for the study's cross-validation runs.

The trainer takes its data from a path, so fold ``i`` is written as a FER2013-layout CSV holding the base data's
train rows minus fold ``i`` (Usage ``Training``), its val rows (``PublicTest``) and its test rows
(``PrivateTest``). A fold model is thus trained on k-1 folds, selected on the untouched val split, and reported on
its held-out fold (the cross-validation estimate) and on test. Files are written once, deterministically
(gzip without a time stamp), atomically, and reused.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from ferlab.checkpoint import atomic_write
from ferlab.data.splits import stratified_kfold, train_val_test
from ferlab.data.types import FerData

USAGE = {"train": "Training", "val": "PublicTest", "test": "PrivateTest"}


def fold_indices(data: FerData, k: int, *, val_fraction: float = 0.1, split_seed: int = 0,
                 seed: int = 0) -> tuple[dict[str, np.ndarray], list[tuple[np.ndarray, np.ndarray]]]:
    """The base split (train/val/test row indices of ``data``) and k (train, held-out) row-index pairs of train."""
    base = train_val_test(data, val_fraction=val_fraction, seed=split_seed)
    train = base["train"][data.labels[base["train"]] >= 0]
    pairs = stratified_kfold(data.labels[train], k, seed=seed)
    return base, [(train[tr], train[ho]) for tr, ho in pairs]


def _csv_lines(images: np.ndarray, labels: np.ndarray, usage: list[str], chunk: int = 2048):
    """The CSV text in chunks of ``chunk`` rows (bytes), header first."""
    yield b"emotion,pixels,Usage\n"
    for start in range(0, len(images), chunk):
        rows = zip(images[start:start + chunk], labels[start:start + chunk], usage[start:start + chunk], strict=True)
        yield "".join(f"{int(y)},{' '.join(map(str, img.ravel().tolist()))},{u}\n" for img, y, u in rows).encode()


def write_fold(data: FerData, path: str | Path, train_idx: np.ndarray, val_idx: np.ndarray,
               test_idx: np.ndarray) -> Path:
    """Write the rows as a fer2013.csv.gz-layout file at ``path`` (skipped when it already exists)."""
    path = Path(path)
    if path.is_file():
        return path
    rows = [(train_idx, USAGE["train"]), (val_idx, USAGE["val"]), (test_idx, USAGE["test"])]
    rows = [(r[data.labels[r] >= 0], u) for r, u in rows]  # labelled rows only
    idx = np.concatenate([r for r, _ in rows])
    usage = [u for r, u in rows for _ in range(len(r))]

    def write(tmp: str) -> None:
        # no file name and no time stamp in the gzip header: the same rows give the same bytes
        with open(tmp, "wb") as raw, gzip.GzipFile(filename="", fileobj=raw, mode="wb", compresslevel=1,
                                                   mtime=0) as gz:
            for block in _csv_lines(data.images[idx], data.labels[idx], usage):
                gz.write(block)

    atomic_write(path, write)
    return path
