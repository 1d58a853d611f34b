"""The FastAPI application of ``ferlab serve``: a static page, ``POST /predict`` (JSON), ``/api/info``, ``/healthz``.

Build it with :func:`create_app`; nothing is created at import. Uploads are capped twice: a declared
Content-Length over the cap is refused (413) before any of the body is read, and the streamed body is counted
as it arrives, so a chunked or lying client is cut off at the cap too. The image is decoded in memory; nothing
is written to disk.

Under load and abuse: at most ``max_active`` predictions are admitted at once; a request over that is answered
503 with ``Retry-After`` once its body has been read and dropped (answering before would make the kernel reset
the connection under the client's upload). A body that stalls for ``body_timeout`` seconds between two chunks,
or takes longer than ``upload_deadline`` in all, is answered 408 and its slot freed. A client that hangs up
mid-upload is logged as one line.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from ferlab.serve.service import FaceService, StreamError, check_stream
from ferlab.serve.uploads import (
    DEFAULT_BODY_TIMEOUT,
    DEFAULT_MAX_ACTIVE,
    DEFAULT_MAX_PIXELS,
    DEFAULT_UPLOAD_DEADLINE,
    MULTIPART_OVERHEAD,
    CappedBuffer,
    ClientGone,
    MultipartFileCollector,
    UploadError,
    UploadTimeout,
    UploadTooLarge,
    accepted_types,
    check_content_length,
    decode_image,
)

STATIC_DIR = Path(__file__).resolve().parent / "static"
DEFAULT_MAX_UPLOAD_MB = 10.0
RETRY_AFTER_S = 1  # what a 503 asks the client to wait
MAX_CONCURRENT_IMAGES = 2  # images decoded at once: each up to max_pixels x 8 bytes (16-bit RGBA PNG) while
# decoding, then max_pixels x 3 (BGR)

log = logging.getLogger("uvicorn.error")  # the server's own log: its format, its --log-level

# Served with every response: the page may load only its own files (no CDN, works offline), images may also be
# data: URLs (the overlays) and blob: URLs (the user's photo), media may be the webcam stream.
SECURITY_HEADERS: dict[str, str] = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; media-src 'self' blob: mediastream:; "
                               "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def create_app(recognizer: Any, *, max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
               max_pixels: int = DEFAULT_MAX_PIXELS, explain_method: str | None = "gradcam",
               explain_model: tuple[Any, Any] | None = None, model_name: str | None = None,
               max_active: int = DEFAULT_MAX_ACTIVE, body_timeout: float = DEFAULT_BODY_TIMEOUT,
               upload_deadline: float = DEFAULT_UPLOAD_DEADLINE) -> FastAPI:
    """A FastAPI app serving ``recognizer`` (a :class:`ferlab.recognize.api.Recognizer`).

    max_upload_mb: largest accepted image file (MiB); max_pixels: largest accepted image (width x height);
    explain_method: attribution shown per face (``ferlab.explain.METHODS``; None: no overlay);
    explain_model: (PyTorch model, normalizer) for the overlays when the recognizer's backend is not torch;
    model_name: shown on the page and in responses (default: the recognizer's);
    max_active: predictions admitted at once, 503 with Retry-After above; body_timeout: seconds a body may
    stall between chunks; upload_deadline: seconds a whole upload may take (both answered 408).

    Example::

        app = create_app(Recognizer("runs/fer-resnet-s"), max_upload_mb=5)
        uvicorn.run(app, host="127.0.0.1", port=8000)
    """
    for name, v in (("max_upload_mb", max_upload_mb), ("max_active", max_active), ("body_timeout", body_timeout),
                    ("upload_deadline", upload_deadline), ("max_pixels", max_pixels)):
        if not (v > 0 and math.isfinite(v)):
            raise ValueError(f"{name} must be a positive finite number, got {v}")
    own_limit = getattr(recognizer, "max_pixels", None)
    if own_limit is not None and own_limit < max_pixels:  # it would refuse, with a 500, images the app accepts
        raise ValueError(f"max_pixels={max_pixels:,} is above the recognizer's own limit of {own_limit:,} pixels: "
                         f"build it with Recognizer(..., max_pixels={max_pixels})")
    max_bytes = int(max_upload_mb * 2**20)
    service = FaceService(recognizer, explain_method=explain_method, explain_model=explain_model,
                          model_name=model_name)
    info = {
        "model": service.model_name,
        "weights": service.weights,
        "classes": service.class_names,
        "backend": service.backend_name,
        "tta": str(getattr(recognizer, "tta", "none")),
        "explain_method": service.explain_method,
        "limits": {"max_upload_bytes": max_bytes, "max_upload_mb": max_upload_mb, "max_pixels": max_pixels,
                   "types": accepted_types(), "max_active": max_active, "body_timeout_s": body_timeout,
                   "upload_deadline_s": upload_deadline},
    }
    reader = BodyReader(body_timeout, upload_deadline)
    active = [0]  # predictions admitted now (the event loop is the only writer)

    decoding = threading.BoundedSemaphore(MAX_CONCURRENT_IMAGES)
    app = FastAPI(title="ferlab serve", version="1", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    app.state.info = info

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        for k, v in SECURITY_HEADERS.items():
            response.headers.setdefault(k, v)
        return response

    @app.exception_handler(UploadError)
    async def upload_error(request: Request, exc: UploadError):
        if isinstance(exc, ClientGone):  # nobody to answer: one line in the log, no traceback
            log.warning("%s: %s", _client(request), exc)
            return Response(status_code=exc.status)
        if isinstance(exc, UploadTimeout):
            log.warning("%s: %s", _client(request), exc)
        # The body may be partly unread: close the connection rather than drain it.
        return JSONResponse({"error": str(exc)}, status_code=exc.status, headers={"Connection": "close"})

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/api/info")
    async def api_info():
        return info

    @app.post("/predict")
    async def predict(request: Request):
        if active[0] >= max_active:  # over the limit: read and drop the body, then 503 (never a reset)
            await reader.drain(request, max_bytes + MULTIPART_OVERHEAD)
            return JSONResponse({"error": f"busy: {max_active} images are being analysed; retry in "
                                          f"{RETRY_AFTER_S} s"}, status_code=503,
                                headers={"Retry-After": str(RETRY_AFTER_S), "Connection": "close"})
        active[0] += 1
        try:
            stream, t, explain = live_params(request)  # a bad parameter fails before the upload is read
            data, name = await read_upload(request, max_bytes, reader)

            def analyse() -> dict[str, Any]:  # CPU work, off the event loop
                with decoding:  # bounds the memory of decoded images held at once
                    image = decode_image(data, max_pixels=max_pixels, name=name)  # (H, W, 3) BGR
                    try:
                        return service.analyse(image, stream=stream, t=t, explain=explain)
                    except StreamError as e:  # e.g. a stream's time going back
                        raise UploadError(str(e)) from None

            return await run_in_threadpool(analyse)
        finally:
            active[0] -= 1

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


QUERY_PARAMETERS = ("stream", "t", "explain")
_YES, _NO = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def live_params(request: Request) -> tuple[str | None, float | None, bool]:
    """The query parameters of a live webcam frame: ``stream`` (an id that ties the frames of one page together,
    so their faces are tracked), ``t`` (the frame's time in seconds) and ``explain`` (0 skips the heat maps). Any
    other parameter, or a value these do not take, is an UploadError (400): a client asking for what the server
    does not do learns it."""
    q = request.query_params
    unknown = sorted(set(q) - set(QUERY_PARAMETERS))
    if unknown:
        raise UploadError(f"unknown query parameter(s) {', '.join(map(repr, unknown))}: /predict takes "
                          f"{', '.join(QUERY_PARAMETERS)} (the model and its TTA are the server's)")
    stream, t = q.get("stream"), None
    if q.get("t") is not None:
        try:
            t = float(q["t"])
        except ValueError:
            raise UploadError(f"t must be a number of seconds, got {q['t'][:40]!r}") from None
    try:
        if stream is not None:
            check_stream(stream, t)
        elif t is not None:
            raise StreamError("t is the time of a live stream's frame: give stream too")
    except StreamError as e:
        raise UploadError(str(e)) from None
    explain = q.get("explain", "1").lower()
    if explain not in _YES + _NO:
        raise UploadError(f"explain must be one of {', '.join(_YES + _NO)}, got {q['explain'][:40]!r}")
    return stream, t, explain in _YES


def _client(request: Request) -> str:
    c = request.client
    return f"{c.host}:{c.port}" if c else "client"


class BodyReader:
    """Reads a request body chunk by chunk with a stall timeout and an overall deadline.

    ``stream(request)`` yields the body's chunks; it raises :class:`UploadTimeout` (408) when no chunk comes for
    ``timeout`` seconds or the body is not complete after ``deadline`` seconds, and :class:`ClientGone` when the
    client hangs up.
    """

    def __init__(self, timeout: float, deadline: float) -> None:
        self.timeout, self.deadline = timeout, deadline

    async def stream(self, request: Request):
        start, received = time.monotonic(), 0
        while True:
            left = self.deadline - (time.monotonic() - start)
            try:
                message = await asyncio.wait_for(request.receive(), timeout=max(0.0, min(self.timeout, left)))
            except TimeoutError:
                stalled = left > self.timeout
                raise UploadTimeout(
                    f"upload stalled: no data for {self.timeout:g} s after {received:,} bytes" if stalled else
                    f"upload too slow: not complete after {self.deadline:g} s ({received:,} bytes)") from None
            if message["type"] == "http.disconnect":
                raise ClientGone(f"client disconnected during the upload, after {received:,} bytes")
            chunk = message.get("body", b"")
            received += len(chunk)
            if chunk:
                yield chunk
            if not message.get("more_body", False):
                return

    async def drain(self, request: Request, cap: int) -> None:
        """Read and drop up to ``cap`` bytes of the body (so the answer is not lost to a reset)."""
        n = 0
        try:
            async for chunk in self.stream(request):
                n += len(chunk)
                if n > cap:
                    return
        except (UploadTimeout, ClientGone):
            return


async def read_upload(request: Request, max_bytes: int, reader: BodyReader | None = None) -> tuple[bytes, str]:
    """(image bytes, display name) of a ``multipart/form-data`` upload (field ``file``) or of a raw image body.

    Refuses a declared Content-Length over the cap before reading, and stops reading at the cap (413); ``reader``
    bounds the time the body may take (default: :data:`DEFAULT_BODY_TIMEOUT`, :data:`DEFAULT_UPLOAD_DEADLINE`).
    """
    reader = reader or BodyReader(DEFAULT_BODY_TIMEOUT, DEFAULT_UPLOAD_DEADLINE)
    content_type = request.headers.get("content-type", "")
    multipart = content_type.lower().startswith("multipart/form-data")
    body_cap = max_bytes + (MULTIPART_OVERHEAD if multipart else 0)
    check_content_length(request.headers.get("content-length"), body_cap, max_bytes)
    if multipart:
        collector = MultipartFileCollector(content_type, max_bytes)
        total = 0
        async for chunk in reader.stream(request):
            total += len(chunk)
            if total > body_cap:
                raise UploadTooLarge(f"upload is over the limit of {max_bytes:,} bytes ({max_bytes / 2**20:.1f} MiB)")
            collector.feed(chunk)
        filename, data = collector.finish()
        if not data:
            raise UploadError(f"{filename or 'upload'}: the file is empty")
        return data, filename or "upload"
    buf = CappedBuffer(max_bytes)
    async for chunk in reader.stream(request):
        buf.write(chunk)
    if not buf.data:
        raise UploadError("empty request: send an image as multipart/form-data (field 'file') or as the raw body")
    return bytes(buf.data), "upload"
