"""One entry point to data: a path in any supported layout, or the embedded synthetic faces."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ferlab.data.splits import train_val_test
from ferlab.data.types import FerData


def open_data(
    path: str | None, *, skip_bad: bool = False, synthetic: dict[str, Any] | None = None, progress: bool = True
) -> FerData:
    """Load ``path`` (see :func:`ferlab.data.formats.load_data`); ``None`` gives the embedded synthetic set."""
    if path is None:
        from ferlab.data.synthetic import make_synthetic

        return make_synthetic(**(synthetic or {}))
    from ferlab.data.formats import load_data

    return load_data(path, skip_bad=skip_bad, progress=progress)


def data_for(meta: dict[str, Any], data_path: str | None, progress: bool = True) -> FerData:
    """The data to evaluate on: ``data_path`` if given, else the data the checkpoint was trained on."""
    if data_path is not None:
        return open_data(data_path, progress=progress)
    d = meta["data"]
    if d["path"] is None:
        return open_data(None, synthetic=d.get("synthetic") or {})
    if not Path(d["path"]).exists():
        raise FileNotFoundError(f"the training data {d['path']} is not there any more; pass --data PATH")
    return open_data(d["path"], progress=progress)


def split_rows(data: FerData, meta: dict[str, Any], split: str) -> np.ndarray:
    """Row indices of ``split`` under the checkpoint's own split protocol."""
    s = meta["split"]
    idx = train_val_test(data, val_fraction=s["val_fraction"], seed=s["split_seed"])[split]
    idx = idx[data.labels[idx] >= 0]
    if not len(idx):
        raise ValueError(f"{data.source}: split {split!r} has no labelled rows"
                         + ("; try --split val" if split == "test" else ""))
    return idx
