"""Kaggle-style submissions (``id,label``) for unlabelled test files."""

from __future__ import annotations

import csv
from pathlib import Path

import torch

from ferlab.data.formats import DATA_FILE_NAMES
from ferlab.data.source import open_data
from ferlab.inference.loader import load_model


def predict_csv(checkpoint: str | Path, data_path: str, out: str | Path, *, split: str = "unlabeled",
                tta: bool | str = False, precision: str = "auto") -> int:
    """Predict the rows of ``split`` in ``data_path`` and write ``id,label`` to ``out``; returns the row count.
    ``checkpoint`` may name a shipped ensemble. ``precision``: see
    :func:`ferlab.inference.loader.checkpoint_precision`."""
    if Path(out).is_dir():  # checked before the work, not after it
        raise ValueError(f"--out {out} is a directory; name the CSV file to write, e.g. {Path(out) / 'submission.csv'}")
    target, src = Path(out), Path(data_path)
    if target.is_file() and ((src.is_file() and target.samefile(src))
                             or (src.is_dir() and target.resolve().parent == src.resolve()
                                 and target.name in DATA_FILE_NAMES)):
        raise ValueError(f"--out {out} is {'the data file' if src.is_file() else 'a data file of the folder'} "
                         f"{data_path}; writing it would destroy it: name another file")
    model = load_model(checkpoint)
    data = open_data(data_path)
    idx = data.indices(split)
    if not len(idx):
        have = sorted(set(data.split.tolist()))
        raise ValueError(f"{data.source} has no rows in split {split!r} (it has {', '.join(have)}); use --split")
    x = torch.from_numpy(data.images[idx]).unsqueeze(1)  # (N, 1, 48, 48) uint8
    pred = model.probabilities(x, tta=tta, progress=True, precision=precision).argmax(1)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "label"])
        w.writerows(zip(data.ids[idx].tolist(), pred.tolist(), strict=True))
    return len(idx)
