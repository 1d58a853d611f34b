"""Safe image and video reading for real photos.

An image's size is read from its header (PNG, JPEG, WEBP, BMP: a few bytes, parsed
here) before anything is decoded, so a decompression bomb (a small file claiming
100000 x 100000 pixels) is refused before it can take the memory. Decoded images come
back as 8-bit BGR (H, W, 3) arrays: gray is expanded, 16-bit is scaled down, alpha is
composited over white. Bad input raises :class:`ImageError` naming the file.
"""

from __future__ import annotations

import math
import os
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np

DEFAULT_MAX_PIXELS = 50_000_000  # 50 MP: larger than any camera photo, far below a bomb
DEFAULT_MAX_BYTES = 256 * 2**20  # refuse image files over 256 MiB before reading them
IMAGE_EXTS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
VIDEO_EXTS: tuple[str, ...] = (".mp4", ".avi", ".mov", ".mkv")


def pixel_count(text: str) -> int:
    """A ``--max-pixels`` value: a positive whole number of pixels, also written as 50e6."""
    import argparse

    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 1):
        raise argparse.ArgumentTypeError(f"a positive number of pixels, such as 50e6, expected, got {text!r}")
    return int(value)


class ImageError(ValueError):
    """An input that is not a readable image (corrupt, unsupported, too large, empty)."""


# --------------------------------------------------------------------------- header probes
def _png_size(b: bytes) -> tuple[int, int]:
    if len(b) < 24 or b[12:16] != b"IHDR":
        raise ImageError("PNG without an IHDR header (truncated or corrupt)")
    return struct.unpack(">II", b[16:24])


_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_JPEG_NO_LENGTH = {0x01, *range(0xD0, 0xD9)}  # TEM, RST0-7, SOI


def _jpeg_size(b: bytes) -> tuple[int, int]:
    i, n = 2, len(b)
    while i < n:
        if b[i] != 0xFF:  # stray bytes between segments: skipped to the next marker, as the decoder does
            i = b.find(b"\xff", i)
            if i < 0:
                break
        while i < n and b[i] == 0xFF:  # fill bytes
            i += 1
        if i >= n:
            break
        marker = b[i]
        i += 1
        if marker in _JPEG_NO_LENGTH:
            continue
        if marker in (0xD9, 0xDA):  # end of image, start of scan: no frame header came first
            break
        if i + 2 > n:
            break
        (length,) = struct.unpack(">H", b[i : i + 2])
        if marker in _JPEG_SOF:
            if i + 7 > n:
                break
            h, w = struct.unpack(">HH", b[i + 3 : i + 7])
            return w, h
        i += length
    raise ImageError("JPEG without a frame header (truncated or corrupt)")


def _webp_size(b: bytes) -> tuple[int, int]:
    fourcc, d = b[12:16], b[20:40]
    if fourcc == b"VP8 " and len(d) >= 10 and d[3:6] == b"\x9d\x01\x2a":
        w, h = struct.unpack("<HH", d[6:10])
        return w & 0x3FFF, h & 0x3FFF
    if fourcc == b"VP8L" and len(d) >= 5 and d[0] == 0x2F:
        (bits,) = struct.unpack("<I", d[1:5])
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if fourcc == b"VP8X" and len(d) >= 10:
        return 1 + int.from_bytes(d[4:7], "little"), 1 + int.from_bytes(d[7:10], "little")
    raise ImageError("WEBP with an unknown or corrupt header")


def _bmp_size(b: bytes) -> tuple[int, int]:
    if len(b) < 26:
        raise ImageError("BMP header truncated")
    (dib,) = struct.unpack("<I", b[14:18])
    if dib == 12:  # BITMAPCOREHEADER
        return struct.unpack("<HH", b[18:22])
    w, h = struct.unpack("<ii", b[18:26])
    return abs(w), abs(h)


# format -> (test on the first bytes, size reader)
FORMATS: dict[str, tuple[Callable[[bytes], bool], Callable[[bytes], tuple[int, int]]]] = {
    "png": (lambda b: b.startswith(b"\x89PNG\r\n\x1a\n"), _png_size),
    "jpeg": (lambda b: b.startswith(b"\xff\xd8\xff"), _jpeg_size),
    "webp": (lambda b: b[:4] == b"RIFF" and b[8:12] == b"WEBP", _webp_size),
    "bmp": (lambda b: b[:2] == b"BM", _bmp_size),
}


def probe(data: bytes) -> tuple[str, int, int]:
    """(format, width, height) read from an encoded image's header, without decoding it."""
    for fmt, (matches, size) in FORMATS.items():
        if matches(data[:16]):
            w, h = size(data)
            if w <= 0 or h <= 0:
                raise ImageError(f"{fmt.upper()} header gives an empty size {w}x{h}")
            return fmt, int(w), int(h)
    raise ImageError("not a supported image (expected JPEG, PNG, WEBP or BMP content)")


def check_pixels(w: int, h: int, max_pixels: int | None, fmt: str | None = None) -> None:
    """Refuse a w x h image above ``max_pixels`` (None: no limit); ``fmt``: the format whose header said so."""
    if max_pixels is not None and w * h > max_pixels:
        what = f"{fmt.upper()} header says {w}x{h} pixels (width x height," if fmt else f"image of {w}x{h} ="
        raise ImageError(f"{what} {w * h / 1e6:.1f} M{')' if fmt else ' pixels'} is over the limit of "
                         f"{max_pixels / 1e6:g} M pixels (possible decompression bomb; raise max_pixels to allow it)")


# --------------------------------------------------------------------------- decoding
def to_bgr8(img: np.ndarray, color: str = "bgr") -> np.ndarray:
    """Any (H, W), (H, W, 1|3|4) uint8/uint16/float image -> (H, W, 3) uint8 BGR.

    ``color`` names the channel order of 3/4-channel input (``rgb`` or ``bgr``). 16-bit is scaled to 8-bit,
    float is taken as [0, 1], alpha is composited over white.
    """
    import cv2

    if color not in ("rgb", "bgr"):
        raise ValueError(f"color must be 'rgb' or 'bgr', got {color!r}")
    img = np.asarray(img)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] not in (3, 4)) or img.size == 0:
        raise ImageError(f"image array of shape {img.shape}: expected (H, W), (H, W, 3) or (H, W, 4)")
    if img.dtype == np.uint16:  # to 8 bits without a float copy of the whole image: (H, W*C) keeps any C
        x = cv2.convertScaleAbs(img.reshape(img.shape[0], -1), alpha=1 / 257.0).reshape(img.shape)
    elif img.dtype.kind == "f":
        x = np.clip(img.astype(np.float32), 0.0, 1.0) * 255.0
    elif img.dtype == np.uint8:
        x = img
    elif img.dtype == np.bool_ or img.dtype.kind in "iu":
        x = np.clip(img, 0, 255).astype(np.uint8)
    else:
        raise ImageError(f"unsupported image dtype {img.dtype}")
    x = np.clip(np.rint(x), 0, 255).astype(np.uint8) if x.dtype != np.uint8 else x
    if x.ndim == 3 and x.shape[2] == 4:  # composite over white, in bands of rows: float copies stay small
        out = np.empty(x.shape[:2] + (3,), np.uint8)
        rows = max(1, (1 << 20) // x.shape[1])  # about a million pixels a band
        for r in range(0, x.shape[0], rows):
            band = x[r : r + rows]
            alpha = band[:, :, 3:4].astype(np.float32) / 255.0  # (h, W, 1)
            out[r : r + rows] = np.rint(band[:, :, :3] * alpha + 255.0 * (1.0 - alpha))
        x = out
    if x.ndim == 2:
        return cv2.cvtColor(x, cv2.COLOR_GRAY2BGR)
    return np.ascontiguousarray(x[:, :, ::-1] if color == "rgb" else x)


def _tiff_orientation(tiff: bytes) -> int:
    """The Orientation tag (1-8) of an EXIF block (TIFF layout, maybe after an ``Exif\\0\\0`` prefix); 1 if none."""
    tiff = tiff[6:] if tiff.startswith(b"Exif\0\0") else tiff
    order = {b"II": "<", b"MM": ">"}.get(tiff[:2])
    if order is None or len(tiff) < 8:
        return 1
    (ifd,) = struct.unpack(order + "I", tiff[4:8])
    if ifd + 2 > len(tiff):
        return 1
    (n,) = struct.unpack(order + "H", tiff[ifd : ifd + 2])
    for e in range(ifd + 2, min(ifd + 2 + 12 * n, len(tiff) - 11), 12):
        tag, kind = struct.unpack(order + "HH", tiff[e : e + 4])
        if tag == 0x0112 and kind == 3:  # Orientation, a SHORT
            (value,) = struct.unpack(order + "H", tiff[e + 8 : e + 10])
            return value if 1 <= value <= 8 else 1
    return 1


def _exif_orientation(data: bytes, fmt: str) -> int:
    """The EXIF orientation a PNG (eXIf chunk) or WEBP (EXIF chunk) states; 1 if none."""
    if fmt == "png":
        i, big = 8, ">I"
        while i + 8 <= len(data):
            (length,), kind = struct.unpack(big, data[i : i + 4]), data[i + 4 : i + 8]
            if kind == b"eXIf":
                return _tiff_orientation(data[i + 8 : i + 8 + length])
            if kind in (b"IDAT", b"IEND"):
                return 1
            i += 12 + length
    elif fmt == "webp" and data[12:16] == b"VP8X" and len(data) > 20 and data[20] & 0x08:  # the EXIF flag
        i = 12
        while i + 8 <= len(data):
            kind, (length,) = data[i : i + 4], struct.unpack("<I", data[i + 4 : i + 8])
            if kind == b"EXIF":
                return _tiff_orientation(data[i + 8 : i + 8 + length])
            i += 8 + length + (length & 1)
    return 1


# EXIF orientation -> how to turn the stored pixels (H, W, ...) upright
_ORIENT: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    1: lambda x: x,
    2: lambda x: x[:, ::-1],
    3: lambda x: x[::-1, ::-1],
    4: lambda x: x[::-1],
    5: lambda x: x.swapaxes(0, 1),
    6: lambda x: np.rot90(x, -1),
    7: lambda x: x.swapaxes(0, 1)[::-1, ::-1],
    8: lambda x: np.rot90(x, 1),
}


def decode_image(data: bytes, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode an encoded image (bytes) to (H, W, 3) uint8 BGR after checking its header size.

    JPEG is decoded in colour; PNG/WEBP/BMP unchanged (gray, alpha and 16-bit kept, then converted by
    :func:`to_bgr8`). Every format's EXIF orientation is applied (a phone's portrait photo comes out upright).
    """
    import cv2

    if not data:
        raise ImageError("empty file")
    fmt, w, h = probe(data)
    check_pixels(w, h, max_pixels)
    flags = cv2.IMREAD_COLOR if fmt == "jpeg" else cv2.IMREAD_UNCHANGED
    try:
        img = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    except cv2.error as e:
        raise ImageError(f"cannot decode {fmt.upper()} ({str(e).strip().splitlines()[-1]})") from None
    if img is None or img.size == 0:
        raise ImageError(f"cannot decode {fmt.upper()} data (corrupt or truncated file)")
    if flags == cv2.IMREAD_UNCHANGED:  # OpenCV applies the orientation only when it converts the pixels
        img = np.ascontiguousarray(_ORIENT[_exif_orientation(data, fmt)](img))
    if fmt == "bmp" and img.ndim == 3 and img.shape[2] == 4 and not img[:, :, 3].any():
        img = img[:, :, :3]  # a 32-bit BMP whose writer left alpha at 0 means opaque, as viewers show it
    return to_bgr8(img, "bgr")


def decode_gray(data: bytes, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode an encoded image (bytes) to (H, W) uint8 gray after checking its header size: how dataset images
    (image folders) are read. EXIF orientation is applied; OpenCV's errors become one-line ImageErrors."""
    import cv2

    if not data:
        raise ImageError("empty file")
    fmt, w, h = probe(data)
    check_pixels(w, h, max_pixels, fmt)
    try:
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
    except cv2.error as e:
        raise ImageError(f"cannot decode image ({one_line(e)})") from None
    if img is None or img.size == 0:
        raise ImageError("cannot decode image (corrupt or not an image)")
    return img


def read_image(path: str | Path, max_pixels: int | None = DEFAULT_MAX_PIXELS,
               max_bytes: int = DEFAULT_MAX_BYTES) -> np.ndarray:
    """Read an image file to (H, W, 3) uint8 BGR; raises ImageError / FileNotFoundError naming the file.

    Example: ``read_image("photo.jpg").shape`` -> ``(1080, 1920, 3)``.
    """
    p = Path(path)
    if not p.is_file():
        if p.is_dir():
            raise FileNotFoundError(f"{p}: a folder, not a file" + ("" if os.access(p, os.R_OK | os.X_OK) else
                                                                    " (its files cannot be listed: no permission)"))
        raise FileNotFoundError(f"{p}: no such file" + (" (a link to nothing)" if p.is_symlink() else ""))
    size = p.stat().st_size
    if size > max_bytes:
        raise ImageError(f"{p}: file of {size / 2**20:.0f} MiB is over the limit of {max_bytes / 2**20:.0f} MiB")
    try:
        return decode_image(p.read_bytes(), max_pixels)
    except ImageError as e:
        raise ImageError(f"{p}: {e}") from None


# --------------------------------------------------------------------------- video
def _check_capture(cap, name: str, not_open: str, max_pixels: int | None) -> None:
    """ImageError naming ``name`` unless the cv2.VideoCapture ``cap`` is open with frames within ``max_pixels``."""
    import cv2

    if not cap.isOpened():
        raise ImageError(f"{name}: {not_open}")
    w, h = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
    try:
        check_pixels(w, h, max_pixels)
    except ImageError as e:
        raise ImageError(f"{name}: video frames: {e}") from None


class VideoFrame(NamedTuple):
    """One decoded video frame: its index in the file, its time and the image."""

    index: int
    time: float | None  # seconds from the video's start: the frame's own timestamp (None: the file gives none)
    image: np.ndarray  # (H, W, 3) uint8 BGR


def read_video_frames(path: str | Path, every: int = 1, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                      max_frames: int | None = None) -> Iterator[VideoFrame]:
    """Yield every ``every``-th frame (0, every, 2*every, ...) of the first ``max_frames`` (None: all) as a
    :class:`VideoFrame`.

    Times are the frames' own timestamps, right for variable frame rates (most phone videos) and for files whose
    container skips dropped frames; where the decoder gives none, frame index / stated frame rate. A video that
    ends before its stated length (in frames and, where timestamps exist, in time), or has kept frames that do
    not decode (a damaged or truncated file), raises :class:`ImageError` after yielding every frame it could
    decode, naming where decoding stopped; the frames before it are the caller's to keep.
    """
    import cv2

    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such file")
    cap = cv2.VideoCapture(str(p))
    try:
        _check_capture(cap, f"{p}", "cannot open as a video (corrupt or unsupported)", max_pixels)
        stated = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)  # 0 or less: the container states none
        fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
        fps = fps if math.isfinite(fps) and fps > 0 else 0.0
        i, n_read, bad, t = 0, 0, [], None
        while (max_frames is None or i < max_frames) and cap.grab():  # grab each frame (cheap), decode the kept
            t = _frame_time(cap.get(cv2.CAP_PROP_POS_MSEC), i, t, fps)
            if i % every == 0:
                ok, frame = cap.retrieve()
                if ok and frame is not None:
                    n_read += 1
                    yield VideoFrame(i, t, to_bgr8(frame, "bgr"))
                else:
                    bad.append(i)
            i += 1
        if n_read == 0:
            raise ImageError(f"{p}: no decodable video frames")
        problems = []
        # one frame of slack: some containers round their count; a container that skips dropped frames holds
        # fewer than it states but its last timestamp reaches the stated length
        reached_end = fps > 0 and t is not None and t >= (stated - 2) / fps
        if stated > 0 and i < stated - 1 and not reached_end and i != max_frames:
            problems.append(f"decoding stopped at frame {i} of the {stated} the file states (damaged or truncated)")
        if bad:
            problems.append(f"{len(bad)} frame(s) could not be decoded and were skipped (first: frame {bad[0]})")
        if problems:
            raise ImageError(f"{p}: " + "; ".join(problems) + f"; the {n_read} frame(s) decoded are kept")
    finally:
        cap.release()


def _frame_time(pos_ms: float, index: int, previous: float | None, fps: float) -> float | None:
    """Seconds of frame ``index`` from the decoder's position ``pos_ms`` after grabbing it; where the decoder gives
    no usable timestamp (none, not finite, not after the previous one, or still 0 after the first frame), the
    previous frame's time plus one frame at ``fps`` (None without a frame rate)."""
    t = pos_ms / 1000.0
    usable = math.isfinite(t) and t >= 0 and (previous is None or t > previous) and (index == 0 or t > 0)
    if usable:
        return t
    if not fps:
        return None  # callers then count frames as seconds, as frame 0's time 0 already does
    return index / fps if previous is None else previous + 1.0 / fps


def read_video(path: str | Path, every: int = 1,
               max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (frame index, (H, W, 3) uint8 BGR) for every ``every``-th frame; see :func:`read_video_frames`
    (which also gives each frame's time)."""
    for f in read_video_frames(path, every, max_pixels):
        yield f.index, f.image


def read_camera(index: int, max_frames: int | None = None,
                max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Iterator[tuple[int, float, np.ndarray]]:
    """Yield (frame index, seconds since the first frame, (H, W, 3) uint8 BGR) from camera ``index`` until it stops
    giving frames or ``max_frames`` have been read. A camera that stops mid-stream raises :class:`ImageError` after
    the frames it gave (they are the caller's to keep)."""
    import cv2

    cap = cv2.VideoCapture(index)
    try:
        _check_capture(cap, f"camera {index}", "cannot open it (no such device, no permission, or in use)",
                       max_pixels)
        i, t0 = 0, None
        while max_frames is None or i < max_frames:
            ok, frame = cap.read()
            if not ok or frame is None:
                raise ImageError(f"camera {index}: " + ("gives no frames" if i == 0 else
                                                        f"stopped giving frames after {i}; those are kept"))
            now = time.monotonic()
            t0 = now if t0 is None else t0
            yield i, now - t0, to_bgr8(frame, "bgr")
            i += 1
    finally:
        cap.release()


# --------------------------------------------------------------------------- inputs
def is_video(path: str | Path) -> bool:
    return Path(path).suffix.lower() in VIDEO_EXTS


def collect_inputs(paths: Iterable[str | Path] | str | Path) -> list[Path]:
    """Files named directly (any extension) plus images and videos found recursively in folders, sorted.

    One path alone counts as a list of one (not as its characters); a file reached twice is listed once. Missing
    paths are kept so that the caller reports them per file.
    """
    if isinstance(paths, str | Path):
        paths = [paths]
    out: list[Path] = []
    seen: set[Path] = set()  # a file reached twice (named and in a named folder) is read once
    for raw in paths:
        p = Path(raw)
        found = _media_in(p) if p.is_dir() else [p]
        for f in found:
            key = f.resolve()
            if key not in seen:
                seen.add(key)
                out.append(f)
    return out


def _media_in(folder: Path) -> list[Path]:
    """The images and videos under ``folder``, sorted; a subfolder that cannot be listed and a link to nothing
    are listed too, so that the caller reports them rather than skipping them unseen."""
    found: list[Path] = []
    unlisted: list[Path] = []
    for root, _, names in os.walk(folder, onerror=lambda e: unlisted.append(Path(e.filename))):
        for name in names:
            f = Path(root) / name
            if f.suffix.lower() in IMAGE_EXTS + VIDEO_EXTS and (f.is_file() or f.is_symlink()):
                found.append(f)
    return sorted(found + unlisted)


def one_line(error: BaseException) -> str:
    """The last non-empty line of an exception's text, stripped (OpenCV errors span several lines)."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    return lines[-1] if lines else type(error).__name__
