"""Sub-commands of ferlab.serve (registered through ferlab.cli.COMMAND_MODULES)."""

from __future__ import annotations

import argparse
import ipaddress
import sys

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine (localhost, 127.0.0.0/8, ::1)."""
    if host.lower() in ("localhost", "localhost.localdomain", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name other than localhost: may resolve to any interface
        return False


def _explain_model(spec: str, backend: str | None) -> tuple[object, object] | None:
    """(PyTorch model, normalizer) for the overlays when inference runs on ONNX Runtime; None if not needed/possible."""
    if backend != "onnx" or spec.lower().endswith(".onnx"):
        return None  # torch: the recognizer's own model serves; an .onnx file has no PyTorch weights
    from ferlab.checkpoint import load_checkpoint, normalizer_from_meta

    model, meta = load_checkpoint(spec)
    return model, normalizer_from_meta(meta)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from ferlab.recognize.api import Recognizer
    from ferlab.recognize.backends import default_model
    from ferlab.serve.app import MAX_CONNECTIONS, create_app

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    if not is_loopback(args.host):
        print(f"ferlab serve: warning: binding to {args.host} makes the demo reachable from other machines; it has "
              "no authentication (use --host 127.0.0.1 to keep it local)", file=sys.stderr)
    spec = str(args.model) if args.model is not None else default_model()
    explain = None if args.explain == "none" else args.explain
    recognizer = Recognizer(model=spec, backend=args.backend)
    app = create_app(recognizer, max_upload_mb=args.max_upload_mb, max_pixels=args.max_pixels, explain_method=explain,
                     explain_model=_explain_model(spec, args.backend) if explain else None)
    info = app.state.info
    if explain and info["explain_method"] is None:
        print(f"ferlab serve: note: {spec} has no PyTorch weights; faces are shown without {explain} overlays",
              file=sys.stderr)
    elif explain and info["explain_method"] != explain:
        print(f"ferlab serve: note: {info['model']} has no spatial feature map for {explain}; showing "
              f"{info['explain_method']} overlays instead", file=sys.stderr)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"ferlab serve: model {info['model']} ({info['backend']}); open http://{shown}:{args.port}/ "
          "(Ctrl+C to stop)", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, server_header=False,
                limit_concurrency=MAX_CONNECTIONS)
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add this package's sub-commands to the ferlab parser."""
    s = sub.add_parser("serve", help="local web demo and JSON API: upload a photo or use the webcam",
                       description="Serve a web page (photo upload, webcam) and a JSON API (POST /predict) that "
                                   "detect faces and show their expression probabilities and Grad-CAM overlays.")
    s.add_argument("--model", default=None, metavar="SPEC",
                   help="shipped model name, run directory, .safetensors checkpoint or exported .onnx file "
                        "(default: the shipped default model)")
    s.add_argument("--host", default=DEFAULT_HOST,
                   help=f"interface to bind (default {DEFAULT_HOST}: this machine only; a warning is printed "
                        "for any other)")
    s.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    s.add_argument("--max-upload-mb", type=float, default=10.0, help="largest accepted upload in MiB (default 10)")
    s.add_argument("--max-pixels", type=int, default=40_000_000,
                   help="largest accepted image in pixels, checked before decoding (default 40,000,000)")
    s.add_argument("--backend", default=None, choices=("torch", "onnx"),
                   help="inference backend (default: onnx for an .onnx model, else torch); with onnx the overlays "
                        "still come from the PyTorch weights")
    s.add_argument("--explain", default="gradcam", metavar="METHOD",
                   help="attribution overlay per face: gradcam (default), saliency, ... or none")
    s.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    s.set_defaults(func=cmd_serve)
