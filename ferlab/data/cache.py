"""On-disk cache of parsed FER data: uncompressed ``.npz`` entries, written atomically, keyed by content hash.

Key choice: the key hashes the *content* of the source file(s) (SHA-256 of the bytes on disk, about 0.1 s for the
94 MB ``fer2013.csv.gz`` with hardware SHA), their sizes and modification times, the layout, ``skip_bad`` and
``FORMAT_VERSION``; the content hash catches every edit, the modification time makes a touched file re-parse too.
Image folders are keyed on the sorted ``(relative path, size, mtime_ns)`` list instead (hashing
35k small files on every load would be slow); their content hash is stored inside the entry as the fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from ferlab.data.types import SPLITS, FerData

__all__ = [
    "FORMAT_VERSION",
    "default_cache_dir",
    "entry_path",
    "load_entry",
    "make_key",
    "prune_entries",
    "resolve_cache_dir",
    "save_entry",
    "sha256_file",
]

# Bump whenever the parsed arrays or the entry layout change: old entries then simply miss.
FORMAT_VERSION = 1
IMAGE_SHAPE: tuple[int, int] = (48, 48)  # (height, width) of every cached image

logger = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """``$FERLAB_CACHE_DIR``, else ``$XDG_CACHE_HOME/ferlab``, else ``~/.cache/ferlab``."""
    env = os.environ.get("FERLAB_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "ferlab"
    return Path.home() / ".cache" / "ferlab"


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The explicit ``cache_dir`` if given, else :func:`default_cache_dir`."""
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def make_key(parts: dict[str, Any]) -> str:
    """Hex SHA-256 of the canonical JSON of ``parts`` plus ``FORMAT_VERSION``."""
    blob = json.dumps({"format_version": FORMAT_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _safe_name(name: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return keep.strip(".")[:64] or "data"


def entry_path(cache_dir: Path, name: str, source_id: str, key: str) -> Path:
    """Where the entry for ``key`` lives: ``<name>-<source_id[:8]>-<key[:24]>.npz``.

    ``source_id`` identifies the source path (and options), so stale entries of the same source can be pruned.
    """
    return Path(cache_dir) / f"{_safe_name(name)}-{source_id[:8]}-{key[:24]}.npz"


def _check_meta(meta: dict[str, Any]) -> None:
    """Check an entry's metadata field by field; ValueError names the first damaged one."""
    for name in ("source", "layout", "fingerprint"):
        if not isinstance(meta.get(name), str):
            raise ValueError(f"metadata {name!r} is {meta.get(name)!r:.80}, not a string")
    for name in ("class_names", "notes"):
        value = meta.get(name)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"metadata {name!r} is {value!r:.80}, not a list of strings")
    n_skipped = meta.get("n_skipped")
    if type(n_skipped) is not int or n_skipped < 0:
        raise ValueError(f"metadata 'n_skipped' is {n_skipped!r:.80}, not a count")


def load_entry(path: Path, key: str, image_shape: tuple[int, int] = IMAGE_SHAPE) -> FerData | None:
    """The cached FerData at ``path``, or None if absent, stale or unreadable (a damaged file warns and is removed).

    Damaged means unreadable, malformed metadata, or arrays of the wrong type, shape (images not
    ``(N, *image_shape)``) or length.
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with open(path, "rb") as f, np.load(f, allow_pickle=False) as z:  # closed even if np.load fails
            meta = json.loads(str(z["meta"][()]))
            if not isinstance(meta, dict):
                raise ValueError(f"metadata is a JSON {type(meta).__name__}, not an object")
            if meta.get("key") != key or meta.get("format_version") != FORMAT_VERSION:
                logger.debug("cache entry %s has another key; ignoring it", path)
                return None
            _check_meta(meta)
            images = z["images"]
            labels = z["labels"]
            codes = z["split"]
            ids = z["ids"]
        if images.dtype != np.uint8 or images.ndim != 3 or tuple(images.shape[1:]) != tuple(image_shape):
            raise ValueError(f"images are {images.dtype}{images.shape}, expected uint8 (N, {image_shape[0]}, "
                             f"{image_shape[1]})")
        if codes.dtype != np.uint8 or labels.dtype.kind not in "iu" or ids.dtype.kind not in "iu":
            raise ValueError(f"unexpected array types: labels {labels.dtype}, split {codes.dtype}, ids {ids.dtype}")
        n = len(images)
        if any(a.shape != (n,) for a in (labels, codes, ids)):
            raise ValueError(f"labels {labels.shape}, split {codes.shape}, ids {ids.shape} for {n} images")
        if len(codes) and int(codes.max()) >= len(SPLITS):
            raise ValueError("split code out of range")
        if len(labels) and (int(labels.min()) < -1 or int(labels.max()) >= len(meta["class_names"])):
            raise ValueError("label out of range")
        return FerData(
            images=images,
            labels=labels.astype(np.int64, copy=False),
            split=np.asarray(SPLITS)[codes],
            ids=ids.astype(np.int64, copy=False),
            source=meta["source"],
            layout=meta["layout"],
            fingerprint=meta["fingerprint"],
            class_names=tuple(meta["class_names"]),
            n_skipped=meta["n_skipped"],
            notes=list(meta["notes"]),
        )
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as e:  # a damaged file: rebuild it
        warnings.warn(f"ignoring unreadable cache file {path} ({type(e).__name__}: {e}); re-parsing", stacklevel=3)
        try:
            path.unlink()
        except OSError:
            pass
        return None


def save_entry(path: Path, key: str, data: FerData) -> bool:
    """Write ``data`` to ``path`` atomically (temp file + ``os.replace``). Returns False (with a warning) on failure."""
    path = Path(path)
    codes = np.zeros(len(data), np.uint8)
    for i, name in enumerate(SPLITS):
        codes[data.split == name] = i
    meta = {
        "key": key,
        "format_version": FORMAT_VERSION,
        "source": data.source,
        "layout": data.layout,
        "fingerprint": data.fingerprint,
        "class_names": list(data.class_names),
        "n_skipped": int(data.n_skipped),
        "notes": list(data.notes),
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            np.savez(
                f,
                images=np.ascontiguousarray(data.images, dtype=np.uint8),
                labels=np.asarray(data.labels, np.int64),
                split=codes,
                ids=np.asarray(data.ids, np.int64),
                meta=np.array(json.dumps(meta)),
            )
        os.replace(tmp, path)
        return True
    except OSError as e:
        warnings.warn(f"could not write cache file {path} ({e}); continuing without cache", stacklevel=3)
        try:
            tmp.unlink()
        except OSError:
            pass
        return False


def prune_entries(keep: Path) -> int:
    """Remove other entries of the same source (same name and source id prefix) than ``keep``; returns how many."""
    keep = Path(keep)
    stem = keep.name.rsplit("-", 1)[0]  # "<name>-<source_id8>"
    removed = 0
    try:
        for other in keep.parent.glob(f"{stem}-*.npz"):
            if other.name != keep.name and other.name.rsplit("-", 1)[0] == stem:
                other.unlink()
                removed += 1
    except OSError as e:
        logger.debug("could not prune cache entries next to %s: %s", keep, e)
    return removed
