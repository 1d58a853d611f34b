"""CSV parsing into FerData: a vectorised fast path and an authoritative row-by-row path.

The fast path uses pandas for the CSV structure and a byte-level numpy parser for the pixels, checking each chunk in
aggregate. Only if a chunk fails those checks is the file re-read row by row with the ``csv`` module, which finds the
first bad line (or, with ``skip_bad``, every bad line) and names it.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ferlab import CLASS_NAMES
from ferlab.data.csv_layouts import _INT_RE, _LABELS, _USAGE, _CsvSpec
from ferlab.data.errors import _error, _Fallback, _RowError
from ferlab.data.streams import _GZIP_ERRORS, _drain_gzip, _is_gzip, _open_binary, _progress_bar
from ferlab.data.types import IMAGE_SIZE, SPLITS, FerData

logger = logging.getLogger(__name__)

N_PIXELS = IMAGE_SIZE * IMAGE_SIZE
CHUNK_ROWS = 512  # rows per vectorised chunk (about 4 MB of pixel text): keeps temporaries in cache


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
    if all(not f.strip() for f in fields):
        raise _RowError(f"empty row ({len(fields)} empty fields)")
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
                if not fields or (len(fields) == 1 and not fields[0].strip()):
                    continue  # blank line (a row of bare commas is a record, checked below)
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


def _load_csvs(
    path: Path,
    layout: str,
    specs: list[_CsvSpec],
    notes: list[str],
    digests: dict[Path, str],
    skip_bad: bool,
    progress: bool,
) -> FerData:
    """Parse the CSV files ``specs`` of the source ``path`` (layout ``layout``) into one FerData."""
    images, labels, split, ids = [], [], [], []
    notes = list(notes)
    n_skipped = 0
    file_digests = []
    for spec in specs:
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
        raise _error(path, f"no data rows{what}")
    if len(file_digests) == 1:
        fingerprint = file_digests[0].split(":", 1)[1]
    else:
        fingerprint = hashlib.sha256("\n".join(file_digests).encode()).hexdigest()
    return FerData(
        images=np.concatenate(images),
        labels=np.concatenate(labels).astype(np.int64),
        split=np.asarray(SPLITS)[np.concatenate(split)],
        ids=np.concatenate(ids).astype(np.int64),
        source=str(path),
        layout=layout,
        fingerprint=fingerprint[:16],
        n_skipped=n_skipped,
        notes=notes,
    )
