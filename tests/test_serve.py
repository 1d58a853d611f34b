"""ferlab serve: the JSON API on a real uvicorn server (limits, types, errors), the CLI, and the page in Chromium."""

from __future__ import annotations

import base64
import http.client
import json
import select
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import ARTIFACTS

from ferlab import CLASS_NAMES
from ferlab.serve.cli import DEFAULT_HOST, is_loopback
from ferlab.serve.uploads import UnsupportedType, UploadError, UploadTooLarge, decode_image, sniff_image_type

CLASSES = list(CLASS_NAMES)
LIMIT_MB = 1.0  # upload cap of the test server: the astronaut PNG (~0.45 MiB) fits, 1 MiB + 1 byte does not
LIMIT = int(LIMIT_MB * 2**20)


# ----------------------------------------------------------------------------- helpers
class LiveServer:
    """A real uvicorn server for ``app`` in a thread, on a free port of 127.0.0.1."""

    def __init__(self, app, **config) -> None:
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", **config))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()

    def request(self, method: str, path: str, body: bytes | Iterator[bytes] | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            chunked = body is not None and not isinstance(body, bytes)
            try:
                conn.request(method, path, body=body, headers=headers or {}, encode_chunked=chunked)
            except BrokenPipeError:
                pass  # the server answered early (e.g. 413 at the cap) and closed; its answer is still readable
            res = conn.getresponse()
            return res.status, {k.lower(): v for k, v in res.getheaders()}, res.read()
        finally:
            conn.close()

    def post_file(self, data: bytes, filename: str = "photo.png",
                  content_type: str = "application/octet-stream") -> tuple[int, dict]:
        body, ctype = multipart({"file": (filename, data, content_type)})
        status, _, raw = self.request("POST", "/predict", body, {"Content-Type": ctype})
        return status, json.loads(raw)


def multipart(fields: dict[str, tuple[str, bytes, str] | str]) -> tuple[bytes, str]:
    """A multipart/form-data body: name -> (filename, data, content type) for files, or a plain string value."""
    boundary = uuid.uuid4().hex
    out = bytearray()
    for name, v in fields.items():
        out += f"--{boundary}\r\n".encode()
        if isinstance(v, str):
            out += f'Content-Disposition: form-data; name="{name}"\r\n\r\n{v}\r\n'.encode()
        else:
            filename, data, ctype = v
            out += (f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                    f"Content-Type: {ctype}\r\n\r\n").encode() + data + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out), f"multipart/form-data; boundary={boundary}"


def encode(rgb: np.ndarray, ext: str) -> bytes:
    import cv2

    ok, buf = cv2.imencode(ext, np.ascontiguousarray(rgb[..., ::-1]))  # OpenCV wants BGR
    assert ok
    return buf.tobytes()


def astronaut() -> np.ndarray:
    from skimage import data

    return data.astronaut()  # (512, 512, 3) RGB; one frontal face, at about x 170-270, y 20-130


def no_face_image() -> np.ndarray:
    """A smooth colour gradient: nothing a face detector can fire on."""
    yy, xx = np.mgrid[0:240, 0:320]
    return np.stack([xx * 255 // 319, yy * 255 // 239, np.full_like(xx, 128)], -1).astype(np.uint8)


def decode_data_url(url: str) -> np.ndarray:
    import cv2

    head, b64 = url.split(",", 1)
    assert head == "data:image/png;base64"
    img = cv2.imdecode(np.frombuffer(base64.b64decode(b64), np.uint8), cv2.IMREAD_UNCHANGED)
    assert img is not None
    return img


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def recognizer(trained_tiny_run):
    from ferlab.recognize.api import Recognizer

    return Recognizer(model=trained_tiny_run, backend="torch")


@pytest.fixture(scope="module")
def server(recognizer) -> Iterator[LiveServer]:
    from ferlab.serve.app import create_app

    with LiveServer(create_app(recognizer, max_upload_mb=LIMIT_MB)) as s:
        yield s


# ----------------------------------------------------------------------------- unit: uploads
@pytest.mark.parametrize(("head", "mime"), [
    (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", "image/jpeg"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "image/png"),
    (b"RIFF\x10\x00\x00\x00WEBPVP8 ", "image/webp"),
    (b"GIF89a\x01\x00\x01\x00\x00\x00", None),
    (b"BM6\x00\x00\x00\x00\x00\x00\x006\x00", None),
    (b"hello, world", None),
    (b"", None),
])
def test_sniff_image_type(head, mime):
    assert sniff_image_type(head) == mime


def test_decode_image_limits_and_errors():
    png = encode(astronaut(), ".png")
    bgr = decode_image(png)
    assert bgr.shape == (512, 512, 3) and np.array_equal(bgr[..., ::-1], astronaut())  # PNG is lossless
    with pytest.raises(UploadTooLarge, match="512x512"):
        decode_image(png, max_pixels=512 * 512 - 1)
    with pytest.raises(UnsupportedType):
        decode_image(b"just some text, not an image")
    with pytest.raises(UploadError, match="JPEG") as e:
        decode_image(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8, name="bad.jpg")
    assert e.value.status == 400 and "bad.jpg" in str(e.value)


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.0.0.2", True), ("localhost", True), ("::1", True), ("[::1]", True),
    ("0.0.0.0", False), ("::", False), ("192.168.1.10", False), ("example.org", False),
])
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


# ----------------------------------------------------------------------------- API
@pytest.mark.parametrize("ext", [".png", ".jpg"])
def test_predict_astronaut(server, ext):
    status, out = server.post_file(encode(astronaut(), ext), f"astronaut{ext}")
    assert status == 200, out
    assert (out["width"], out["height"]) == (512, 512)
    assert out["model"] == "fer-resnet-s"
    assert len(out["faces"]) >= 1
    face = out["faces"][0]  # the largest face: the astronaut's
    x, y, w, h = face["box"]
    assert 120 < x + w / 2 < 320 and 20 < y + h / 2 < 160 and 40 < w < 250  # around her face, not elsewhere
    probs = face["probabilities"]
    assert list(probs) == CLASSES
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-4)
    assert all(0.0 <= p <= 1.0 for p in probs.values())
    assert face["label"] == max(probs, key=probs.get)
    assert face["score"] == pytest.approx(probs[face["label"]])
    overlay = decode_data_url(face["gradcam"])
    assert overlay.shape == (144, 144, 3) and overlay.std() > 5  # a real picture, not a blank square


def test_predict_raw_body_same_as_multipart(server):
    jpg = encode(astronaut(), ".jpg")
    status, _, raw = server.request("POST", "/predict", jpg, {"Content-Type": "image/jpeg"})
    assert status == 200
    status2, multi = server.post_file(jpg, "a.jpg")
    assert status2 == 200
    raw_faces = json.loads(raw)["faces"]
    assert [f["box"] for f in raw_faces] == [f["box"] for f in multi["faces"]]
    assert raw_faces[0]["probabilities"] == pytest.approx(multi["faces"][0]["probabilities"], abs=1e-6)


def test_no_face_gives_empty_list_and_message(server):
    status, out = server.post_file(encode(no_face_image(), ".png"), "gradient.png")
    assert status == 200
    assert out["faces"] == [] and "no face" in out["message"]
    assert (out["width"], out["height"]) == (320, 240)


def test_declared_oversize_is_refused_before_reading(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.putrequest("POST", "/predict")
        conn.putheader("Content-Type", "image/png")
        conn.putheader("Content-Length", str(50 * LIMIT))  # 50 MiB announced, only 1 KiB ever sent
        conn.endheaders()
        conn.send(encode(astronaut(), ".png")[:1024])
        res = conn.getresponse()  # answered without waiting for the rest of the body
        assert res.status == 413
        assert "limit" in json.loads(res.read())["error"]
    finally:
        conn.close()
    assert server.request("GET", "/healthz")[0] == 200


def post_chunked_until_answered(port: int, body: bytes, ctype: str, cap: int) -> tuple[int, bytes]:
    """POST ``body`` to /predict with chunked encoding (no Content-Length). Once past ``cap`` bytes, wait (up to
    30 s) for the server's answer before each further chunk and stop sending when it comes: the server answers
    413 at its cap and closes, and a client still pouring bytes in would race that answer (a reset can swallow
    it). A server that does not answer gets the whole body."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    try:
        sock.sendall((f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {ctype}\r\n"
                      "Transfer-Encoding: chunked\r\n\r\n").encode())
        sent = 0
        try:
            for i in range(0, len(body), 65536):
                if sent > cap and select.select([sock], [], [], 30)[0]:
                    break  # the server has answered
                chunk = body[i : i + 65536]
                sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                sent += len(chunk)
            else:
                sock.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed after answering; the answer is read below
        res = http.client.HTTPResponse(sock)
        res.begin()
        return res.status, res.read()
    finally:
        sock.close()


def test_streamed_oversize_is_cut_off(server):
    # chunked upload with no Content-Length: the server must count the bytes and stop at the cap
    body, ctype = multipart({"file": ("big.png", encode(astronaut(), ".png") + bytes(LIMIT), "image/png")})
    status, raw = post_chunked_until_answered(server.port, body, ctype, LIMIT)
    assert status == 413
    assert "limit" in json.loads(raw)["error"]
    # just under the cap is accepted
    data = encode(astronaut(), ".png")
    data += bytes(LIMIT - len(data))  # trailing zeros after IEND: still a valid PNG
    assert server.post_file(data, "padded.png")[0] == 200


@pytest.mark.parametrize(("data", "filename"), [
    (b"this is a text file, not a photo\n" * 20, "notes.txt"),
    (b"GIF89a\x01\x00\x01\x00\x80\x00\x00\xff\xff\xff\x00\x00\x00!\xf9\x04\x01\x00\x00\x00\x00,", "anim.gif"),
])
def test_wrong_type_is_415(server, data, filename):
    status, out = server.post_file(data, filename, "image/png")  # the declared type is not trusted
    assert status == 415
    assert "JPEG, PNG or WebP" in out["error"]


def test_corrupt_jpeg_is_400(server):
    rng = np.random.default_rng(0)
    data = b"\xff\xd8\xff\xe0" + rng.integers(0, 256, 4000, dtype=np.uint8).tobytes()
    status, out = server.post_file(data, "broken.jpg", "image/jpeg")
    assert status == 400
    assert "broken.jpg" in out["error"] and "JPEG" in out["error"]


def test_form_without_file_is_400(server):
    body, ctype = multipart({"comment": "no file here"})
    status, _, raw = server.request("POST", "/predict", body, {"Content-Type": ctype})
    assert status == 400 and "'file'" in json.loads(raw)["error"]
    status, _, raw = server.request("POST", "/predict", b"", {"Content-Type": "image/png"})
    assert status == 400 and "empty" in json.loads(raw)["error"]


def test_predict_writes_no_files(server):
    """Uploads are handled in memory: no file is opened for writing while a request is served."""
    writes: list[str] = []
    active = threading.Event()

    def hook(event: str, args: tuple) -> None:
        if active.is_set() and event == "open" and isinstance(args[0], str | bytes | Path):
            mode, flags = (args[1] or "r"), (args[2] or 0)
            if any(c in str(mode) for c in "wax+") or flags & 0o3:  # O_WRONLY | O_RDWR
                writes.append(str(args[0]))

    sys.addaudithook(hook)  # cannot be removed; inert once ``active`` is cleared
    active.set()
    try:
        status, out = server.post_file(encode(astronaut(), ".png"), "a.png")
    finally:
        active.clear()
    assert status == 200 and out["faces"]
    assert writes == []


def test_info_health_and_page(server):
    status, _, raw = server.request("GET", "/api/info")
    info = json.loads(raw)
    assert status == 200
    assert info["classes"] == CLASSES and info["model"] == "fer-resnet-s"
    assert info["limits"]["max_upload_bytes"] == LIMIT
    assert info["limits"]["types"] == ["image/jpeg", "image/png", "image/webp"]
    assert info["explain_method"] == "gradcam"
    assert server.request("GET", "/healthz")[:3:2] == (200, b'{"status":"ok"}')
    status, headers, page = server.request("GET", "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert b'id="file-input"' in page and b"/static/app.js" in page
    assert "default-src 'self'" in headers["content-security-policy"]
    assert b"http://" not in page and b"https://" not in page  # nothing from the network: works offline
    for asset in ("app.js", "style.css", "favicon.svg"):
        status, _, body = server.request("GET", f"/static/{asset}")
        body = body.replace(b'xmlns="http://www.w3.org/2000/svg"', b"")  # a namespace name, not a download
        assert status == 200 and b"http://" not in body and b"https://" not in body


# ----------------------------------------------------------------------------- CLI
# ----------------------------------------------------------------------------- load and abuse
def stalled_upload(port: int, length: int = 100_000) -> socket.socket:
    """A connection that sends an upload's headers and 3 bytes of its body, then nothing."""
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
              f"Content-Length: {length}\r\n\r\nabc".encode())
    return s


def status_of(sock: socket.socket) -> str:
    head = sock.recv(64).decode("latin-1")
    return head.split(" ")[1] if head.startswith("HTTP/") else "closed"


def test_stalled_uploads_are_answered_408_and_free_their_slots(recognizer):
    from ferlab.serve.app import create_app

    app = create_app(recognizer, max_upload_mb=LIMIT_MB, max_active=2, body_timeout=1.0, explain_method=None)
    png = encode(astronaut(), ".png")
    with LiveServer(app) as srv:
        stalled = [stalled_upload(srv.port) for _ in range(3)]  # two hold the slots, the third waits its turn
        time.sleep(0.2)
        t0 = time.monotonic()
        status, headers, body = srv.request("POST", "/predict", png, {"Content-Type": "image/png"})
        assert status == 503 and headers["retry-after"] == "1" and b"busy" in body  # answered, not reset
        while status != 200 and time.monotonic() - t0 < 10:
            time.sleep(0.1)
            status, _, _ = srv.request("POST", "/predict", png, {"Content-Type": "image/png"})
        assert status == 200 and time.monotonic() - t0 < 3  # freed one stall timeout (1 s) later, not minutes
        answers = sorted(status_of(s) for s in stalled)
        assert answers == ["408", "408", "503"]  # the stalled ones timed out; the third had waited its turn


def test_over_the_limit_an_upload_gets_503_with_retry_after_never_a_reset(recognizer):
    from ferlab.serve.app import create_app

    app = create_app(recognizer, max_upload_mb=LIMIT_MB, max_active=1, body_timeout=5.0, explain_method=None)
    png = encode(astronaut(), ".png")  # ~0.45 MiB: far more than the socket buffers, so an early answer would reset
    with LiveServer(app) as srv:
        holder = stalled_upload(srv.port)
        time.sleep(0.2)
        for _ in range(3):
            status, headers, body = srv.request("POST", "/predict", png, {"Content-Type": "image/png"})
            assert (status, headers["retry-after"]) == (503, "1") and json.loads(body)["error"].startswith("busy")
        holder.close()


def test_a_client_that_hangs_up_mid_upload_is_one_log_line(recognizer, capfd):
    from ferlab.serve.app import create_app

    with LiveServer(create_app(recognizer, max_upload_mb=LIMIT_MB, explain_method=None)) as srv:
        for _ in range(2):
            s = stalled_upload(srv.port)
            time.sleep(0.2)
            s.close()
        time.sleep(0.5)
        assert srv.request("GET", "/healthz")[0] == 200
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if "disconnected" in line]
    assert len(lines) == 2 and "after 3 bytes" in lines[0]
    assert "Traceback" not in err and "ClientDisconnect" not in err


def test_a_connection_without_a_request_head_is_closed():
    from fastapi import FastAPI

    from ferlab.serve.cli import guarded_protocol

    with LiveServer(FastAPI(), http=guarded_protocol(0.5), timeout_keep_alive=30) as srv:
        silent = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
        slow = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
        slow.sendall(b"GET / HT")  # a head that never ends
        t0 = time.monotonic()
        assert silent.recv(1) == b"" and slow.recv(1) == b""  # closed by the server
        assert time.monotonic() - t0 < 3
        assert srv.request("GET", "/healthz")[0] == 404  # the server itself goes on (this app has no routes)


def test_cli_serve_checks_the_port_before_announcing_it(trained_tiny_run, monkeypatch, capsys):
    import uvicorn

    from ferlab.cli import main

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append(kw))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--model", str(trained_tiny_run), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "open http" not in err and not calls


def test_cli_defaults_bind_localhost():
    from ferlab.cli import build_parser

    args = build_parser().parse_args(["serve"])
    assert args.host == DEFAULT_HOST == "127.0.0.1"
    assert (args.port, args.max_upload_mb, args.backend) == (8000, 10.0, None)  # backend None: torch for a run


@pytest.mark.parametrize(("host", "backend", "warns"), [(None, None, False), ("0.0.0.0", "onnx", True)])
def test_cli_serve_runs_uvicorn(trained_tiny_run, monkeypatch, capsys, host, backend, warns):
    import uvicorn

    from ferlab.cli import main

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append((app, kw)))
    argv = ["serve", "--model", str(trained_tiny_run), "--port", "8123", "--max-upload-mb", "2"]
    argv += (["--host", host] if host else []) + (["--backend", backend] if backend else [])
    assert main(argv) == 0
    (app, kw), = calls
    assert kw["host"] == (host or "127.0.0.1") and kw["port"] == 8123
    # uvicorn's connection cap is a backstop far above the app's admission limit, which answers 503 properly
    assert kw["limit_concurrency"] > app.state.info["limits"]["max_active"] == 16
    assert kw["timeout_keep_alive"] == 5 and kw["http"].__name__ == "GuardedH11Protocol"
    info = app.state.info
    assert info["limits"]["max_upload_bytes"] == 2 * 2**20
    assert info["weights"] == str(trained_tiny_run)  # which weights, not only the architecture's name
    assert (info["backend"], info["explain_method"]) == (backend or "torch", "gradcam")
    err = capsys.readouterr().err
    assert ("warning" in err) is warns
    assert "http://" in err and f"weights {trained_tiny_run}" in err
    # the app the command built serves predictions (ONNX Runtime included, overlays from the PyTorch weights)
    with LiveServer(app) as srv:
        status, out = srv.post_file(encode(astronaut(), ".jpg"), "a.jpg")
    assert status == 200 and out["faces"] and out["faces"][0]["gradcam"].startswith("data:image/png;base64,")


@pytest.mark.parametrize("explain", ["saliency", "none"])
def test_cli_serve_explain_log_level_and_max_pixels_reach_the_app(trained_tiny_run, monkeypatch, explain):
    import uvicorn

    from ferlab.cli import main

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append((app, kw)))
    argv = ["serve", "--model", str(trained_tiny_run), "--explain", explain, "--log-level", "warning",
            "--max-pixels", str(512 * 512 - 1)]
    assert main(argv) == 0
    (app, kw), = calls
    assert kw["log_level"] == "warning"
    info = app.state.info
    assert info["explain_method"] == (None if explain == "none" else explain)
    assert info["limits"]["max_pixels"] == 512 * 512 - 1
    with LiveServer(app) as srv:
        status, out = srv.post_file(encode(astronaut(), ".png"), "big.png")  # 512 x 512: one pixel over the limit
        assert status == 413 and "512x512" in out["error"] and "big.png" in out["error"]
        status, out = srv.post_file(encode(np.ascontiguousarray(astronaut()[:300, 100:400]), ".png"), "face.png")
    assert status == 200 and out["faces"]
    assert out["explain_method"] == info["explain_method"]
    overlay = out["faces"][0]["gradcam"]  # the overlay's key in the response, whatever the method
    assert (overlay is None) is (explain == "none")


def test_cli_serve_max_pixels_above_the_default_reaches_the_recognizer(trained_tiny_run, monkeypatch):
    import uvicorn

    from ferlab.cli import main
    from ferlab.images import DEFAULT_MAX_PIXELS

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append(app))
    assert main(["serve", "--model", str(trained_tiny_run), "--explain", "none",
                 "--max-pixels", str(2 * DEFAULT_MAX_PIXELS)]) == 0
    (app,) = calls
    assert app.state.info["limits"]["max_pixels"] == 2 * DEFAULT_MAX_PIXELS  # and the recognizer accepts as much:
    assert app.state.service.recognizer.max_pixels == 2 * DEFAULT_MAX_PIXELS


def test_an_app_accepting_more_pixels_than_its_recognizer_is_refused_when_built(trained_tiny_run):
    from ferlab.recognize.api import Recognizer
    from ferlab.serve.app import create_app

    small = Recognizer(model=trained_tiny_run, backend="torch", max_pixels=300 * 300)
    with pytest.raises(ValueError, match="max_pixels=90,001 is above the recognizer's own limit of 90,000"):
        create_app(small, max_pixels=300 * 300 + 1)
    with LiveServer(create_app(small, max_pixels=300 * 300)) as srv:  # at the recognizer's limit: served
        status, out = srv.post_file(encode(np.ascontiguousarray(astronaut()[:300, 100:400]), ".png"), "face.png")
    assert status == 200 and out["faces"]


def test_cli_serve_bad_model_is_clear_error(tmp_path, capsys):
    from ferlab.cli import main

    assert main(["serve", "--model", str(tmp_path / "missing")]) == 2
    assert "ferlab serve: error:" in capsys.readouterr().err


# ----------------------------------------------------------------------------- browser (end to end)
def test_browser_upload_shows_boxes_bars_and_gradcam(browser, recognizer, tmp_path):
    from ferlab.serve.app import create_app

    photo = tmp_path / "astronaut.png"
    photo.write_bytes(encode(astronaut(), ".png"))
    with LiveServer(create_app(recognizer)) as srv:  # the defaults of `ferlab serve`
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        errors: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        try:
            page.goto(srv.url + "/")
            page.wait_for_selector("#model-info >> text=Model: fer-resnet-s", timeout=10_000)
            # which weights are loaded, not only the architecture
            assert f"weights {recognizer.weights}" in page.inner_text("#model-info")
            # the empty state shows no results panel and no broken image before a photo is chosen
            assert page.is_hidden("#results") and page.is_hidden("#photo")
            page.set_input_files("#file-input", str(photo))
            page.wait_for_selector(".face-box .face-label", timeout=30_000)

            label = page.locator(".face-box .face-label").first
            assert label.get_attribute("data-label") in CLASSES
            assert label.get_attribute("data-label") in label.inner_text()
            card = page.locator(".face-card").first
            bars = card.locator(".bar")
            assert bars.count() == 7
            assert [bars.nth(i).get_attribute("data-class") for i in range(7)] == CLASSES
            assert sum(float(bars.nth(i).get_attribute("data-p")) for i in range(7)) == pytest.approx(1, abs=1e-4)
            assert card.locator(".bar[data-class=Happy] .pct").inner_text().endswith("%")
            assert card.locator(".bar.is-top").get_attribute("data-class") == label.get_attribute("data-label")
            page.wait_for_function("() => { const i = document.querySelector('.face-card img.gradcam');"
                                   " return i && i.complete && i.naturalWidth > 0; }", timeout=10_000)
            assert page.eval_on_selector("#photo", "i => i.naturalWidth") == 512
            # the box sits on the photo
            box, img = page.locator(".face-box").first.bounding_box(), page.locator("#photo").bounding_box()
            assert img["x"] <= box["x"] and box["x"] + box["width"] <= img["x"] + img["width"] + 1
            assert img["y"] <= box["y"] and box["y"] + box["height"] <= img["y"] + img["height"] + 1
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "serve.png"), full_page=True)
            assert errors == []

            # an error reaches the user: a text file named .png is refused by the server (415)
            fake = tmp_path / "fake.png"
            fake.write_text("not an image")
            page.set_input_files("#file-input", str(fake))
            page.wait_for_selector("#error:not([hidden])", timeout=10_000)
            assert "JPEG, PNG or WebP" in page.inner_text("#error")
        finally:
            page.close()


def test_browser_webcam_capture(browser, recognizer, tmp_path):
    """The webcam path: Chromium's fake camera plays the astronaut photo; capture, POST, see her face labelled."""
    import cv2
    from conftest import CHROMIUM, CHROMIUM_ARGS

    from ferlab.serve.app import create_app

    video = tmp_path / "astronaut.y4m"  # raw YUV 4:2:0 frames, the format Chromium's fake capture reads
    yuv = cv2.cvtColor(np.ascontiguousarray(astronaut()[..., ::-1]), cv2.COLOR_BGR2YUV_I420)  # (768, 512)
    video.write_bytes(b"YUV4MPEG2 W512 H512 F10:1 Ip A1:1 C420jpeg\nFRAME\n" + yuv.tobytes())
    cam = browser.browser_type.launch(executable_path=CHROMIUM, headless=True, args=[
        *CHROMIUM_ARGS, "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-video-capture={video}"])
    try:
        with LiveServer(create_app(recognizer)) as srv:
            page = cam.new_page()
            errors: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(srv.url + "/")
            page.wait_for_selector("#model-info >> text=Model:", timeout=10_000)
            page.click("#webcam-start")
            page.wait_for_function("() => document.getElementById('webcam-video').videoWidth > 0", timeout=10_000)
            page.click("#webcam-capture")
            page.wait_for_selector(".face-box .face-label", timeout=30_000)
            assert page.locator(".face-box .face-label").first.get_attribute("data-label") in CLASSES
            assert page.locator(".face-card").first.locator(".bar").count() == 7
            assert page.eval_on_selector("#photo", "i => i.naturalWidth") == 512  # the captured frame
            # live tracking: frames go one after another; the face keeps its track id across them
            page.click("#webcam-live")
            page.wait_for_function("() => /Live: 1 face/.test(document.getElementById('status').textContent)",
                                   timeout=30_000)
            page.wait_for_function("() => { const m = document.getElementById('status').textContent"
                                   ".match(/Live: .*?([0-9.]+) frames/); return m && document.querySelector("
                                   "'.face-box[data-track]'); }", timeout=30_000)
            first = page.locator(".face-box").first.get_attribute("data-track")
            page.wait_for_timeout(1500)  # more frames
            assert page.locator(".face-box").first.get_attribute("data-track") == first == "1"
            assert page.locator(".face-card .face-title").first.inner_text().startswith("Person #1")
            assert page.locator("#webcam-capture").is_disabled()
            page.click("#webcam-live")  # stop
            assert page.locator("#webcam-live").get_attribute("aria-pressed") == "false"
            page.click("#webcam-stop")
            assert page.locator("#webcam-panel").is_hidden()
            assert errors == []
    finally:
        cam.close()


def test_a_live_face_heat_map_explains_the_smoothed_label_it_is_answered_with(recognizer, monkeypatch):
    import ferlab.explain
    from ferlab.serve.service import FaceService

    service = FaceService(recognizer, explain_method="saliency")
    bgr = np.ascontiguousarray(astronaut()[..., ::-1])
    raw = service.analyse(bgr, explain=False)["faces"][0]["label"]
    other = next(c for c in service.class_names if c != raw)
    track = service._track

    def smoothed_elsewhere(stream, faces, t):  # the stream's history outvotes this frame's own top class
        ids, smoothed = track(stream, faces, t)
        smoothed = np.zeros_like(smoothed)
        smoothed[:, service.class_names.index(other)] = 1.0
        return ids, smoothed

    targets = []
    real = ferlab.explain.attribute
    monkeypatch.setattr(service, "_track", smoothed_elsewhere)
    monkeypatch.setattr(ferlab.explain, "attribute",
                        lambda model, x, method, target: targets.append(target.tolist()) or real(model, x, method,
                                                                                                 target=target))
    face = service.analyse(bgr, stream="cam-1", t=0.0)["faces"][0]
    assert face["label"] == other != raw and face["gradcam"] is not None
    assert targets == [[service.class_names.index(other)]]


def test_live_stream_frames_keep_their_track_ids(recognizer):
    """POST /predict?stream=ID: the service tracks a stream's faces across calls with the recognizer's tracker."""
    import cv2

    from ferlab.serve.service import MAX_STREAMS, FaceService, StreamError

    service = FaceService(recognizer)
    bgr = np.ascontiguousarray(astronaut()[..., ::-1])  # (512, 512, 3)
    moved = np.ascontiguousarray(np.roll(bgr, 6, axis=1))  # the face 6 px to the right
    a = service.analyse(bgr, stream="cam-1", t=0.0, explain=False)
    b = service.analyse(moved, stream="cam-1", t=0.1, explain=False)
    assert len(a["faces"]) == len(b["faces"]) == 1
    assert a["faces"][0]["track"] == b["faces"][0]["track"] == 1
    assert a["faces"][0]["gradcam"] is None and a["stream"] == "cam-1" and b["t"] == 0.1
    fb = b["faces"][0]
    assert set(fb["smoothed"]) == set(fb["probabilities"]) and fb["label"] == max(fb["smoothed"],
                                                                                   key=fb["smoothed"].get)
    assert abs(sum(fb["smoothed"].values()) - 1) < 1e-5
    # another stream starts its own tracks; a photo without a stream has no track
    assert service.analyse(bgr, stream="cam-2", t=0.0, explain=False)["faces"][0]["track"] == 1
    assert "track" not in service.analyse(bgr)["faces"][0]
    far = np.zeros_like(bgr)
    far[:, :256] = cv2.resize(bgr, (256, 512))  # a different box: a new track in the same stream
    assert service.analyse(far, stream="cam-1", t=0.2, explain=False)["faces"][0]["track"] == 2
    for i in range(MAX_STREAMS + 3):
        service.analyse(far[:64, :64], stream=f"s{i}", t=0.0, explain=False)
    assert len(service._streams) == MAX_STREAMS and "cam-1" not in service._streams  # the oldest forgotten
    for bad, t in (("has space", 0.0), ("x" * 65, 0.0), ("ok", float("nan")), ("ok", -1.0)):
        with pytest.raises(StreamError):
            service.analyse(bgr, stream=bad, t=t)


@pytest.mark.parametrize("query,message", [("stream=a%20b", "stream must be"),
                                           ("stream=a&t=soon", "t must be a number"),
                                           ("stream=a&t=-2", "t must be a finite"),
                                           ("t=nan", "give stream too"),
                                           ("model=other&tta=affine", "unknown query parameter(s) 'model', 'tta'"),
                                           ("explain=maybe", "explain must be one of")])
def test_bad_live_parameters_are_400(server, query, message):
    status, _, body = server.request("POST", f"/predict?{query}", encode(astronaut(), ".png"),
                                     {"Content-Type": "image/png"})
    assert status == 400 and message in json.loads(body)["error"]


def test_live_predict_over_http(server):
    png = encode(astronaut(), ".png")
    answers = [json.loads(server.request("POST", f"/predict?stream=http-1&t={t}&explain=0", png,
                                         {"Content-Type": "image/png"})[2]) for t in (0, 0.2)]
    assert [a["faces"][0]["track"] for a in answers] == [1, 1]
    assert answers[1]["faces"][0]["gradcam"] is None


def test_a_stream_whose_time_goes_back_is_400_and_off_is_a_way_to_say_no(server):
    png = encode(astronaut(), ".png")
    answers = [server.request("POST", f"/predict?stream=back-1&t={t}&explain=off", png,
                              {"Content-Type": "image/png"}) for t in (5, 5, 4)]
    assert [a[0] for a in answers] == [200, 400, 400]
    assert "t must grow within a stream" in json.loads(answers[2][2])["error"]
    assert json.loads(answers[0][2])["faces"][0]["gradcam"] is None  # explain=off: no heat map


def test_a_file_field_without_a_file_name_is_the_image_and_a_long_boundary_is_400(server):
    png = encode(astronaut(), ".png")
    boundary = "b" * 40
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"\r\n\r\n').encode() + png + \
        f"\r\n--{boundary}--\r\n".encode()  # what curl -F "file=<photo.png" sends
    status, _, raw = server.request("POST", "/predict", body,
                                    {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status == 200 and len(json.loads(raw)["faces"]) == 1
    long = "b" * 300  # over the multipart parser's limit
    status, _, raw = server.request("POST", "/predict", body.replace(boundary.encode(), long.encode()),
                                    {"Content-Type": f"multipart/form-data; boundary={long}"})
    assert status == 400 and "malformed multipart" in json.loads(raw)["error"]


@pytest.mark.parametrize(("option", "value"), [("max_upload_mb", float("inf")), ("max_pixels", 0)])
def test_limits_must_be_positive_and_finite(recognizer, option, value):
    from ferlab.serve.app import create_app

    with pytest.raises(ValueError, match=f"{option} must be a positive finite number"):
        create_app(recognizer, **{option: value})
