"""The FastAPI application of ``ferlab serve``: a static page, ``POST /predict`` (JSON), ``/api/info``, ``/healthz``.

Build it with :func:`create_app`; nothing is created at import. Uploads are capped twice: a declared
Content-Length over the cap is refused (413) before any of the body is read, and the streamed body is counted
as it arrives, so a chunked or lying client is cut off at the cap too. The image is decoded in memory; nothing
is written to disk.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from ferlab.serve.service import FaceService
from ferlab.serve.uploads import (
    DEFAULT_MAX_PIXELS,
    MULTIPART_OVERHEAD,
    CappedBuffer,
    MultipartFileCollector,
    UploadError,
    UploadTooLarge,
    accepted_types,
    check_content_length,
    decode_image,
)

STATIC_DIR = Path(__file__).resolve().parent / "static"
DEFAULT_MAX_UPLOAD_MB = 10.0
MAX_CONNECTIONS = 16  # uvicorn answers 503 above this: bounds the upload bodies held at once (each <= the cap)
MAX_CONCURRENT_IMAGES = 2  # images decoded at once: each up to max_pixels x 8 bytes (16-bit RGBA PNG) while
# decoding, then max_pixels x 3 (BGR)

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
               explain_model: tuple[Any, Any] | None = None, model_name: str | None = None) -> FastAPI:
    """A FastAPI app serving ``recognizer`` (a :class:`ferlab.recognize.api.Recognizer`).

    max_upload_mb: largest accepted image file (MiB); max_pixels: largest accepted image (width x height);
    explain_method: attribution shown per face (``ferlab.explain.METHODS``; None: no overlay);
    explain_model: (PyTorch model, normalizer) for the overlays when the recognizer's backend is not torch;
    model_name: shown on the page and in responses (default: the recognizer's).

    Example::

        app = create_app(Recognizer("runs/fer-resnet-s"), max_upload_mb=5)
        uvicorn.run(app, host="127.0.0.1", port=8000)
    """
    if max_upload_mb <= 0:
        raise ValueError(f"max_upload_mb must be positive, got {max_upload_mb}")
    max_bytes = int(max_upload_mb * 2**20)
    service = FaceService(recognizer, explain_method=explain_method, explain_model=explain_model,
                          model_name=model_name)
    info = {
        "model": service.model_name,
        "classes": service.class_names,
        "backend": service.backend_name,
        "explain_method": service.explain_method,
        "limits": {"max_upload_bytes": max_bytes, "max_upload_mb": max_upload_mb, "max_pixels": max_pixels,
                   "types": accepted_types()},
    }

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
        data, name = await read_upload(request, max_bytes)

        def analyse() -> dict[str, Any]:  # CPU work, off the event loop
            with decoding:  # bounds the memory of decoded images held at once
                image = decode_image(data, max_pixels=max_pixels, name=name)  # (H, W, 3) BGR
                return service.analyse(image)

        return await run_in_threadpool(analyse)

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


async def read_upload(request: Request, max_bytes: int) -> tuple[bytes, str]:
    """(image bytes, display name) of a ``multipart/form-data`` upload (field ``file``) or of a raw image body.

    Refuses a declared Content-Length over the cap before reading, and stops reading at the cap (413).
    """
    content_type = request.headers.get("content-type", "")
    multipart = content_type.lower().startswith("multipart/form-data")
    body_cap = max_bytes + (MULTIPART_OVERHEAD if multipart else 0)
    check_content_length(request.headers.get("content-length"), body_cap, max_bytes)
    if multipart:
        collector = MultipartFileCollector(content_type, max_bytes)
        total = 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > body_cap:
                raise UploadTooLarge(f"upload is over the limit of {max_bytes:,} bytes ({max_bytes / 2**20:.1f} MiB)")
            collector.feed(chunk)
        filename, data = collector.finish()
        if not data:
            raise UploadError(f"{filename or 'upload'}: the file is empty")
        return data, filename or "upload"
    buf = CappedBuffer(max_bytes)
    async for chunk in request.stream():
        buf.write(chunk)
    if not buf.data:
        raise UploadError("empty request: send an image as multipart/form-data (field 'file') or as the raw body")
    return bytes(buf.data), "upload"
