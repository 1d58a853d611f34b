"""Faces to explain: image files (any size, converted to 48x48 grey) or ``data:SPLIT[:N]`` rows of a model's data."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

DATA_PREFIX = "data:"
SPLITS = ("train", "val", "test")
DEFAULT_DATA_COUNT = 16


@dataclass
class Faces:
    """images (N, 48, 48) uint8, labels (N,) int (-1: unknown), one display name per face."""

    images: np.ndarray
    labels: np.ndarray
    names: list[str]

    @property
    def labelled(self) -> bool:
        return bool(len(self.labels)) and bool((self.labels >= 0).all())

    def __len__(self) -> int:
        return len(self.images)


def face_from_file(path: str | Path, size: tuple[int, int] = (48, 48)) -> np.ndarray:
    """Read any image file (checked by ``ferlab.images``), convert to grey and resize: (H, W) uint8.

    No face detection: crop the face first (or use ``ferlab predict``) for photos with background.
    """
    import cv2

    from ferlab.images import read_image

    bgr = read_image(path)  # (h, w, 3) uint8; FileNotFoundError / ImageError naming the file
    gray = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    interp = cv2.INTER_AREA if gray.shape[0] > size[0] else cv2.INTER_LINEAR
    return cv2.resize(gray, (size[1], size[0]), interpolation=interp)


def parse_data_spec(spec: str) -> tuple[str, int | None]:
    """``data:SPLIT[:N]`` -> (split, N or None)."""
    parts = spec[len(DATA_PREFIX):].split(":")
    if not 1 <= len(parts) <= 2 or parts[0] not in SPLITS or (len(parts) == 2 and not parts[1].isdigit()):
        raise ValueError(f"bad data spec {spec!r}: expected data:SPLIT[:N] with SPLIT one of {', '.join(SPLITS)} "
                         "and N a whole number, e.g. data:test:64")
    return parts[0], int(parts[1]) if len(parts) == 2 else None


def data_faces(meta: dict[str, Any], split: str, rows: Sequence[int] | slice, data_path: str | None = None) -> Faces:
    """Faces of ``split`` (under the checkpoint's own split protocol) of ``data_path``, by default the data the
    model was trained on (a shipped model needs ``data_path``: it was trained on the user's copy of FER2013)."""
    from ferlab.data.source import data_for, split_rows

    data = data_for(meta, data_path, progress=False)
    idx = split_rows(data, meta, split, hint="; try data:val[:N]")
    pos = np.arange(len(idx))[rows]  # positions within the split; IndexError when out of range
    pick = idx[pos]
    return Faces(np.asarray(data.images[pick], dtype=np.uint8), np.asarray(data.labels[pick], dtype=np.int64),
                 [f"{split}-{int(i)}" for i in pos])


def load_faces(specs: Sequence[str], meta: dict[str, Any], default_count: int = DEFAULT_DATA_COUNT,
               data_path: str | None = None) -> Faces:
    """Image files and ``data:SPLIT[:N]`` specs (the first N faces of that split; default ``default_count``)."""
    parts: list[Faces] = []
    for spec in specs:
        if spec.startswith(DATA_PREFIX):
            split, n = parse_data_spec(spec)
            parts.append(data_faces(meta, split, slice(0, default_count if n is None else n), data_path))
        else:
            img = face_from_file(spec)
            parts.append(Faces(img[None], np.array([-1]), [Path(spec).stem]))
    if not parts or not sum(len(p) for p in parts):
        raise ValueError("no faces to explain: give image files or data:SPLIT[:N] to --images")
    return Faces(np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts]),
                 [n for p in parts for n in p.names])


def load_one_face(spec: str, meta: dict[str, Any], data_path: str | None = None) -> Faces:
    """One face: an image file or ``data:SPLIT:I`` (row I of that split)."""
    if spec.startswith(DATA_PREFIX):
        split, i = parse_data_spec(spec)
        i = 0 if i is None else i
        try:
            return data_faces(meta, split, [i], data_path)
        except IndexError:
            raise ValueError(f"{spec}: split {split!r} has fewer than {i + 1} labelled faces") from None
    img = face_from_file(spec)
    return Faces(img[None], np.array([-1]), [Path(spec).stem])
