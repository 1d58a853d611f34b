"""Loaders for every FER data layout, with row-level validation and a parse cache.

Layouts (see :func:`detect_layout`):

* ``fer2013-csv``: Kaggle ``fer2013.csv`` (or ``.csv.gz``), header ``emotion,pixels,Usage``.
* ``icml-csv``: ``icml_face_data.csv``, header ``emotion, Usage, pixels``.
* ``course-csv``: ``train.csv`` (``label,feature``) + ``test.csv`` (``id,feature``, unlabelled).
* ``image-folder``: ``<root>/<split>/<class>/*.png|jpg|jpeg|bmp|webp``.

CSV parsing has a vectorised fast path (pandas for the CSV structure, a byte-level numpy parser for the pixels,
checks done per chunk in aggregate). Only if a chunk fails those checks is the file re-read row by row with the
``csv`` module, which finds the first bad line (or, with ``skip_bad``, every bad line) and names it.
"""

from __future__ import annotations

import csv
import difflib
import functools
import gzip
import hashlib
import io
import logging
import os
import queue
import re
import threading
import time
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from ferlab import CLASS_NAMES
from ferlab.data import cache as _cache
from ferlab.data.types import SPLITS, FerData
from ferlab.recognize.images import DEFAULT_MAX_PIXELS, ImageError, one_line, probe

__all__ = ["LAYOUTS", "DataError", "DataWarning", "detect_layout", "load_data"]

logger = logging.getLogger(__name__)

LAYOUTS: tuple[str, ...] = ("fer2013-csv", "icml-csv", "course-csv", "image-folder")
IMAGE_SIZE = 48
N_PIXELS = IMAGE_SIZE * IMAGE_SIZE
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp"})
CHUNK_ROWS = 512  # rows per vectorised chunk (about 4 MB of pixel text): keeps temporaries in cache
MAX_IMAGE_PIXELS = DEFAULT_MAX_PIXELS  # image-folder files whose header claims more pixels are refused (bombs)

_SPLIT_CODE = {name: i for i, name in enumerate(SPLITS)}
_TRAIN, _VAL, _TEST, _UNLABELED = (_SPLIT_CODE[s] for s in ("train", "val", "test", "unlabeled"))

# Usage column values (matched case-insensitively after stripping).
_USAGE = {
    "training": _TRAIN,
    "publictest": _VAL,
    "privatetest": _TEST,
    "train": _TRAIN,
    "val": _VAL,
    "valid": _VAL,
    "validation": _VAL,
    "test": _TEST,
}
# Image-folder directory names (case-insensitive).
_SPLIT_DIRS = {
    "train": _TRAIN,
    "training": _TRAIN,
    "val": _VAL,
    "valid": _VAL,
    "validation": _VAL,
    "publictest": _VAL,
    "test": _TEST,
    "privatetest": _TEST,
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
_LABELS = {str(i): i for i in range(len(CLASS_NAMES))}
_INT_RE = re.compile(r"[+-]?[0-9]+\Z")
_GZIP_MAGIC = b"\x1f\x8b"
_GZIP_ERRORS = (EOFError, zlib.error, gzip.BadGzipFile)


class DataError(ValueError):
    """A data source is missing, of unknown layout or malformed.

    The message names the file and, for a bad CSV row, the 1-based line number (the header is line 1), e.g.
    ``fer2013.csv line 1234: 2303 pixels, expected 2304``. ``path`` and ``line`` hold the same facts.
    """

    def __init__(self, message: str, *, path: str | os.PathLike[str] | None = None, line: int | None = None):
        super().__init__(message)
        self.path = None if path is None else str(path)
        self.line = line


class DataWarning(UserWarning):
    """Rows were skipped (``skip_bad=True``) or similar data-quality news."""


def _error(path: str | os.PathLike[str], problem: str, line: int | None = None) -> DataError:
    where = f"{path} line {line}" if line is not None else f"{path}"
    return DataError(f"{where}: {problem}", path=path, line=line)


class _RowError(Exception):
    """One CSV row is invalid (internal; becomes a DataError or a skipped row)."""


class _Fallback(Exception):
    """The vectorised fast path cannot vouch for the file: re-read it row by row (internal)."""


# --------------------------------------------------------------------------------------------------------------------
# Layout detection


@dataclass
class _CsvSpec:
    """One CSV file: where its columns are and which split rows default to."""

    path: Path
    layout: str
    header: list[str]
    cols: dict[str, int]  # role ("label", "pixels", "usage", "id") -> column index
    default_split: int
    extra: list[str] = field(default_factory=list)


@dataclass
class _Source:
    layout: str
    path: Path  # what the user pointed at (resolved)
    csvs: list[_CsvSpec] = field(default_factory=list)
    root: Path | None = None  # image folder root
    notes: list[str] = field(default_factory=list)


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == _GZIP_MAGIC


def _read_header(path: Path) -> list[str]:
    """The header fields of a CSV (gzip or plain), as written (only surrounding quotes removed)."""
    if path.stat().st_size == 0:
        raise _error(path, "file is empty")
    gz = _is_gzip(path)
    if not gz and path.name.lower().endswith(".gz"):
        raise _error(path, "named .gz but is not gzip data")
    try:
        with _open_binary(path, gz) as raw:
            first = raw.readline(1 << 20)
    except _GZIP_ERRORS as e:
        raise _error(path, f"corrupt gzip file ({e})") from e
    if not first.strip():
        raise _error(path, "file is empty" if not first else "header line is empty", 1 if first else None)
    try:
        text = first.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise _error(path, "not a UTF-8 text CSV (is it a binary file?)", 1) from e
    try:
        return next(csv.reader([text]))
    except (csv.Error, StopIteration) as e:
        raise _error(path, f"cannot parse the header ({e})", 1) from e


_SHOW_FIELD = 40  # characters of a header field shown in an error message
_SHOW_FIELDS = 8  # header fields shown in an error message
_KNOWN_COLUMNS = frozenset({"emotion", "pixels", "usage", "label", "feature", "id"})
_PIXEL_RUN_MIN = 64  # a field of this many or more space-separated integers reads as pixel data


def _show_header(header: Sequence[str]) -> str:
    """``header`` as a short list repr: long fields cut to about 40 characters, at most 8 fields."""
    shown = [h if len(h) <= _SHOW_FIELD else f"{h[: _SHOW_FIELD - 3]}..." for h in header[:_SHOW_FIELDS]]
    more = f" and {len(header) - _SHOW_FIELDS} more field(s)" if len(header) > _SHOW_FIELDS else ""
    return f"{shown!r}{more}"


def _is_pixel_run(value: str) -> bool:
    """True if ``value`` is a long run of whitespace-separated integers (a row's pixels)."""
    tokens = value.split()
    return len(tokens) >= _PIXEL_RUN_MIN and all(_INT_RE.match(t) for t in tokens)


def _missing_header_hint(header: list[str]) -> str | None:
    """If the first line looks like a data row rather than a header, the header(s) to add, quoted; else None."""
    if not header or not _INT_RE.match(header[0].strip()):
        return None
    pixel_cols = [i for i, h in enumerate(header) if _is_pixel_run(h)]
    if len(pixel_cols) != 1:
        return None
    guesses = {
        (3, 1): "'emotion,pixels,Usage'",
        (3, 2): "'emotion,Usage,pixels'",
        (2, 1): "'label,feature' (or 'id,feature' for unlabeled rows)",
    }
    return guesses.get((len(header), pixel_cols[0]), "'emotion,pixels,Usage'")


_EXPECTED_HEADERS = (
    "expected 'emotion,pixels,Usage' (FER2013), 'emotion, Usage, pixels' (ICML), "
    "'label,feature' (course train.csv) or 'id,feature' (course test.csv)"
)


def _classify_csv(path: Path) -> _CsvSpec:
    """Classify one CSV by its header."""
    header = _read_header(path)
    norm = [h.strip().lower() for h in header]
    hint = None if _KNOWN_COLUMNS.intersection(norm) else _missing_header_hint(header)
    if hint is not None:
        n_pix = max(len(h.split()) for h in header)
        raise _error(
            path,
            f"the file seems to have no header row: this line looks like data ({_show_header(header)}, "
            f"{n_pix} pixel values); add the header line {hint} as the first line",
            1,
        )
    dup = sorted({n for n in norm if n and norm.count(n) > 1})
    if dup:
        raise _error(path, f"duplicate header column(s) {_show_header(dup)}", 1)
    idx = {n: i for i, n in enumerate(norm)}
    if "pixels" in idx or "emotion" in idx:
        missing = [c for c in ("emotion", "pixels") if c not in idx]
        if missing:
            raise _error(path, f"header {_show_header(header)} lacks column(s) {missing}; {_EXPECTED_HEADERS}", 1)
        cols = {"label": idx["emotion"], "pixels": idx["pixels"]}
        if "usage" in idx:
            cols["usage"] = idx["usage"]
        icml = "usage" in idx and idx["usage"] < idx["pixels"]
        layout = "icml-csv" if icml else "fer2013-csv"
    elif "feature" in idx and ("label" in idx or "id" in idx):
        cols = {"pixels": idx["feature"]}
        if "label" in idx:
            cols["label"] = idx["label"]
        if "id" in idx:
            cols["id"] = idx["id"]
        layout = "course-csv"
    else:
        raise _error(path, f"unrecognised header {_show_header(header)}; {_EXPECTED_HEADERS}", 1)
    used = set(cols.values())
    extra = [h for i, h in enumerate(header) if i not in used]
    default = _TRAIN if "label" in cols else _UNLABELED
    return _CsvSpec(path, layout, header, cols, default, extra)


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


def _subdirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith((".", "__")))


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
    or no layout fits.
    """
    return _resolve(path).layout


# --------------------------------------------------------------------------------------------------------------------
# Byte streams with progress and hashing


class _TrackedReader(io.RawIOBase):
    """A binary reader that reports the bytes it reads (progress) and optionally hashes them."""

    def __init__(self, raw: BinaryIO, on_read: Callable[[int], Any] | None = None, hasher: Any = None):
        self._raw = raw
        self._on_read = on_read
        self._hasher = hasher

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = self._raw.readinto(b)  # type: ignore[attr-defined]
        if n:
            if self._hasher is not None:
                self._hasher.update(memoryview(b)[:n])
            if self._on_read is not None:
                self._on_read(n)
        return n or 0


class _Prefetcher(io.RawIOBase):
    """Reads ``source`` ahead in a background thread, so gzip inflation (which releases the GIL) overlaps parsing."""

    def __init__(self, source: Any, block: int = 1 << 20, depth: int = 8):
        self._queue: queue.Queue[Any] = queue.Queue(depth)
        self._stop = threading.Event()
        self._buf = b""
        self._pos = 0
        self._eof = False
        self._thread = threading.Thread(target=self._run, args=(source, block), daemon=True, name="ferlab-prefetch")
        self._thread.start()

    def _run(self, source: Any, block: int) -> None:
        try:
            while not self._stop.is_set():
                data = source.read(block)
                self._put(data)
                if not data:
                    return
        except BaseException as e:  # handed to the reading thread
            self._put(e)

    def _put(self, item: Any) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while self._pos >= len(self._buf):
            if self._eof:
                return 0
            item = self._queue.get()
            if isinstance(item, BaseException):
                self._eof = True
                raise item
            if not item:
                self._eof = True
                return 0
            self._buf, self._pos = item, 0
        n = min(len(b), len(self._buf) - self._pos)
        b[:n] = self._buf[self._pos : self._pos + n]
        self._pos += n
        return n

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        super().close()


@contextmanager
def _open_binary(
    path: Path, gz: bool, on_read: Callable[[int], Any] | None = None, hasher: Any = None, prefetch: bool = False
) -> Iterator[io.BufferedReader]:
    """The decompressed bytes of ``path``; ``on_read`` sees raw (on-disk) byte counts, ``hasher`` decompressed bytes.

    With ``prefetch`` (gzip only) decompression and hashing run in a background thread.
    """
    with open(path, "rb", buffering=0) as f:
        raw: BinaryIO = _TrackedReader(f, on_read) if on_read is not None else f  # type: ignore[assignment]
        inner: Any = gzip.GzipFile(fileobj=io.BufferedReader(raw, 1 << 20), mode="rb") if gz else raw
        if hasher is not None:
            inner = _TrackedReader(inner, hasher=hasher)
        if prefetch and gz:
            inner = _Prefetcher(inner)
        try:
            yield io.BufferedReader(inner, 1 << 20)
        finally:
            inner.close()  # stops and joins a prefetch thread before the file closes


def _progress_bar(total: int, desc: str, enabled: bool, unit: str = "B") -> Any:
    from tqdm import tqdm

    scale = unit == "B"
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=scale,
        unit_divisor=1024 if scale else 1000,
        disable=not enabled,
        leave=False,
        dynamic_ncols=True,
    )


# --------------------------------------------------------------------------------------------------------------------
# Chunk validation: vectorised fast check and per-row slow check


@functools.cache
def _digit_table() -> np.ndarray:
    """Lookup table: the three bytes before a separator (as a 24-bit int) -> the token value, -1 if not a token."""
    table = np.full(1 << 24, -1, np.int16)
    digits, seps = range(48, 58), (32, 10)
    for c1 in digits:  # last digit of the token
        for c2 in seps:  # 1-digit token; c3 is anything
            for c3 in (*digits, *seps):
                table[c3 | c2 << 8 | c1 << 16] = c1 - 48
        for c2 in digits:
            for c3 in seps:  # 2-digit token
                table[c3 | c2 << 8 | c1 << 16] = (c2 - 48) * 10 + c1 - 48
            for c3 in digits:  # 3-digit token (a 4th digit before it is rejected separately)
                table[c3 | c2 << 8 | c1 << 16] = (c3 - 48) * 100 + (c2 - 48) * 10 + c1 - 48
    return table


def _parse_pixels_fast(pixels: Sequence[Any]) -> np.ndarray | None:
    """Parse pixel strings to (n, 48, 48) uint8 if every one is exactly 2304 single-space-separated integers 0..255.

    Returns None when anything is unusual (the slow path then decides). No Python loop over pixels: the strings
    are joined with newlines and the byte buffer is tokenised with numpy.
    """
    n = len(pixels)
    if n == 0:
        return np.zeros((0, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    try:
        buf = ("\n\n\n\n" + "\n".join(pixels) + "\n").encode("ascii")
    except (TypeError, UnicodeEncodeError):
        return None
    b = np.frombuffer(buf, np.uint8)
    r = b[4:]  # the 4 leading newlines only pad the look-behind of the first token
    sep = (r == 32) | (r == 10)
    if not (((r - np.uint8(48)) < 10) | sep).all():
        return None
    seps = np.flatnonzero(sep)
    if len(seps) != n * N_PIXELS or not (r[seps[N_PIXELS - 1 :: N_PIXELS]] == 10).all():
        return None  # some row has another token count (or stray spaces)
    # words[i] = bytes r[i-4 .. i-1] as a little-endian uint32 (unaligned strided view, no copy)
    words = np.ndarray((len(b) - 3,), dtype="<u4", buffer=buf, strides=(1,))
    w = words[seps]
    if ((w & 0x10101010) == 0x10101010).any():  # four digits before a separator: token too long (0x10 = digit bit)
        return None
    values = _digit_table()[w >> 8]
    if values.min() < 0 or values.max() > 255:
        return None
    return values.astype(np.uint8).reshape(n, IMAGE_SIZE, IMAGE_SIZE)


def _map_codes(values: np.ndarray, mapping: dict[str, int]) -> np.ndarray | None:
    """Map strings through ``mapping`` (after strip/lower) vectorised over the unique values; None if any is unknown."""
    try:
        uniq, inv = np.unique(values.astype(str), return_inverse=True)
    except (TypeError, ValueError):
        return None
    codes = [mapping.get(u.strip().lower(), -1) for u in uniq]
    if min(codes, default=0) < 0:
        return None
    return np.asarray(codes, np.int64)[inv.reshape(-1)]


def _parse_ids_fast(values: np.ndarray) -> np.ndarray | None:
    """Non-negative ASCII integer ids (at most 18 digits), vectorised; None if any is unusual."""
    try:
        s = np.char.strip(values.astype(str)).astype("S")
    except (TypeError, ValueError, UnicodeError):
        return None
    if not (np.char.isdigit(s) & (np.char.str_len(s) <= 18)).all():
        return None
    return s.astype(np.int64)


@dataclass
class _Chunk:
    images: np.ndarray
    labels: np.ndarray
    split: np.ndarray  # uint8 codes into SPLITS
    ids: np.ndarray


def _check_chunk_fast(spec: _CsvSpec, cols: dict[str, np.ndarray], row0: int) -> _Chunk | None:
    """Validate and convert one chunk in aggregate; None if any row might be bad."""
    n = len(cols["pixels"])
    images = _parse_pixels_fast(cols["pixels"])
    if images is None:
        return None
    if "label" in cols:
        labels = _map_codes(cols["label"], _LABELS)
        if labels is None:
            return None
    else:
        labels = np.full(n, -1, np.int64)
    if "usage" in cols:
        split = _map_codes(cols["usage"], _USAGE)
        if split is None:
            return None
    else:
        split = np.full(n, spec.default_split, np.int64)
    if "id" in cols:
        ids = _parse_ids_fast(cols["id"])
        if ids is None:
            return None
    else:
        ids = np.arange(row0, row0 + n, dtype=np.int64)
    return _Chunk(images, labels, split.astype(np.uint8), ids)


def _check_int(value: str, what: str) -> int:
    s = value.strip()
    if not s:
        raise _RowError(f"{what} missing")
    if not _INT_RE.match(s):
        raise _RowError(f"{what} {s!r} is not an integer")
    return int(s)


def _check_row(spec: _CsvSpec, fields: list[str], row_index: int) -> tuple[np.ndarray, int, int, int]:
    """Validate one row; returns (image, label, split code, id) or raises _RowError naming the problem."""
    if len(fields) != len(spec.header):
        names = ",".join(h.strip() for h in spec.header)
        raise _RowError(f"{len(fields)} fields, expected {len(spec.header)} ({names})")
    label = -1
    if "label" in spec.cols:
        label = _check_int(fields[spec.cols["label"]], "label")
        if not 0 <= label < len(CLASS_NAMES):
            raise _RowError(f"label {label} out of range 0..{len(CLASS_NAMES) - 1}")
    split = spec.default_split
    if "usage" in spec.cols:
        usage = fields[spec.cols["usage"]].strip()
        if not usage:
            raise _RowError("Usage missing")
        if usage.lower() not in _USAGE:
            raise _RowError(f"unknown Usage {usage!r} (expected Training, PublicTest or PrivateTest)")
        split = _USAGE[usage.lower()]
    row_id = row_index
    if "id" in spec.cols:
        row_id = _check_int(fields[spec.cols["id"]], "id")
        if row_id < 0 or row_id >= 2**63:
            raise _RowError(f"id {row_id} out of range")
    text = fields[spec.cols["pixels"]]
    fast = _parse_pixels_fast([text])
    if fast is not None:
        return fast[0], label, split, row_id
    tokens = text.split()  # unusual but maybe valid (extra spaces, tabs, leading zeros) or bad: check each token
    if not tokens:
        raise _RowError("pixels missing")
    if len(tokens) != N_PIXELS:
        raise _RowError(f"{len(tokens)} pixels, expected {N_PIXELS}")
    values = np.empty(N_PIXELS, np.uint8)
    for i, tok in enumerate(tokens):
        if not _INT_RE.match(tok):
            raise _RowError(f"pixel {i + 1} is {tok!r}, not an integer")
        v = int(tok)
        if not 0 <= v <= 255:
            raise _RowError(f"pixel {i + 1} is {v}, out of range 0..255")
        values[i] = v
    return values.reshape(IMAGE_SIZE, IMAGE_SIZE), label, split, row_id


# --------------------------------------------------------------------------------------------------------------------
# CSV parsing


@dataclass
class _Parsed:
    chunks: list[_Chunk] = field(default_factory=list)
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (line, problem)
    rows: int = 0  # data records seen (blank lines excluded)
    digest: str = ""  # SHA-256 of the decompressed content


def _parse_csv_fast(spec: _CsvSpec, gz: bool, raw_digest: str, progress: bool) -> _Parsed:
    """Vectorised parse with pandas; raises _Fallback as soon as a chunk fails the aggregate checks."""
    import pandas as pd

    out = _Parsed()
    hasher = hashlib.sha256() if gz else None
    size = spec.path.stat().st_size
    roles = list(spec.cols.items())
    with (
        _progress_bar(size, f"parsing {spec.path.name}", progress) as bar,
        _open_binary(spec.path, gz, bar.update, hasher, prefetch=True) as stream,
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("error", pd.errors.ParserWarning)
        try:
            reader = pd.read_csv(
                stream,
                header=0,
                dtype=str,
                na_filter=False,
                skip_blank_lines=False,
                skipinitialspace=True,
                chunksize=CHUNK_ROWS,
                engine="c",
                encoding="utf-8",
            )
            for df in reader:
                if df.shape[1] != len(spec.header) or not isinstance(df.index, pd.RangeIndex):
                    raise _Fallback("column structure differs from the header")
                cols = {role: df.iloc[:, i].to_numpy(dtype=object) for role, i in roles}
                chunk = _check_chunk_fast(spec, cols, out.rows)
                if chunk is None:
                    raise _Fallback(f"rows {out.rows}..{out.rows + len(df) - 1} need a closer look")
                out.chunks.append(chunk)
                out.rows += len(df)
            while stream.read(1 << 20):  # pandas stops at the data's end; drain so the gzip CRC is checked
                pass
        except (pd.errors.ParserError, pd.errors.ParserWarning, ValueError) as e:  # incl. UnicodeDecodeError
            raise _Fallback(f"{type(e).__name__}: {e}") from e
    out.digest = hasher.hexdigest() if hasher is not None else raw_digest
    return out


def _parse_csv_rows(spec: _CsvSpec, gz: bool, skip_bad: bool, progress: bool) -> _Parsed:
    """Authoritative row-by-row parse with the csv module: exact line numbers, every row checked."""
    out = _Parsed()
    hasher = hashlib.sha256()
    size = spec.path.stat().st_size
    path = spec.path
    with (
        _progress_bar(size, f"checking {path.name} row by row", progress) as bar,
        _open_binary(path, gz, bar.update, hasher, prefetch=True) as stream,
    ):
        text = io.TextIOWrapper(stream, encoding="utf-8-sig", newline="")
        reader = csv.reader(text, skipinitialspace=True)
        pending: list[tuple[int, int, list[str]]] = []  # (line, row index, fields)

        def bad(line: int, problem: str) -> None:
            if not skip_bad:
                _drain_gzip(stream, path, gz)
                raise _error(path, f"{problem} (--skip-bad, or skip_bad=True, skips malformed rows)", line)
            out.skipped.append((line, problem))

        def flush() -> None:
            chunk = None
            if all(len(f) == len(spec.header) for _, _, f in pending):
                cols = {role: np.array([f[i] for _, _, f in pending], dtype=object) for role, i in spec.cols.items()}
                chunk = _check_chunk_fast(spec, cols, 0)
                if chunk is not None and "id" not in spec.cols:
                    chunk.ids = np.array([ri for _, ri, _ in pending], np.int64)
            if chunk is None:  # look at each row, in file order, so the first bad line is the one reported
                rows = []
                for ln, ri, f in pending:
                    try:
                        rows.append(_check_row(spec, f, ri))
                    except _RowError as e:
                        bad(ln, str(e))
                if rows:
                    chunk = _Chunk(
                        np.stack([r[0] for r in rows]),
                        np.array([r[1] for r in rows], np.int64),
                        np.array([r[2] for r in rows], np.uint8),
                        np.array([r[3] for r in rows], np.int64),
                    )
            if chunk is not None:
                out.chunks.append(chunk)
            pending.clear()

        line_end = 0
        try:
            next(reader)  # header (already classified)
            line_end = reader.line_num
            for fields in reader:
                line = line_end + 1
                line_end = reader.line_num
                if not fields or all(not f.strip() for f in fields):
                    continue  # blank line
                pending.append((line, out.rows, fields))
                out.rows += 1
                if len(pending) >= CHUNK_ROWS:
                    flush()
            flush()
        except csv.Error as e:
            raise _error(path, f"malformed CSV ({e})", line_end + 1) from e
        except UnicodeDecodeError as e:
            raise _error(path, "not valid UTF-8 text", line_end + 1) from e
        text.detach()
    out.digest = hasher.hexdigest()
    return out


def _drain_gzip(stream: BinaryIO, path: Path, gz: bool) -> None:
    """Before blaming a row of a gzip file, read to its end: a corrupt stream is the better explanation."""
    if not gz:
        return
    try:
        while stream.read(1 << 20):
            pass
    except _GZIP_ERRORS as e:
        raise _error(path, f"corrupt gzip file ({e})") from e


def _parse_csv(spec: _CsvSpec, raw_digest: str, skip_bad: bool, progress: bool) -> _Parsed:
    gz = _is_gzip(spec.path)
    try:
        try:
            return _parse_csv_fast(spec, gz, raw_digest, progress)
        except _Fallback as why:
            logger.info("%s: fast parse declined (%s); checking row by row", spec.path, why)
        return _parse_csv_rows(spec, gz, skip_bad, progress)
    except _GZIP_ERRORS as e:
        raise _error(spec.path, f"corrupt gzip file ({e})") from e
    except OSError as e:
        raise _error(spec.path, f"cannot read ({e})") from e


def _load_csvs(src: _Source, digests: dict[Path, str], skip_bad: bool, progress: bool) -> FerData:
    images, labels, split, ids = [], [], [], []
    notes = list(src.notes)
    n_skipped = 0
    file_digests = []
    for spec in src.csvs:
        parsed = _parse_csv(spec, digests[spec.path], skip_bad, progress)
        file_digests.append(f"{spec.path.name}:{parsed.digest}")
        for c in parsed.chunks:
            images.append(c.images)
            labels.append(c.labels)
            split.append(c.split)
            ids.append(c.ids)
        n_good = parsed.rows - len(parsed.skipped)
        notes.append(f"{spec.path.name}: {spec.layout}, {n_good} rows")
        if spec.extra:
            notes.append(f"{spec.path.name}: ignored extra column(s) {spec.extra}")
        if "usage" in spec.cols:
            notes.append(f"{spec.path.name}: Usage Training->train, PublicTest->val, PrivateTest->test")
        elif "label" in spec.cols:
            notes.append(f"{spec.path.name}: no Usage column; all rows are 'train'")
        else:
            notes.append(f"{spec.path.name}: no label column; rows are 'unlabeled' (label -1)")
        if parsed.skipped:
            n_skipped += len(parsed.skipped)
            shown = "; ".join(f"line {ln}: {p}" for ln, p in parsed.skipped[:5])
            more = f"; and {len(parsed.skipped) - 5} more" if len(parsed.skipped) > 5 else ""
            notes.append(f"{spec.path.name}: skipped {len(parsed.skipped)} malformed row(s) ({shown}{more})")
    total = sum(len(x) for x in images)
    if total == 0:
        what = f" ({n_skipped} malformed rows skipped)" if n_skipped else ""
        raise _error(src.path, f"no data rows{what}")
    if len(file_digests) == 1:
        fingerprint = file_digests[0].split(":", 1)[1]
    else:
        fingerprint = hashlib.sha256("\n".join(file_digests).encode()).hexdigest()
    return FerData(
        images=np.concatenate(images),
        labels=np.concatenate(labels).astype(np.int64),
        split=np.asarray(SPLITS)[np.concatenate(split)],
        ids=np.concatenate(ids).astype(np.int64),
        source=str(src.path),
        layout=src.layout,
        fingerprint=fingerprint[:16],
        n_skipped=n_skipped,
        notes=notes,
    )


# --------------------------------------------------------------------------------------------------------------------
# Image folders


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
        code = _SPLIT_DIRS.get(root.name.strip().lower(), _TRAIN)
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
    """(48x48-or-other gray image or None, sha256 digest of the file bytes, error text).

    The size in the image's header is checked before decoding: one over ``MAX_IMAGE_PIXELS`` (a decompression
    bomb) is refused without allocating it.
    """
    import cv2

    try:
        data = path.read_bytes()
    except OSError as e:
        return None, b"", f"cannot read ({e})"
    digest = hashlib.sha256(data).digest()
    if not data:
        return None, digest, "empty file"
    try:
        fmt, w, h = probe(data)
    except ImageError as e:
        return None, digest, f"cannot decode image ({e})"
    if w * h > MAX_IMAGE_PIXELS:
        return None, digest, (
            f"{fmt.upper()} header says {w}x{h} pixels (width x height, {w * h / 1e6:.1f} M), over the limit of "
            f"{MAX_IMAGE_PIXELS / 1e6:g} M pixels (possible decompression bomb); not decoded"
        )
    try:
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
    except cv2.error as e:
        return None, digest, f"cannot decode image ({one_line(e)})"
    if img is None or img.size == 0:
        return None, digest, "cannot decode image (corrupt or not an image)"
    return img, digest, ""


def _load_image_folder(
    src: _Source, items: list[_ImageItem], notes: list[str], skip_bad: bool, progress: bool
) -> FerData:
    import cv2

    assert src.root is not None
    n = len(items)
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    keep = np.ones(n, bool)
    hasher = hashlib.sha256()
    sizes: dict[tuple[int, int], int] = {}
    skipped: list[str] = []
    workers = max(1, min(8, os.cpu_count() or 1))
    pool = ThreadPoolExecutor(workers)
    try:
        with _progress_bar(n, f"reading {src.root.name}", progress, "img") as bar:
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
    notes = [*notes, f"image-folder: {int(keep.sum())} images from {src.root}"]
    if sizes:
        shown = ", ".join(f"{h}x{w} ({k})" for (h, w), k in sorted(sizes.items(), key=lambda t: -t[1])[:5])
        notes.append(f"resized {sum(sizes.values())} images to 48x48 with cv2.INTER_AREA; sizes (h x w): {shown}")
    if skipped:
        more = f"; and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        notes.append(f"skipped {len(skipped)} unreadable image(s) ({'; '.join(skipped[:5])}{more})")
    if not keep.any():
        raise _error(src.root, f"no readable images ({len(skipped)} unreadable skipped)")
    idx = np.flatnonzero(keep)
    return FerData(
        images=images[idx],
        labels=np.array([items[i].label for i in idx], np.int64),
        split=np.asarray(SPLITS)[np.array([items[i].split for i in idx], np.int64)],
        ids=idx.astype(np.int64),
        source=str(src.path),
        layout="image-folder",
        fingerprint=hasher.hexdigest()[:16],
        n_skipped=len(skipped),
        notes=notes,
    )


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
        data = _load_image_folder(src, items, src.notes, skip_bad, progress)
    else:
        data = _load_csvs(src, digests, skip_bad, progress)
    elapsed = time.perf_counter() - t0
    log = logger.info if progress else logger.debug
    log("parsed %s (%s): %d rows in %.1f s", src.path, src.layout, len(data), elapsed)
    if entry is not None and _cache.save_entry(entry, key, data):
        _cache.prune_entries(entry)
    _report_skipped(data, cached=False)
    return data
