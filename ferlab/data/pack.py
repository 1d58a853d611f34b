"""A compact, lossless, checksummed file of some splits of a FER source (``*.ferpack``), for moving data to
a machine that cannot read the original (a GPU machine reached with a size-limited copy of the working tree).

The file: the 8-byte magic ``FERLABPK``, the header's length (8 bytes, little-endian), the header (UTF-8 JSON)
and the payload, an xz stream of the rows' labels (int16), split codes (uint8), row ids (int64) and the images'
prediction residuals (uint8). Each pixel is predicted from its already decoded neighbours with the median edge
detector of LOCO-I / JPEG-LS (left neighbour on the first row, upper one on the first column); so coded, FER2013's
noisy 48x48 faces take about two thirds of their raw size.

The header names the source the rows came from (its file name, layout and fingerprint) and holds the SHA-256
of the payload and of the decoded images: :func:`read_pack` checks both, so a truncated, corrupt or altered
file is refused with the reason (``load_data`` caches what it read, keyed by the file's content hash, so a changed
file is read and checked again). A pack loads as its source's rows of those splits, with its source's layout and
fingerprint (the same images, labels and row ids), so FER+ labels, split protocols and resumed runs treat it as
the source itself.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import struct
from pathlib import Path
from typing import Any

import numpy as np

from ferlab.data.errors import DataError
from ferlab.data.types import SPLITS, FerData

__all__ = ["PACK_SUFFIX", "is_pack", "pack_info", "read_pack", "write_pack"]

MAGIC = b"FERLABPK"
VERSION = 1
PACK_SUFFIX = ".ferpack"
HEADER_LENGTH = struct.Struct("<Q")
MAX_HEADER_BYTES = 1 << 20  # a header is a few hundred bytes; more means a corrupt or foreign file


def is_pack(path: str | Path) -> bool:
    """Whether ``path`` names a pack (by its suffix)."""
    return str(path).lower().endswith(PACK_SUFFIX)


def _predictions(x: np.ndarray) -> np.ndarray:
    """(N, H, W) int16 images -> (N, H, W) int16 predictions of each pixel from its left (a), upper (b) and
    upper-left (c) neighbours: MED(a, b, c) inside, a on the first row, b on the first column, 0 at (0, 0)."""
    a = np.zeros_like(x)
    a[:, :, 1:] = x[:, :, :-1]
    b = np.zeros_like(x)
    b[:, 1:, :] = x[:, :-1, :]
    c = np.zeros_like(x)
    c[:, 1:, 1:] = x[:, :-1, :-1]
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    pred = np.where(c >= hi, lo, np.where(c <= lo, hi, a + b - c))
    pred[:, 0, :] = a[:, 0, :]
    pred[:, 1:, 0] = b[:, 1:, 0]
    return pred


def encode_images(images: np.ndarray) -> np.ndarray:
    """(N, H, W) uint8 -> (N, H, W) uint8 residuals (pixel minus prediction, modulo 256)."""
    x = images.astype(np.int16)
    return ((x - _predictions(x)) % 256).astype(np.uint8)


def decode_images(residuals: np.ndarray) -> np.ndarray:
    """The inverse of :func:`encode_images`: row by row, pixel by pixel, all images at once."""
    n, h, w = residuals.shape
    r = residuals.astype(np.int16)
    x = np.zeros((n, h, w), np.int16)
    x[:, 0, :] = np.cumsum(r[:, 0, :], axis=1) % 256  # first row: each pixel predicted by its left neighbour
    for i in range(1, h):
        x[:, i, 0] = (x[:, i - 1, 0] + r[:, i, 0]) % 256
        up = x[:, i - 1, :]
        for j in range(1, w):
            a, b, c = x[:, i, j - 1], up[:, j], up[:, j - 1]
            lo, hi = np.minimum(a, b), np.maximum(a, b)
            pred = np.where(c >= hi, lo, np.where(c <= lo, hi, a + b - c))
            x[:, i, j] = (pred + r[:, i, j]) % 256
    return x.astype(np.uint8)


def write_pack(data: FerData, path: str | Path, splits: tuple[str, ...] = ("train", "val"), *,
               preset: int = 9) -> dict[str, Any]:
    """Write the rows of ``splits`` of ``data`` to ``path`` (``*.ferpack``); returns the header. ``preset``: the xz
    preset, 9 (smallest, to travel) down to 0 (fastest, for files that stay on the machine)."""
    path = Path(path)
    if not is_pack(path):
        raise ValueError(f"{path}: a pack's name ends in {PACK_SUFFIX}")
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise ValueError(f"unknown split(s) {', '.join(unknown)}; choose from {', '.join(SPLITS)}")
    if data.targets is not None:
        raise ValueError(f"{data.source}: pack the source's own labels (FER+ votes travel as their own file)")
    idx = np.flatnonzero(np.isin(data.split, splits))
    if not len(idx):
        raise ValueError(f"{data.source} has no rows in {', '.join(splits)}")
    images = np.ascontiguousarray(data.images[idx])
    codes = np.array([SPLITS.index(s) for s in data.split[idx]], np.uint8)
    body = (data.labels[idx].astype("<i2").tobytes() + codes.tobytes() + data.ids[idx].astype("<i8").tobytes()
            + encode_images(images).tobytes())
    payload = lzma.compress(body, format=lzma.FORMAT_XZ,
                            filters=[{"id": lzma.FILTER_LZMA2, "preset": preset, "pb": 0}])
    header = {
        "format": "ferlab-pack", "version": VERSION, "rows": len(idx), "image_shape": list(images.shape[1:]),
        "splits": {s: int((data.split[idx] == s).sum()) for s in splits},
        "class_names": list(data.class_names),
        "source": {"name": Path(data.source).name, "layout": data.layout, "fingerprint": data.fingerprint,
                   "rows": len(data)},
        "images_sha256": hashlib.sha256(images.tobytes()).hexdigest(),
        "payload_sha256": hashlib.sha256(payload).hexdigest(), "payload_bytes": len(payload),
    }
    raw_header = json.dumps(header, indent=1).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(MAGIC + HEADER_LENGTH.pack(len(raw_header)) + raw_header + payload)
    tmp.replace(path)
    return header


def _read_header(f: Any, path: Path) -> dict[str, Any]:
    if f.read(len(MAGIC)) != MAGIC:
        raise DataError(f"{path}: not a ferlab pack (no {MAGIC.decode()} magic at its start)")
    raw = f.read(HEADER_LENGTH.size)
    if len(raw) < HEADER_LENGTH.size:
        raise DataError(f"{path}: truncated in its header")
    (n,) = HEADER_LENGTH.unpack(raw)
    if n > MAX_HEADER_BYTES:
        raise DataError(f"{path}: header of {n:,} bytes; the file is corrupt")
    try:
        header = json.loads(f.read(n).decode())
    except (UnicodeDecodeError, ValueError) as e:
        raise DataError(f"{path}: unreadable header ({e})") from None
    if not isinstance(header, dict) or header.get("format") != "ferlab-pack":
        raise DataError(f"{path}: the header is not a ferlab pack's")
    if header.get("version") != VERSION:
        raise DataError(f"{path}: pack version {header.get('version')}; this ferlab reads version {VERSION}")
    return header


def pack_info(path: str | Path) -> dict[str, Any]:
    """The header of the pack at ``path`` (nothing decoded or checked beyond it)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return _read_header(f, path)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None


def read_pack(path: str | Path) -> FerData:
    """Load and check the pack at ``path``; raises :class:`DataError` naming what is wrong with it."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            header = _read_header(f, path)
            payload = f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        n, (h, w) = int(header["rows"]), header["image_shape"]
        want_bytes, want_sha = int(header["payload_bytes"]), header["payload_sha256"]
        source = header["source"]
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{path}: header lacks {e}") from None
    if len(payload) != want_bytes:
        raise DataError(f"{path}: payload of {len(payload):,} bytes, the header says {want_bytes:,} "
                        "(truncated or appended to)")
    if hashlib.sha256(payload).hexdigest() != want_sha:
        raise DataError(f"{path}: payload checksum mismatch (the file is corrupt)")
    try:
        body = lzma.decompress(payload, format=lzma.FORMAT_XZ)
    except lzma.LZMAError as e:
        raise DataError(f"{path}: cannot decompress the payload ({e})") from None
    sizes = (2 * n, n, 8 * n, n * h * w)
    if len(body) != sum(sizes):
        raise DataError(f"{path}: payload holds {len(body):,} bytes, {sum(sizes):,} expected for {n:,} rows")
    ends = np.cumsum(sizes)
    labels = np.frombuffer(body[: ends[0]], "<i2").astype(np.int64)
    codes = np.frombuffer(body[ends[0] : ends[1]], np.uint8)
    ids = np.frombuffer(body[ends[1] : ends[2]], "<i8").astype(np.int64)
    if codes.max(initial=0) >= len(SPLITS):
        raise DataError(f"{path}: unknown split code {int(codes.max())}")
    images = decode_images(np.frombuffer(body[ends[2] :], np.uint8).reshape(n, h, w))
    if hashlib.sha256(images.tobytes()).hexdigest() != header.get("images_sha256"):
        raise DataError(f"{path}: the decoded images do not match their checksum")
    split = np.asarray(SPLITS)[codes]
    counts = ", ".join(f"{s} {c:,}" for s, c in header.get("splits", {}).items())
    data = FerData(images, labels, split, ids, source=str(path), layout=source["layout"],
                   fingerprint=source["fingerprint"], class_names=tuple(header["class_names"]))
    data.notes.append(f"packed from {source['name']} (fingerprint {source['fingerprint']}, {source['rows']:,} rows):"
                      f" {counts}")
    return data
