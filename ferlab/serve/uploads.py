"""Upload handling for ``ferlab serve``: size caps, type sniffing, streaming multipart parsing, in-memory decoding.

Nothing here touches the disk: the body is parsed as it streams in, the file part is kept in memory up to a cap,
and the image is decoded from bytes. Every failure is an :class:`UploadError` carrying the HTTP status to answer.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ferlab.images import DEFAULT_MAX_PIXELS  # larger images are refused before decoding (bombs)

# Accepted image types: MIME type -> test on the file's first bytes (its "magic number").
IMAGE_SIGNATURES: dict[str, Callable[[bytes], bool]] = {
    "image/jpeg": lambda b: b.startswith(b"\xff\xd8\xff"),
    "image/png": lambda b: b.startswith(b"\x89PNG\r\n\x1a\n"),
    "image/webp": lambda b: len(b) >= 12 and b[:4] == b"RIFF" and b[8:12] == b"WEBP",
}
SNIFF_BYTES = 12
MULTIPART_OVERHEAD = 16 * 1024  # boundaries and part headers allowed on top of the file-size cap
DEFAULT_MAX_ACTIVE = 16  # predictions admitted at once (reading, queued or computing); 503 + Retry-After above
DEFAULT_BODY_TIMEOUT = 5.0  # seconds a request body may stall between two chunks (nginx's client_body_timeout)
DEFAULT_UPLOAD_DEADLINE = 60.0  # seconds a whole upload may take (slow-drip clients)


class UploadError(ValueError):
    """A rejected upload; ``status`` is the HTTP status code to answer with."""

    status = 400

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status


class UploadTooLarge(UploadError):
    status = 413


class UnsupportedType(UploadError):
    status = 415


class UploadTimeout(UploadError):
    """The body stalled or came too slowly."""

    status = 408


class ClientGone(UploadError):
    """The client hung up before its upload was complete (nobody reads the answer)."""

    status = 499  # nginx's "client closed request"


def sniff_image_type(head: bytes) -> str | None:
    """The MIME type of an accepted image format from its first bytes, or None."""
    return next((mime for mime, test in IMAGE_SIGNATURES.items() if test(head)), None)


def accepted_types() -> list[str]:
    return list(IMAGE_SIGNATURES)


def check_content_length(header: str | None, cap: int, limit: int | None = None) -> None:
    """Refuse a request whose declared body size is over ``cap`` bytes, before reading any of it.

    ``limit``: the file-size limit to name in the message (default ``cap``; a multipart body may carry a little more).
    """
    if header is None:
        return
    try:
        n = int(header)
    except ValueError as e:
        raise UploadError(f"invalid Content-Length header {header!r}") from e
    if n > cap:
        limit = cap if limit is None else limit
        raise UploadTooLarge(f"upload of {n:,} bytes is over the limit of {limit:,} bytes ({limit / 2**20:.1f} MiB)")


def _too_large(limit: int) -> UploadTooLarge:
    return UploadTooLarge(f"upload is over the limit of {limit:,} bytes ({limit / 2**20:.1f} MiB)")


class CappedBuffer:
    """An in-memory byte buffer that refuses to grow past ``limit`` bytes."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.data = bytearray()

    def write(self, chunk: bytes) -> None:
        if len(self.data) + len(chunk) > self.limit:
            raise _too_large(self.limit)
        self.data += chunk


class MultipartFileCollector:
    """Streams a multipart/form-data body and keeps the first file part (field ``file`` preferred) in memory.

    Feed it the body chunk by chunk with :meth:`feed`, then call :meth:`finish`. Raises :class:`UploadTooLarge`
    as soon as the file part exceeds ``limit`` bytes, whatever the rest of the body holds.
    """

    def __init__(self, content_type: str, limit: int, field: str = "file") -> None:
        from python_multipart.exceptions import FormParserError
        from python_multipart.multipart import MultipartParser, parse_options_header

        _, params = parse_options_header(content_type)
        boundary = params.get(b"boundary")
        if not boundary:
            raise UploadError("multipart/form-data request without a boundary")
        self.limit, self.field = limit, field
        self.parts: list[tuple[str | None, str | None, CappedBuffer]] = []  # (field name, file name, data)
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._headers: dict[str, str] = {}
        callbacks = {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda d, s, e: self._header_field.extend(d[s:e]),
            "on_header_value": lambda d, s, e: self._header_value.extend(d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
        }
        try:
            self._parser = MultipartParser(boundary, callbacks)
        except FormParserError as e:  # e.g. a boundary over the parser's 256 characters
            raise UploadError(f"malformed multipart/form-data request: {e}") from e
        self._current: CappedBuffer | None = None

    def _part_begin(self) -> None:
        self._headers = {}
        self._current = None

    def _header_end(self) -> None:
        self._headers[self._header_field.decode("latin-1").lower()] = self._header_value.decode("latin-1")
        self._header_field.clear()
        self._header_value.clear()

    def _headers_finished(self) -> None:
        from python_multipart.multipart import parse_options_header

        _, params = parse_options_header(self._headers.get("content-disposition", ""))
        name, filename = params.get(b"name"), params.get(b"filename")
        if filename is None and (name or b"").decode("utf-8", "replace") != self.field:
            self._current = None  # a plain form field: ignored, not stored
            return
        self._current = CappedBuffer(self.limit)
        self.parts.append((name.decode("utf-8", "replace") if name else None,
                           filename.decode("utf-8", "replace") if filename is not None else None, self._current))

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._current is not None:
            self._current.write(data[start:end])

    def feed(self, chunk: bytes) -> None:
        from python_multipart.exceptions import MultipartParseError

        try:
            self._parser.write(chunk)
        except MultipartParseError as e:
            raise UploadError(f"malformed multipart/form-data body: {e}") from e

    def finish(self) -> tuple[str | None, bytes]:
        """(file name, bytes) of the ``file`` field, else of the first file part; UploadError when there is none."""
        self._parser.finalize()
        if not self.parts:
            raise UploadError(f"no file in the form: send the image as the {self.field!r} field")
        _, filename, buf = next((p for p in self.parts if p[0] == self.field), self.parts[0])
        return filename, bytes(buf.data)


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, name: str = "upload") -> np.ndarray:
    """Decode JPEG/PNG/WebP bytes in memory -> (H, W, 3) uint8 BGR (JPEG EXIF orientation applied).

    Raises UnsupportedType (415) for other formats, UploadTooLarge (413) for images over ``max_pixels`` (read from
    the header, before decoding: decompression bombs), UploadError (400) for damaged data. Decoding is
    :mod:`ferlab.images`' (the same as ``ferlab predict``).
    """
    from ferlab.images import ImageError, probe
    from ferlab.images import decode_image as decode

    mime = sniff_image_type(data[:SNIFF_BYTES])
    if mime is None:
        raise UnsupportedType(f"{name}: not a JPEG, PNG or WebP image (unrecognised file signature)")
    kind = mime.split("/")[1].upper()
    try:
        _, w, h = probe(data)
    except ImageError as e:
        raise UploadError(f"{name}: damaged {kind} image ({e})") from None
    if w * h > max_pixels:
        raise UploadTooLarge(f"{name}: image of {w}x{h} pixels is over the limit of {max_pixels:,} pixels")
    try:
        return decode(data, max_pixels)  # (H, W, 3) BGR
    except ImageError as e:
        raise UploadError(f"{name}: damaged or truncated {kind} image ({e})") from None
