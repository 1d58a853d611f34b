"""Sub-commands of ferlab.recognize (registered through ferlab.cli.COMMAND_MODULES): ``predict`` and ``export``.

Heavy libraries (torch, OpenCV, ONNX Runtime) are imported inside the command functions only.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path
from typing import IO, Any

from ferlab.images import DEFAULT_MAX_PIXELS, pixel_count
from ferlab.inference.options import PER_FILE_TTA, int_at_least, tta_argument
from ferlab.recognize.detect import DEFAULT_ALIGN, DEFAULT_DETECTOR, DETECTORS

PROG = "ferlab predict"


# --------------------------------------------------------------------------- output writers
class CsvWriter:
    """One row per face: file, frame, face, x, y, w, h, label, score, p_<class>...; with videos among the inputs
    also track, time (seconds) and s_<class> (the track's smoothed probabilities). Problems go to stderr only."""

    def __init__(self, f: IO[str], class_names: list[str], weights: str | None = None, videos: bool = False) -> None:
        self.w, self.videos, self.class_names = csv.writer(f), videos, list(class_names)
        self.w.writerow(["file", "frame", "face", "x", "y", "w", "h", "label", "score",
                         *(f"p_{c}" for c in class_names)]
                        + (["track", "time", *(f"s_{c}" for c in class_names)] if videos else []))

    def write(self, result: Any) -> None:
        for face in result.faces:
            x, y, w, h = face.box
            row = [face.file, "" if face.frame is None else face.frame, face.index, x, y, w, h, face.label,
                   f"{face.score:.6f}", *(f"{p:.6f}" for p in face.probabilities.values())]
            if self.videos:
                tracked = face.track is not None
                row += [face.track if tracked else "", "" if face.time is None else f"{face.time:.3f}",
                        *((f"{face.smoothed[c]:.6f}" for c in self.class_names) if tracked and face.smoothed
                          else [""] * len(self.class_names))]
            self.w.writerow(row)

    def close(self) -> None:
        pass


class JsonWriter:
    """A JSON list streamed entry by entry: one entry per face (status ``ok``) and one per image or frame
    without a face (``no_face``) or that could not be read (``error``, with the message in ``error``); each
    entry names the ``weights`` that answered."""

    def __init__(self, f: IO[str], class_names: list[str], weights: str | None = None, videos: bool = False) -> None:
        self.f, self.first, self.weights = f, True, weights
        f.write("[")

    def _entry(self, d: dict[str, Any]) -> None:
        d = d | ({"weights": self.weights} if self.weights else {})  # which model answered
        self.f.write(("\n  " if self.first else ",\n  ") + json.dumps(d))
        self.first = False

    def write(self, result: Any) -> None:
        if result.status != "ok":
            entry = {"file": result.file, "frame": result.frame, "status": result.status}
            self._entry(entry | ({"error": result.error} if result.error else {}))
        for face in result.faces:
            self._entry({**face.to_dict(), "status": "ok"})

    def close(self) -> None:
        self.f.write("\n]\n" if not self.first else "]\n")


WRITERS = {"csv": CsvWriter, "json": JsonWriter}


# --------------------------------------------------------------------------- annotation
class Annotator:
    """Writes each read image (or video frame) with its faces drawn, mirroring the inputs' folder structure."""

    def __init__(self, out_dir: Path, files: list[Path]) -> None:
        self.out_dir = out_dir
        parents = [str(f.resolve().parent) for f in files] or [str(Path.cwd())]
        self.root = Path(os.path.commonpath(parents))
        self.written: dict[str, tuple[str, int | None]] = {}  # target (case-folded) -> the input drawn there

    def target(self, file: str, frame: int | None) -> Path:
        """Where the annotated image of ``file`` (or of its video frame ``frame``) goes: its relative path
        (``clip.mp4`` frame 7 -> ``clip_mp4_f000007.jpg``, apart from ``clip.avi``'s); a name another input of this
        run already took (``a.jpg`` and ``a.JPG``, a photo named like a video frame) gets ``_2``, ``_3``, ..."""
        src = Path(file).resolve()
        rel = src.relative_to(self.root)
        if frame is not None:
            ext = rel.suffix.lstrip(".").lower()
            out = self.out_dir / rel.parent / f"{rel.stem}{'_' + ext if ext else ''}_f{frame:06d}.jpg"
        else:
            suffix = rel.suffix.lower() if rel.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp", ".bmp") else ".png"
            out = self.out_dir / rel.with_suffix(suffix)
        key, k = (str(src), frame), 1
        candidate = out
        while self.written.setdefault(str(candidate).casefold(), key) != key:
            k += 1
            candidate = out.with_name(f"{out.stem}_{k}{out.suffix}")
        return candidate

    def write(self, result: Any) -> None:
        import cv2

        from ferlab.recognize.annotate import draw_faces

        out = self.target(result.file, result.frame)
        if out.exists() and out.samefile(result.file):
            raise ValueError(f"--annotate would overwrite the input {result.file}; choose another directory")
        out.parent.mkdir(parents=True, exist_ok=True)
        if not cv2.imwrite(str(out), draw_faces(result.image, result.faces)):
            raise OSError(f"cannot write {out}")


# --------------------------------------------------------------------------- predict
def _camera_results(rec: Any, args: argparse.Namespace, note: Any) -> Any:
    """The camera's results until it stops, ``--max-frames`` or Ctrl-C (which ends the stream, not the command)."""
    from ferlab.images import ImageError

    try:
        yield from rec.camera(args.webcam, every=args.every, max_frames=args.max_frames)
    except KeyboardInterrupt:
        note(f"camera {args.webcam}: stopped (Ctrl-C)")
    except ImageError as e:
        note(str(e))


def _refuse_overwriting_inputs(args: argparse.Namespace, files: list[Path]) -> None:
    """ValueError if --out, --tracks or --timeline names one of the inputs (writing it would destroy it) or
    another of these outputs, or --annotate names a file."""
    seen: dict[Path, str] = {}
    for flag in ("out", "tracks", "timeline"):
        target = Path(getattr(args, flag)) if getattr(args, flag) else None
        if target is None:
            continue
        key = target.resolve()
        if key in seen:
            raise ValueError(f"--{seen[key]} and --{flag} both name {target}; one would overwrite the other")
        seen[key] = flag
        if target.is_file():
            hit = next((f for f in files if f.is_file() and target.samefile(f)), None)
            if hit is not None:
                raise ValueError(f"--{flag} {target} is one of the inputs ({hit}); writing it would destroy it: "
                                 "name another file")
    if args.annotate and Path(args.annotate).exists() and not Path(args.annotate).is_dir():
        raise ValueError(f"--annotate {args.annotate} is a file; name a folder for the annotated images")
    if args.timeline and Path(args.timeline).suffix.lower() not in ("", ".png", ".jpg", ".jpeg", ".pdf", ".svg"):
        raise ValueError(f"--timeline {args.timeline}: name a .png, .jpg, .pdf or .svg file")


def cmd_predict(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from ferlab.images import collect_inputs, is_video
    from ferlab.inference.backends import cost
    from ferlab.recognize.api import Recognizer
    from ferlab.recognize.track import TrackLog

    if args.every < 1:
        raise ValueError(f"--every must be >= 1, got {args.every}")
    if args.max_frames is not None and args.max_frames < 1:
        raise ValueError(f"--max-frames must be >= 1, got {args.max_frames}")
    if args.json and args.format not in (None, "json"):
        raise ValueError(f"--json and --format {args.format} contradict each other; give one")
    fmt = "json" if args.json else args.format or ("json" if args.out and args.out.lower().endswith(".json")
                                                   else "csv")
    rec = Recognizer(args.model, backend=args.backend, detector=args.detector, margin=args.margin, align=args.align,
                     tta=args.tta,
                     min_face=args.min_face, batch_size=args.batch_size, max_pixels=args.max_pixels,
                     precision=args.precision, threads=args.threads, smooth=args.smooth)
    if args.webcam is not None and args.paths:
        raise ValueError("give input PATHs or --webcam, not both")
    if args.webcam is None and not args.paths:
        raise ValueError("name the photos, folders or videos to read, or --webcam [INDEX] for a camera")
    files = collect_inputs(args.paths)
    if not files and args.webcam is None:
        raise FileNotFoundError(f"no images or videos found in {', '.join(args.paths)} "
                                f"(looked for .jpg .jpeg .png .webp .bmp .mp4 .avi .mov .mkv)")
    annotator = Annotator(Path(args.annotate), files) if args.annotate else None
    videos = args.webcam is not None or any(is_video(f) for f in files)
    for flag in ("timeline", "tracks"):
        if getattr(args, flag) and not videos:
            raise ValueError(f"--{flag} draws or sums up the faces of videos, and none is among the inputs")
    log = TrackLog(rec.class_names) if videos and (args.timeline or args.tracks) else None

    def note(msg: str) -> None:
        tqdm.write(f"{PROG}: {msg}", file=sys.stderr)

    if args.out and Path(args.out).is_dir():
        raise ValueError(f"--out {args.out} is a directory; name the file to write, "
                         f"e.g. {Path(args.out) / 'faces.csv'}")
    if args.timeline and not Path(args.timeline).suffix:
        args.timeline += ".png"  # what matplotlib writes, so the path printed is the file written
    _refuse_overwriting_inputs(args, files)
    counts = {"ok": 0, "no_face": 0, "error": 0, "faces": 0, "not_annotated": 0}
    video_no_face: dict[str, list[int]] = {}  # video -> [frames read, frames without a face]
    out_f = open(args.out, "w", newline="", encoding="utf-8") if args.out else sys.stdout  # noqa: SIM115
    writer = None
    try:
        writer = WRITERS[fmt](out_f, rec.class_names, weights=rec.weights, videos=videos)
        results = (rec.predict_many(files, crops=args.crops, every=args.every, progress=not args.no_progress,
                                    keep_images=annotator is not None, max_frames=args.max_frames)
                   if args.webcam is None
                   else _camera_results(rec, args, note))
        for r in results:
            counts[r.status] += 1
            counts["faces"] += len(r.faces)
            if r.frame is not None:
                v = video_no_face.setdefault(r.file, [0, 0])
                v[0] += 1
                v[1] += r.status == "no_face"
            elif r.status == "error":
                note(f"{r.file}: {r.error}")
            elif r.status == "no_face":
                note(f"{r.file}: no face found")
            writer.write(r)
            if log is not None:
                for face in r.faces:
                    log.add(face)
            if annotator is not None and r.image is not None:
                try:
                    annotator.write(r)
                except (OSError, ValueError) as e:  # this image's drawing is lost, not the run's results
                    counts["not_annotated"] += 1
                    note(f"{r.file}: not annotated: {e}")
    finally:
        if writer is not None:
            writer.close()  # a JSON list stays valid however the loop ended
        if args.out:
            out_f.close()
        else:
            out_f.flush()
    if log is not None:
        _write_tracks(log, args, note)
    for video, (n, empty) in video_no_face.items():
        if empty:
            note(f"{video}: no face in {empty} of {n} frames read")
    processed = counts["ok"] + counts["no_face"]
    source = f"camera {args.webcam}" if args.webcam is not None else f"{len(files)} file(s)"
    summary = (f"{source}: {processed} image(s)/frame(s) read, {counts['faces']} face(s), "
               f"{counts['no_face']} without a face, {counts['error']} unreadable"
               + (f"; wrote {args.out}" if args.out else "") + (f"; annotated images in {args.annotate}"
                                                                 if args.annotate else "")
               + (f" ({counts['not_annotated']} could not be written)" if counts["not_annotated"] else ""))
    passes = cost(rec.tta, getattr(rec.backend, "n_members", 1), tuple(rec.backend.input_size))
    print(f"{PROG}: {summary}; model {rec.model_name}, weights {rec.weights}, TTA {rec.tta} ({passes} forward "
          f"pass{'es' if passes > 1 else ''} a face)", file=sys.stderr)
    if processed == 0:
        raise ValueError(f"none of the {len(files)} input file(s) could be read (see the messages above)"
                         if args.webcam is None else f"camera {args.webcam} gave no frames (see the messages above)")
    return 0


def _write_tracks(log: Any, args: argparse.Namespace, note: Any) -> None:
    """--tracks: the per-track summary (JSON); --timeline: one strip per track (PNG). What was written before a
    failure here stays written."""
    summaries = log.summaries()
    if args.tracks:
        Path(args.tracks).parent.mkdir(parents=True, exist_ok=True)
        Path(args.tracks).write_text(json.dumps([s.to_dict() for s in summaries], indent=2))
    for s in summaries:
        note(f"{s.file}: track {s.track}: {s.first_s:.1f}-{s.last_s:.1f} s, {s.frames} frame(s), mostly "
             f"{s.dominant} ({s.share[s.dominant]:.0%})")
    if args.timeline:
        if not summaries:
            note("--timeline: no face was tracked, so no timeline was drawn")
            return
        Path(args.timeline).parent.mkdir(parents=True, exist_ok=True)
        drawn = log.plot(args.timeline)
        note(f"timeline of {len(summaries)} track(s) in {args.timeline}" if drawn == len(summaries) else
             f"timeline of the {drawn} longest of {len(summaries)} tracks in {args.timeline} (--tracks sums up "
             "every one)")


# --------------------------------------------------------------------------- export
def default_onnx_name(spec: str) -> Path:
    """runs/x -> x.onnx; runs/x/best.safetensors -> x.onnx; ckpt.safetensors -> ckpt.onnx; shipped -> name.onnx."""
    p = Path(spec)
    if p.is_dir():
        return Path(f"{p.resolve().name}.onnx")
    if p.is_file():
        return Path(f"{p.resolve().parent.name if p.stem == 'best' else p.stem}.onnx")
    return Path(f"{spec}.onnx")


def cmd_export(args: argparse.Namespace) -> int:
    import numpy as np

    from ferlab.inference.backends import OnnxBackend, TorchBackend
    from ferlab.inference.export import check_opset, export_onnx
    from ferlab.inference.loader import load_model
    from ferlab.transforms import tta_mode

    spec = args.onnx
    out = Path(args.out) if args.out else default_onnx_name(spec)
    if out.suffix.lower() != ".onnx":
        raise ValueError(f"--out {out}: use a .onnx file name")
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory; name the file to write, e.g. {out / default_onnx_name(spec)}")
    blocking = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise ValueError(f"--out {out}: {blocking} is a file, not a folder")
    check_opset(args.opset, tta_mode(args.tta))  # before the model is loaded and traced
    loaded = load_model(spec)
    data = export_onnx(loaded, out=out, opset=args.opset, tta=args.tta)
    # self-check: ONNX Runtime against PyTorch fp32 on random pixels
    h, w = loaded.input_size
    x = np.random.default_rng(0).integers(0, 256, (8, 1, h, w), dtype=np.uint8)  # (8, 1, H, W)
    diff = np.abs(OnnxBackend(out).probabilities(x) - TorchBackend(loaded, tta=args.tta).probabilities(x)).max()
    n = len(loaded.members)
    what = f"ensemble of {n} ({', '.join(m.source for m in loaded.members)})" if n > 1 else loaded.architecture
    print(f"wrote {out} ({len(data) / 2**20:.1f} MiB, opset {args.opset}, model {what}, TTA {args.tta}, "
          f"classes {', '.join(loaded.class_names)}); input 'pixels' uint8 (batch, 1, {h}, {w}), normalisation "
          f"included; outputs 'logits', 'probabilities'; max |probability difference| vs PyTorch on 8 random "
          f"faces: {diff:.1e}")
    print(f"next: ferlab predict PHOTO --model {out}")
    return 0


# --------------------------------------------------------------------------- parsers
def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add this package's sub-commands to the ferlab parser."""
    p = sub.add_parser("predict", help="detect faces in photos, folders and videos and classify their expressions",
                       description="Detect faces, crop them the way FER2013 frames faces, and classify them "
                       "in batches. Writes one CSV row / JSON entry per face. A file that cannot be read, or has "
                       "no face, gets a message on stderr and the rest go on.")
    p.add_argument("paths", nargs="*", metavar="PATH", help="images (jpg png webp bmp), videos (mp4 avi mov mkv) "
                   "or folders (searched recursively)")
    p.add_argument("--webcam", nargs="?", type=int_at_least(0), const=0, default=None, metavar="INDEX",
                   help="read a camera instead of files (INDEX: the camera's number, default 0): each frame is "
                        "answered as it is read, with tracks; Ctrl-C (or --max-frames) ends it and writes the outputs")
    p.add_argument("--max-frames", type=int, default=None, metavar="N",
                   help="videos and --webcam: read at most N frames of each (with --every K, every K-th of them is "
                        "classified)")
    p.add_argument("--model", default=None, help="run directory, .safetensors checkpoint, shipped model or ensemble "
                   "name (`ferlab models --pretrained`) or exported .onnx file (default: the shipped default model)")
    p.add_argument("--backend", choices=("torch", "onnx"), default=None,
                   help="inference backend (default: onnx for an .onnx model, else torch)")
    p.add_argument("--detector", default=DEFAULT_DETECTOR,
                   help=f"face detector: {', '.join(sorted(DETECTORS))} (default {DEFAULT_DETECTOR}; mtcnn also "
                        "gives five landmarks)")
    p.add_argument("--align", action=argparse.BooleanOptionalAction, default=DEFAULT_ALIGN,
                   help="rotate and scale each face so that its landmarks fall where FER2013's do (eyes level; "
                        "needs a detector with landmarks, mtcnn; default: on when the detector gives them and no "
                        "--margin is set)")
    p.add_argument("--crops", action="store_true", help="every image is already a face crop (no detection)")
    p.add_argument("--every", type=int, default=1, metavar="N", help="videos: classify every N-th frame (default 1)")
    p.add_argument("--format", choices=tuple(WRITERS), default=None,
                   help="output format (default: json for a .json --out, else csv)")
    p.add_argument("--json", action="store_true", help="JSON output (the same as --format json)")
    p.add_argument("--out", default=None, metavar="FILE", help="output file (default: standard output)")
    p.add_argument("--annotate", default=None, metavar="DIR", help="write the images with boxes and labels here")
    p.add_argument("--batch-size", type=int, default=128, help="faces per forward pass (default 128)")
    p.add_argument("--margin", type=float, default=None,
                   help="fraction of the face box added on each side (default: cut each box the way FER2013 frames "
                        "the boxes the detector finds in its faces, measured by bench/framing.py)")
    p.add_argument("--min-face", type=int, default=24, metavar="PIXELS",
                   help="smallest face side to detect, in pixels of the photo (default 24); photos are searched "
                        "at 1280 pixels on their longest side, so on larger ones the floor is 12 x side / 1280 "
                        "with MTCNN (38 at 4000) and 20 x side / 1280 with Haar (62)")
    p.add_argument("--max-pixels", type=pixel_count, default=DEFAULT_MAX_PIXELS,
                   help=f"refuse larger images, read from the header before decoding: a guard against decompression "
                        f"bombs (default {DEFAULT_MAX_PIXELS:,})")
    p.add_argument("--tta", **tta_argument(**PER_FILE_TTA))
    p.add_argument("--smooth", type=float, default=0.5, metavar="SECONDS",
                   help="videos: time constant of the per-track smoothing of the probabilities (default 0.5; 0: "
                        "off); the raw probabilities are kept beside the smoothed ones")
    p.add_argument("--timeline", default=None, metavar="PNG",
                   help="videos: draw each tracked face's smoothed probabilities over time, one strip per track")
    p.add_argument("--tracks", default=None, metavar="JSON",
                   help="videos: write a summary per track (time in view, frames, mean probabilities, dominant "
                        "expression, share of time in each)")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default=None,
                   help="torch backend precision: fp32 (default: exact, and fast on every CPU), bf16 (bfloat16 "
                        "autocast), auto (bf16 where this CPU has bf16 instructions, AVX512-BF16 or AMX, else fp32)")
    p.add_argument("--threads", type=int, default=None, help="inference threads (default: the library's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_predict)

    e = sub.add_parser("export", help="export a model to ONNX (normalisation and class names included)")
    fmt = e.add_mutually_exclusive_group(required=True)
    fmt.add_argument("--onnx", metavar="MODEL", help="run directory, .safetensors checkpoint, shipped model name, or a "
                     "shipped ensemble's name (one graph averaging its members' probabilities)")
    e.add_argument("--tta", **tta_argument(more_help="; the views become part of the graph (default: none)"))
    e.add_argument("--out", default=None, metavar="FILE", help="output .onnx file (default: NAME.onnx here)")
    e.add_argument("--opset", type=int, default=17, help="ONNX opset version, 13 to 20 (16 or more with --tta affine; "
                   "default 17)")
    e.set_defaults(func=cmd_export)
