"""The image-folder layout: ``<root>/<split>/<class>/*.png|jpg|jpeg|bmp|webp`` (or ``<root>/<class>/``)."""

from __future__ import annotations

import difflib
import hashlib
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ferlab.data.errors import _error
from ferlab.data.streams import _progress_bar
from ferlab.data.types import IMAGE_SIZE, SPLIT_TEST, SPLIT_TRAIN, SPLIT_VAL, SPLITS, FerData
from ferlab.images import DEFAULT_MAX_PIXELS, IMAGE_EXTS, ImageError, decode_gray

IMAGE_EXTENSIONS = frozenset(IMAGE_EXTS)  # the one list of ferlab.images
MAX_IMAGE_PIXELS = DEFAULT_MAX_PIXELS  # image-folder files whose header claims more pixels are refused (bombs)

# Image-folder directory names (case-insensitive).
_SPLIT_DIRS = {
    "train": SPLIT_TRAIN,
    "training": SPLIT_TRAIN,
    "val": SPLIT_VAL,
    "valid": SPLIT_VAL,
    "validation": SPLIT_VAL,
    "publictest": SPLIT_VAL,
    "test": SPLIT_TEST,
    "privatetest": SPLIT_TEST,
}
_CLASS_DIRS = {
    "angry": 0,
    "anger": 0,
    "disgust": 1,
    "disgusted": 1,
    "fear": 2,
    "fearful": 2,
    "scared": 2,
    "happy": 3,
    "happiness": 3,
    "joy": 3,
    "sad": 4,
    "sadness": 4,
    "surprise": 5,
    "surprised": 5,
    "neutral": 6,
    "calm": 6,
}


def _subdirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith((".", "__")))


@dataclass
class _ImageItem:
    rel: str
    path: Path
    split: int
    label: int
    size: int
    mtime_ns: int


def _natural_key(name: str) -> list[Any]:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def _scan_class_dir(root: Path, d: Path, split: int, label: int, items: list[_ImageItem], ignored: list[str]) -> None:
    entries = sorted(os.scandir(d), key=lambda e: _natural_key(e.name))
    for e in entries:
        if e.name.startswith("."):
            continue
        if e.is_file() and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS:
            st = e.stat()
            items.append(
                _ImageItem(
                    Path(e.path).relative_to(root).as_posix(), Path(e.path), split, label, st.st_size, st.st_mtime_ns
                )
            )
        else:
            ignored.append(Path(e.path).relative_to(root).as_posix())


def _class_of(d: Path) -> int:
    label = _CLASS_DIRS.get(d.name.strip().lower())
    if label is None:
        close = difflib.get_close_matches(d.name.strip().lower(), _CLASS_DIRS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise _error(d, f"unknown class directory {d.name!r} ({hint}expected one of: {', '.join(_CLASS_DIRS)})")
    return label


def _scan_image_folder(root: Path) -> tuple[list[_ImageItem], list[str]]:
    """List the images under ``root`` (sorted by split, class, natural file name) plus notes."""
    items: list[_ImageItem] = []
    ignored: list[str] = []
    notes: list[str] = []
    dirs = _subdirs(root)
    split_dirs: list[tuple[int, Path]] = []
    if any(d.name.strip().lower() in _SPLIT_DIRS for d in dirs):
        for d in dirs:
            code = _SPLIT_DIRS.get(d.name.strip().lower())
            if code is None:
                raise _error(d, f"unknown split directory {d.name!r} (expected one of: {', '.join(_SPLIT_DIRS)})")
            split_dirs.append((code, d))
    else:  # <root>/<class>/ only: one split, named after root if root's name is a split name
        code = _SPLIT_DIRS.get(root.name.strip().lower(), SPLIT_TRAIN)
        split_dirs.append((code, root))
        notes.append(f"no split directories; all images are {SPLITS[code]!r}")
    ignored += [f.name for f in root.iterdir() if f.is_file() and not f.name.startswith(".")]
    for code, split_dir in sorted(split_dirs, key=lambda t: (t[0], t[1].name)):
        if split_dir != root:
            ignored += [
                f.relative_to(root).as_posix()
                for f in split_dir.iterdir()
                if f.is_file() and not f.name.startswith(".")
            ]
        classes = sorted(((_class_of(c), c) for c in _subdirs(split_dir)), key=lambda t: (t[0], t[1].name))
        for label, c in classes:
            _scan_class_dir(root, c, code, label, items, ignored)
    if ignored:
        notes.append(f"ignored {len(ignored)} non-image or misplaced entries (e.g. {ignored[0]})")
    if not items:
        raise _error(root, "no images found (expected <split>/<class>/*.png|jpg|jpeg|bmp|webp)")
    return items, notes


def _read_image(path: Path) -> tuple[np.ndarray | None, bytes, str]:
    """(gray image or None, sha256 digest of the file bytes, error text): :func:`ferlab.images.decode_gray`,
    which refuses an image whose header claims over ``MAX_IMAGE_PIXELS`` (a decompression bomb) undecoded."""
    try:
        data = path.read_bytes()
    except OSError as e:
        return None, b"", f"cannot read ({e})"
    digest = hashlib.sha256(data).digest()
    try:
        return decode_gray(data, MAX_IMAGE_PIXELS), digest, ""
    except ImageError as e:
        text = str(e)  # a header that cannot be parsed is reported as undecodable, like the pixels
        plain = text.startswith(("cannot decode", "empty file")) or "decompression bomb" in text
        return None, digest, text if plain else f"cannot decode image ({text})"


def _load_image_folder(
    root: Path, path: Path, items: list[_ImageItem], notes: list[str], skip_bad: bool, progress: bool
) -> FerData:
    import cv2

    n = len(items)
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    keep = np.ones(n, bool)
    hasher = hashlib.sha256()
    sizes: dict[tuple[int, int], int] = {}
    skipped: list[str] = []
    workers = max(1, min(8, os.cpu_count() or 1))
    pool = ThreadPoolExecutor(workers)
    try:
        with _progress_bar(n, f"reading {root.name}", progress, "img") as bar:
            for i, (img, digest, err) in enumerate(pool.map(_read_image, [it.path for it in items])):
                bar.update(1)
                hasher.update(items[i].rel.encode() + b"\0" + digest)
                if img is None:
                    if not skip_bad:
                        raise _error(items[i].path, f"{err} (--skip-bad, or skip_bad=True, skips unreadable images)")
                    keep[i] = False
                    skipped.append(f"{items[i].rel}: {err}")
                    continue
                if img.shape != (IMAGE_SIZE, IMAGE_SIZE):
                    sizes[img.shape[:2]] = sizes.get(img.shape[:2], 0) + 1
                    img = cv2.resize(img, (IMAGE_SIZE, IMAGE_SIZE), interpolation=cv2.INTER_AREA)
                images[i] = img
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    notes = [*notes, f"image-folder: {int(keep.sum())} images from {root}"]
    if sizes:
        shown = ", ".join(f"{h}x{w} ({k})" for (h, w), k in sorted(sizes.items(), key=lambda t: -t[1])[:5])
        notes.append(f"resized {sum(sizes.values())} images to 48x48 with cv2.INTER_AREA; sizes (h x w): {shown}")
    if skipped:
        more = f"; and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        notes.append(f"skipped {len(skipped)} unreadable image(s) ({'; '.join(skipped[:5])}{more})")
    if not keep.any():
        raise _error(root, f"no readable images ({len(skipped)} unreadable skipped)")
    idx = np.flatnonzero(keep)
    return FerData(
        images=images[idx],
        labels=np.array([items[i].label for i in idx], np.int64),
        split=np.asarray(SPLITS)[np.array([items[i].split for i in idx], np.int64)],
        ids=idx.astype(np.int64),
        source=str(path),
        layout="image-folder",
        fingerprint=hasher.hexdigest()[:16],
        n_skipped=len(skipped),
        notes=notes,
    )

