"""One entry point to data: a path in any supported layout, or the embedded synthetic faces."""

from __future__ import annotations

from collections.abc import Sequence
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


def label_source(meta: dict[str, Any], labels: str | None = None) -> str:
    """The label source to judge a checkpoint by: ``labels`` if given, else the one it was trained on ("fer2013":
    the data's own; FER+: the votes file it recorded if still there, else "ferplus", found beside the data)."""
    if labels is not None:
        return labels
    rec = meta.get("labels")
    if not rec:
        return "fer2013"
    return rec["file"] if Path(rec["file"]).is_file() else "ferplus"


def data_for(meta: dict[str, Any], data_path: str | None, progress: bool = True, labels: str | None = None,
             skip_bad: bool | None = None) -> FerData:
    """The data to evaluate on: ``data_path`` if given, else the data the checkpoint was trained on; labelled by
    :func:`label_source`. ``skip_bad``: skip malformed rows (None: as the checkpoint's training run did)."""
    from ferlab.data.ferplus import apply_labels

    d = meta["data"]
    if data_path is None and d["path"] is None:  # the synthetic faces (FER+ labels refused with a clear error)
        return apply_labels(open_data(None, synthetic=d.get("synthetic") or {}), label_source(meta, labels), None)[0]
    path = data_path if data_path is not None else d["path"]
    if data_path is None and not Path(path).exists():
        raise FileNotFoundError(f"the training data {d['path']} is not there any more; pass --data PATH")
    if skip_bad is None:
        skip_bad = bool(meta.get("train", {}).get("skip_bad", False))
    return apply_labels(open_data(path, skip_bad=skip_bad, progress=progress), label_source(meta, labels), path)[0]


def same_pixels(meta: dict[str, Any], data: FerData) -> bool:
    """Whether ``data`` holds the images the checkpoint was trained on, under either label source (a FER+ model
    scored on FER2013's labels, or the other way round, is scored on its own training file)."""
    from ferlab.data.ferplus import relabelled_fingerprint

    trained = meta["data"]["fingerprint"]
    pixels = data.pixels_fingerprint or data.fingerprint
    seen = {data.fingerprint, pixels}
    if meta.get("labels", {}).get("sha256"):
        seen.add(relabelled_fingerprint(pixels, meta["labels"]["sha256"]))
    return trained in seen


def split_rows(data: FerData, meta: dict[str, Any], split: str, hint: str = "; try --split val") -> np.ndarray:
    """Row indices of ``split`` under the checkpoint's own split protocol; ``hint``: how the caller's user names
    the val split instead, added to the error when ``split`` is an empty test split."""
    s = meta["split"]
    idx = train_val_test(data, val_fraction=s["val_fraction"], seed=s["split_seed"])[split]
    idx = idx[data.labels[idx] >= 0]
    if not len(idx):
        raise ValueError(f"{data.source}: split {split!r} has no labelled rows" + (hint if split == "test" else ""))
    return idx


def shared_classes(data: FerData, idx: np.ndarray, model_classes: Sequence[str]) -> tuple[np.ndarray, int, str]:
    """Rows ``idx`` scored on the classes the model and the labels share: (rows, model outputs kept, a note).

    The labels' classes and the model's must be equal or one a prefix of the other (FER2013's 7, FER+'s 8)."""
    model_classes, label_classes = list(model_classes), list(data.class_names)
    k = min(len(model_classes), len(label_classes))
    if model_classes[:k] != label_classes[:k]:
        raise ValueError(f"the model predicts {', '.join(model_classes)} but {data.source} is labelled "
                         f"{', '.join(label_classes)}")
    if len(label_classes) > k:  # e.g. a FER2013 model against FER+ labels: leave out the faces of extra classes
        kept = idx[data.labels[idx] < k]
        extra = ", ".join(label_classes[k:])
        return kept, k, f"{len(idx) - len(kept)} faces labelled {extra} left out: the model has no such class"
    if len(model_classes) > k:
        return idx, k, f"the model's {', '.join(model_classes[k:])} output dropped: the labels have no such class"
    return idx, k, ""
