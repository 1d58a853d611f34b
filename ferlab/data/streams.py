"""Byte streams of data files: gzip detection, progress, hashing and background prefetch."""

from __future__ import annotations

import gzip
import io
import queue
import threading
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from ferlab.data.errors import _error

_GZIP_MAGIC = b"\x1f\x8b"
_GZIP_ERRORS = (EOFError, zlib.error, gzip.BadGzipFile)


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == _GZIP_MAGIC


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



def _drain_gzip(stream: BinaryIO, path: Path, gz: bool) -> None:
    """Before blaming a row of a gzip file, read to its end: a corrupt stream is the better explanation."""
    if not gz:
        return
    try:
        while stream.read(1 << 20):
            pass
    except _GZIP_ERRORS as e:
        raise _error(path, f"corrupt gzip file ({e})") from e
