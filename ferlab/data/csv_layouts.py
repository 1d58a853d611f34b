"""The three CSV layouts (Kaggle fer2013.csv, icml_face_data.csv, course train.csv/test.csv), told apart by header."""

from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ferlab import CLASS_NAMES
from ferlab.data.errors import _error
from ferlab.data.streams import _GZIP_ERRORS, _is_gzip, _open_binary
from ferlab.data.types import SPLIT_TEST, SPLIT_TRAIN, SPLIT_UNLABELED, SPLIT_VAL

# Usage column values (matched case-insensitively after stripping).
_USAGE = {
    "training": SPLIT_TRAIN,
    "publictest": SPLIT_VAL,
    "privatetest": SPLIT_TEST,
    "train": SPLIT_TRAIN,
    "val": SPLIT_VAL,
    "valid": SPLIT_VAL,
    "validation": SPLIT_VAL,
    "test": SPLIT_TEST,
}
_LABELS = {str(i): i for i in range(len(CLASS_NAMES))}
_INT_RE = re.compile(r"[+-]?[0-9]+\Z")


@dataclass
class _CsvSpec:
    """One CSV file: where its columns are and which split rows default to."""

    path: Path
    layout: str
    header: list[str]
    cols: dict[str, int]  # role ("label", "pixels", "usage", "id") -> column index
    default_split: int
    extra: list[str] = field(default_factory=list)


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
    default = SPLIT_TRAIN if "label" in cols else SPLIT_UNLABELED
    return _CsvSpec(path, layout, header, cols, default, extra)
