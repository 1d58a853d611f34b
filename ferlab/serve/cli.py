"""Sub-commands of ferlab.serve (registered through ferlab.cli.COMMAND_MODULES)."""

from __future__ import annotations

import argparse
import ipaddress
import socket
import sys

from ferlab.images import pixel_count
from ferlab.serve.uploads import DEFAULT_BODY_TIMEOUT, DEFAULT_MAX_ACTIVE, DEFAULT_MAX_PIXELS, DEFAULT_UPLOAD_DEADLINE

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
# uvicorn's own cap on open connections (it answers 503 above it): far above the app's admission limit, which
# answers 503 properly (after reading the body); it bounds file descriptors and per-connection memory
MAX_CONNECTIONS = 256
KEEP_ALIVE_S = 5.0  # an idle keep-alive connection is closed after this (uvicorn's timeout_keep_alive)
HEADER_TIMEOUT_S = 10.0  # a connection must send a complete request head within this, or it is closed


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine (localhost, 127.0.0.0/8, ::1)."""
    if host.lower() in ("localhost", "localhost.localdomain", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name other than localhost: may resolve to any interface
        return False


def check_port_free(host: str, port: int) -> None:
    """OSError naming the address when ``host:port`` cannot be bound (another server holds it), checked before
    anything is announced."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise OSError(f"--host {host}: cannot resolve it ({e.strerror})") from None
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT does not count
        try:
            s.bind(addr)
        except OSError as e:
            raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e} (another server may be running "
                          "there; choose another --port)") from None


def guarded_protocol(header_timeout: float = HEADER_TIMEOUT_S) -> type:
    """uvicorn's h11 protocol, closing a connection that sends no complete request head within
    ``header_timeout`` seconds of connecting or of its last answer (slow or silent clients hold no slot)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport) -> None:  # type: ignore[no-untyped-def]
            super().connection_made(transport)
            self._arm_header_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_header_timer()

        def _arm_header_timer(self) -> None:
            waiting_after = self.cycle  # the request answered last (None: none yet)
            self.loop.call_later(header_timeout, self._header_timeout, waiting_after)

        def _header_timeout(self, waiting_after: object) -> None:
            if self.cycle is waiting_after and not self.transport.is_closing():  # no new request began
                self.transport.close()

    return GuardedH11Protocol


def _explain_model(spec: str, backend: str | None) -> tuple[object, object] | None:
    """(PyTorch model, normalizer) for the overlays when inference runs on ONNX Runtime; None if not needed/possible."""
    if backend != "onnx" or spec.lower().endswith(".onnx"):
        return None  # torch: the recognizer's own model serves; an .onnx file has no PyTorch weights
    from ferlab.inference.loader import load_model

    first = load_model(spec).members[0]  # an ensemble's overlays show its first member's saliency
    return first.module, first.normalizer


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from ferlab.inference.backends import default_model
    from ferlab.recognize.api import Recognizer
    from ferlab.serve.app import create_app

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    check_port_free(args.host, args.port)  # before the model loads and before the "open" line
    if not is_loopback(args.host):
        print(f"ferlab serve: warning: binding to {args.host} makes the demo reachable from other machines; it has "
              "no authentication (use --host 127.0.0.1 to keep it local)", file=sys.stderr)
    spec = str(args.model) if args.model is not None else default_model()
    explain = None if args.explain == "none" else args.explain
    recognizer = Recognizer(model=spec, backend=args.backend, precision=args.precision, tta=args.tta,
                            max_pixels=args.max_pixels)
    app = create_app(recognizer, max_upload_mb=args.max_upload_mb, max_pixels=args.max_pixels, explain_method=explain,
                     explain_model=_explain_model(spec, args.backend) if explain else None,
                     max_active=args.max_active, body_timeout=args.body_timeout,
                     upload_deadline=args.upload_deadline)
    info = app.state.info
    if explain and info["explain_method"] is None:
        print(f"ferlab serve: note: {spec} has no PyTorch weights; faces are shown without {explain} overlays",
              file=sys.stderr)
    elif explain and info["explain_method"] != explain:
        print(f"ferlab serve: note: {info['model']} has no spatial feature map for {explain}; showing "
              f"{info['explain_method']} overlays instead", file=sys.stderr)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"ferlab serve: model {info['model']}, weights {info['weights']} ({info['backend']}, TTA {info['tta']}); "
          f"open http://{shown}:{args.port}/ (Ctrl+C to stop)", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, server_header=False,
                limit_concurrency=MAX_CONNECTIONS, timeout_keep_alive=KEEP_ALIVE_S,
                http=guarded_protocol(HEADER_TIMEOUT_S))
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add this package's sub-commands to the ferlab parser."""
    from ferlab.hardware import PRECISIONS
    from ferlab.inference.options import PER_FILE_TTA, tta_argument

    s = sub.add_parser("serve", help="local web demo and JSON API: upload a photo or use the webcam",
                       description="Serve a web page (photo upload, webcam) and a JSON API (POST /predict) that "
                                   "detect faces and show their expression probabilities and Grad-CAM overlays.")
    s.add_argument("--model", default=None, metavar="SPEC",
                   help="shipped model or ensemble name (`ferlab models --pretrained`), run directory, "
                        ".safetensors checkpoint or exported .onnx file (default: the shipped default model)")
    s.add_argument("--host", default=DEFAULT_HOST,
                   help=f"interface to bind (default {DEFAULT_HOST}: this machine only; a warning is printed "
                        "for any other)")
    s.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    s.add_argument("--max-upload-mb", type=float, default=10.0, help="largest accepted upload in MiB (default 10)")
    s.add_argument("--max-pixels", type=pixel_count, default=DEFAULT_MAX_PIXELS,
                   help=f"largest accepted image in pixels, checked before decoding (default {DEFAULT_MAX_PIXELS:,})")
    s.add_argument("--max-active", type=int, default=DEFAULT_MAX_ACTIVE,
                   help=f"predictions admitted at once; more are answered 503 with Retry-After (default "
                        f"{DEFAULT_MAX_ACTIVE})")
    s.add_argument("--body-timeout", type=float, default=DEFAULT_BODY_TIMEOUT, metavar="SECONDS",
                   help=f"an upload that sends nothing for this long is answered 408 and its slot freed (default "
                        f"{DEFAULT_BODY_TIMEOUT:g})")
    s.add_argument("--upload-deadline", type=float, default=DEFAULT_UPLOAD_DEADLINE, metavar="SECONDS",
                   help=f"an upload not complete after this long is answered 408 (default {DEFAULT_UPLOAD_DEADLINE:g})")
    s.add_argument("--backend", default=None, choices=("torch", "onnx"),
                   help="inference backend (default: onnx for an .onnx model, else torch); with onnx the overlays "
                        "still come from the PyTorch weights")
    s.add_argument("--tta", **tta_argument(**PER_FILE_TTA))
    s.add_argument("--precision", default=None, choices=PRECISIONS,
                   help="torch backend precision: fp32 (default), bf16, or auto (bf16 where this CPU has bf16 "
                        "instructions)")
    s.add_argument("--explain", default="gradcam", metavar="METHOD",
                   help="attribution overlay per face: gradcam (default), saliency, ... or none")
    s.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                   help="server log level (default info: one line per request)")
    s.set_defaults(func=cmd_serve)
