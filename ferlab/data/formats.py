"""Loaders for every FER data layout, with row-level validation and a parse cache: the public entry point.

Layouts (see :func:`detect_layout`):

* ``fer2013-csv``: Kaggle ``fer2013.csv`` (or ``.csv.gz``), header ``emotion,pixels,Usage``.
* ``icml-csv``: ``icml_face_data.csv``, header ``emotion, Usage, pixels``.
* ``course-csv``: ``train.csv`` (``label,feature``) + ``test.csv`` (``id,feature``, unlabelled).
* ``image-folder``: ``<root>/<split>/<class>/*.png|jpg|jpeg|bmp|webp``.

A ``*.ferpack`` file (:mod:`ferlab.data.pack`) loads as the rows of the source it was packed from, cached like the
other layouts.

The layouts themselves live in :mod:`ferlab.data.csv_layouts`, :mod:`ferlab.data.csv_parse` and
:mod:`ferlab.data.image_folder`; this module works out which one a path holds and loads it through the cache.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ferlab.data import cache as _cache
from ferlab.data.csv_layouts import _classify_csv, _CsvSpec
from ferlab.data.csv_parse import CHUNK_ROWS as CHUNK_ROWS
from ferlab.data.csv_parse import N_PIXELS as N_PIXELS
from ferlab.data.csv_parse import _load_csvs
from ferlab.data.errors import DataError, DataWarning, _error
from ferlab.data.image_folder import (
    _CLASS_DIRS,
    _SPLIT_DIRS,
    IMAGE_EXTENSIONS,
    _ImageItem,
    _load_image_folder,
    _scan_image_folder,
    _subdirs,
)
from ferlab.data.image_folder import MAX_IMAGE_PIXELS as MAX_IMAGE_PIXELS
from ferlab.data.pack import is_pack, pack_info, read_pack
from ferlab.data.types import IMAGE_SIZE, FerData

__all__ = ["LAYOUTS", "DataError", "DataWarning", "detect_layout", "load_data"]

logger = logging.getLogger(__name__)

LAYOUTS: tuple[str, ...] = ("fer2013-csv", "icml-csv", "course-csv", "image-folder")
# the files a data folder's CSV layouts are read from
DATA_FILE_NAMES: tuple[str, ...] = tuple(f"{name}{gz}" for gz in ("", ".gz")
                                         for name in ("train.csv", "test.csv", "fer2013.csv", "icml_face_data.csv"))
PACK_LAYOUT = "ferlab-pack"  # how a pack is found and cached; it loads with its source's layout
# IMAGE_SIZE, N_PIXELS, CHUNK_ROWS, IMAGE_EXTENSIONS and MAX_IMAGE_PIXELS can still be imported from here, but each
# lives in the module that uses it: to change one (e.g. in a test), patch it there.


# --------------------------------------------------------------------------------------------------------------------
# Layout detection


@dataclass
class _Source:
    layout: str
    path: Path  # what the user pointed at (resolved)
    csvs: list[_CsvSpec] = field(default_factory=list)
    root: Path | None = None  # image folder root
    notes: list[str] = field(default_factory=list)


def _sibling(directory: Path, *names: str) -> Path | None:
    """The first file in ``directory`` whose lower-cased name is in ``names`` (in that order)."""
    try:
        files = {p.name.lower(): p for p in directory.iterdir() if p.is_file()}
    except OSError:
        return None
    for n in names:
        if n in files:
            return files[n]
    return None


def _course_pair(train: Path | None, test: Path | None) -> _Source | None:
    specs = [_classify_csv(p) for p in (train, test) if p is not None]
    if not specs or any(s.layout != "course-csv" for s in specs):
        return None
    return _Source("course-csv", (train or test).parent, specs)  # type: ignore[union-attr]


def _looks_like_image_folder(path: Path) -> bool:
    """A split directory, or (flat ``<root>/<class>/`` layout) at least half the subdirectories named as classes.

    Not all: one misspelled class directory must still reach the class check, which names it.
    """
    names = [d.name.strip().lower() for d in _subdirs(path)]
    if any(n in _SPLIT_DIRS for n in names):
        return True
    n_class = sum(n in _CLASS_DIRS for n in names)
    return n_class > 0 and 2 * n_class >= len(names)


def _csv_files(directory: Path) -> list[Path]:
    """The ``*.csv`` and ``*.csv.gz`` files directly in ``directory``, sorted by name."""
    try:
        return sorted(
            (f for f in directory.iterdir() if f.is_file() and f.name.lower().endswith((".csv", ".csv.gz"))),
            key=lambda f: f.name.lower(),
        )
    except OSError:
        return []


def _describe_csvs(files: list[Path], limit: int = 5) -> str:
    """``"train.csv (fer2013-csv), notes.csv (unrecognised header)"``: each file with its detected layout."""
    parts = []
    for f in files[:limit]:
        try:
            what = _classify_csv(f).layout
        except DataError as e:  # keep only the problem (not the path), cut short
            where = f"{e.path} line {e.line}" if e.line is not None else f"{e.path}"
            problem = str(e).removeprefix(f"{where}: ").split(";", 1)[0]
            what = problem if len(problem) <= 60 else f"{problem[:57]}..."
        parts.append(f"{f.name} ({what})")
    if len(files) > limit:
        parts.append(f"and {len(files) - limit} more")
    return ", ".join(parts)


def _resolve(path: str | os.PathLike[str]) -> _Source:
    """Work out the layout of ``path`` and the files it involves."""
    p = Path(path).expanduser()
    if is_pack(p):
        pack_info(p)  # a missing, unreadable or foreign file fails here, naming the problem
        return _Source(PACK_LAYOUT, p.resolve())
    if not p.exists():
        raise _error(path, "no such file or directory")
    p = p.resolve()
    if p.is_dir():
        train = _sibling(p, "train.csv", "train.csv.gz")
        test = _sibling(p, "test.csv", "test.csv.gz")
        pair = [s for s in (train, test) if s is not None]
        specs = [_classify_csv(f) for f in pair]
        if specs and all(s.layout == "course-csv" for s in specs):
            return _Source("course-csv", p, specs)
        single = _sibling(p, "fer2013.csv", "fer2013.csv.gz", "icml_face_data.csv", "icml_face_data.csv.gz")
        if single is not None:
            spec = _classify_csv(single)
            return _Source(spec.layout, p, [spec])
        if _looks_like_image_folder(p):
            return _Source("image-folder", p, root=p)
        if specs:
            found = " and ".join(f"{s.path.name} ({s.layout})" for s in specs)
            raise _error(
                path,
                f"cannot tell the data layout of this directory: found {found}, not a course "
                f"train.csv/test.csv pair (headers 'label,feature' and 'id,feature'); pass the file itself, "
                f"e.g. {specs[0].path}",
            )
        csvs = _csv_files(p)
        if csvs:
            raise _error(
                path,
                f"cannot tell the data layout of this directory: found {_describe_csvs(csvs)}; only fer2013.csv, "
                f"icml_face_data.csv and course train.csv/test.csv are picked up by name, so pass the file itself, "
                f"e.g. {csvs[0]}",
            )
        raise _error(
            path,
            "cannot tell the data layout of this directory: expected fer2013.csv[.gz], icml_face_data.csv, "
            "course train.csv/test.csv, or image folders <split>/<class>/*.png (split: train/val/test)",
        )
    if p.suffix.lower() in IMAGE_EXTENSIONS:
        raise _error(path, "is a single image; pass the folder holding <split>/<class>/ image directories")
    spec = _classify_csv(p)
    if spec.layout == "course-csv":
        name = p.name.lower()
        if "label" in spec.cols and name.startswith("train.csv"):
            other = _sibling(p.parent, "test.csv", "test.csv.gz")
            pair = _course_pair(p, other) if other is not None else None
            if pair is not None:
                return pair
        elif "label" not in spec.cols and name.startswith("test.csv"):
            other = _sibling(p.parent, "train.csv", "train.csv.gz")
            pair = _course_pair(other, p) if other is not None else None
            if pair is not None:
                return pair
    return _Source(spec.layout, p, [spec])


def detect_layout(path: str | os.PathLike[str]) -> str:
    """The layout of ``path``: "fer2013-csv", "icml-csv", "course-csv" or "image-folder".

    CSV layouts are told apart by their header (not by file name). Raises DataError if ``path`` is missing
    or no layout fits. A ``*.ferpack`` (see :mod:`ferlab.data.pack`) has the layout of the source it was packed from.
    """
    if is_pack(path):
        return pack_info(path)["source"]["layout"]
    return _resolve(path).layout


# --------------------------------------------------------------------------------------------------------------------
# Entry point


def _report_skipped(data: FerData, cached: bool) -> None:
    if data.n_skipped:
        how = " (cached parse)" if cached else ""
        what = "unreadable image(s)" if data.layout == "image-folder" else "malformed row(s)"
        msg = f"{data.source}: skipped {data.n_skipped} {what}{how}; see FerData.notes"
        logger.info(msg)
        warnings.warn(msg, DataWarning, stacklevel=3)


def load_data(
    path: str | os.PathLike[str],
    *,
    skip_bad: bool = False,
    cache: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> FerData:
    """Load any supported FER layout from ``path`` into a validated :class:`FerData`.

    Every row/image is checked (2304 integer pixels in 0..255, label 0..6, known Usage); a bad one raises
    DataError naming the file and line, or is skipped (counted in ``n_skipped``, described in ``notes``, warned
    about) when ``skip_bad``. Parsed arrays are cached under ``cache_dir`` (default: ``$FERLAB_CACHE_DIR``,
    ``$XDG_CACHE_HOME/ferlab`` or ``~/.cache/ferlab``), keyed by size, mtime, content hash, ``skip_bad``
    and format version.
    """
    t0 = time.perf_counter()
    src = _resolve(path)
    items: list[_ImageItem] = []
    digests: dict[Path, str] = {}
    if src.layout == "image-folder":
        assert src.root is not None
        items, scan_notes = _scan_image_folder(src.root)
        src.notes.extend(scan_notes)
        files: list[Any] = [(it.rel, it.size, it.mtime_ns) for it in items]
    elif src.layout == PACK_LAYOUT:  # keyed on its content: a changed pack is read (and checked) again
        digests[src.path] = _cache.sha256_file(src.path)
        files = [(src.path.name, src.path.stat().st_size, src.path.stat().st_mtime_ns, digests[src.path])]
    else:
        for spec in src.csvs:
            if spec.path.stat().st_size == 0:
                raise _error(spec.path, "file is empty")
            digests[spec.path] = _cache.sha256_file(spec.path)
        # keyed on size, mtime and content hash: a touched file is re-parsed, an edited one always is
        files = [(spec.path.name, spec.path.stat().st_size, spec.path.stat().st_mtime_ns, digests[spec.path])
                 for spec in src.csvs]
    key = _cache.make_key({"layout": src.layout, "skip_bad": bool(skip_bad), "files": files})
    entry: Path | None = None
    if cache:
        source_id = hashlib.sha256(f"{src.path}|{src.layout}|{bool(skip_bad)}".encode()).hexdigest()
        entry = _cache.entry_path(_cache.resolve_cache_dir(cache_dir), src.path.name, source_id, key)
        hit = _cache.load_entry(entry, key, (IMAGE_SIZE, IMAGE_SIZE))
        if hit is not None:
            hit.source = str(src.path)
            logger.info("loaded %s from cache %s in %.2f s", src.path, entry, time.perf_counter() - t0)
            _report_skipped(hit, cached=True)
            return hit
    if src.layout == "image-folder":
        assert src.root is not None
        data = _load_image_folder(src.root, src.path, items, src.notes, skip_bad, progress)
    elif src.layout == PACK_LAYOUT:
        data = read_pack(src.path)
    else:
        data = _load_csvs(src.path, src.layout, src.csvs, src.notes, digests, skip_bad, progress)
    elapsed = time.perf_counter() - t0
    log = logger.info if progress else logger.debug
    log("parsed %s (%s): %d rows in %.1f s", src.path, src.layout, len(data), elapsed)
    if entry is not None and _cache.save_entry(entry, key, data):
        _cache.prune_entries(entry)
    _report_skipped(data, cached=False)
    return data
