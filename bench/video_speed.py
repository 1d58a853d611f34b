"""Frames per second of ``ferlab predict`` on a video, and where the time goes.

    python bench/video_speed.py [--model fer2013-fast] [--backend torch|onnx] [--video clip.mp4] [--frames 300]

Without ``--video`` it writes a 640x480 test clip: one real face (scikit-image's astronaut, a NASA photo in the
public domain) drifting over a textured background, ``--frames`` frames at 25 frames/s (MJPG). It then runs
``Recognizer(...).track(video)`` (detection, crop, classification, tracking and smoothing, as ``ferlab predict``
does on a video), once to warm up and ``--repeat`` times timed, and prints frames per second and the share of the
time spent decoding frames, detecting faces, cropping them, classifying them and tracking them (the rest: colour
conversion and bookkeeping). ``--batch-size 1`` classifies each frame as it arrives (what a live camera needs);
the default batches faces across frames. The CPU and thread count are printed with the figures.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

FPS = 25


def make_clip(path: Path, frames: int, size: tuple[int, int] = (640, 480)) -> Path:
    """A ``size`` clip of one real face (about 150 pixels) drifting over a textured background."""
    import cv2
    from skimage import data as skdata

    w, h = size
    face = cv2.resize(np.ascontiguousarray(skdata.astronaut()[10:230, 100:320, ::-1]), (150, 150),
                      interpolation=cv2.INTER_AREA)
    rng = np.random.default_rng(0)
    background = cv2.GaussianBlur(rng.integers(60, 200, (h, w, 3), dtype=np.uint8), (0, 0), 3)
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), FPS, (w, h))
    for f in range(frames):
        frame = background.copy()
        x = int((w - 150) / 2 + (w - 200) / 2 * np.sin(2 * np.pi * f / 150))
        y = int((h - 150) / 2 + 40 * np.cos(2 * np.pi * f / 100))
        frame[y : y + 150, x : x + 150] = face
        vw.write(frame)
    vw.release()
    return path


class Timers:
    """Seconds spent in named stages, summed over calls."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                self.seconds[name] += time.perf_counter() - t0
        return timed

    def wrap_iter(self, name: str, fn: Callable[..., Iterator[Any]]) -> Callable[..., Iterator[Any]]:
        def timed(*args: Any, **kw: Any) -> Iterator[Any]:
            it = fn(*args, **kw)
            while True:
                t0 = time.perf_counter()
                try:
                    item = next(it)
                except StopIteration:
                    self.seconds[name] += time.perf_counter() - t0
                    return
                self.seconds[name] += time.perf_counter() - t0
                yield item
        return timed


def measure(rec: Any, video: Path) -> tuple[int, int, float, dict[str, float]]:
    """(frames, faces, seconds, seconds per stage) of one pass of ``rec.track(video)`` with stage timers."""
    from ferlab.recognize import api

    timers = Timers()
    saved = api.read_video_frames, api.crop_faces, rec.detector, rec.classify, rec._track
    api.read_video_frames = timers.wrap_iter("decode", saved[0])
    api.crop_faces = timers.wrap("crop", saved[1])
    rec.detector = timers.wrap("detect", saved[2])
    rec.classify = timers.wrap("classify", saved[3])
    rec._track = timers.wrap("track", saved[4])
    try:
        t0 = time.perf_counter()
        frames = faces = 0
        for r in rec.track(video):
            frames += 1
            faces += len(r.faces)
        seconds = time.perf_counter() - t0
    finally:
        api.read_video_frames, api.crop_faces = saved[0], saved[1]
        del rec.detector, rec.classify, rec._track  # the instance attributes; the class's methods show again
        rec.detector = saved[2]
    return frames, faces, seconds, dict(timers.seconds)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="fer2013-fast", help="model (default fer2013-fast, the shipped fast model)")
    ap.add_argument("--detector", default="haar", help="face detector (default haar)")
    ap.add_argument("--backend", default="torch", choices=("torch", "onnx"), help="inference backend")
    ap.add_argument("--video", help="a video to measure on (default: a generated 640x480 clip with one face)")
    ap.add_argument("--frames", type=int, default=300, help="frames of the generated clip (default 300)")
    ap.add_argument("--batch-size", type=int, default=128, help="faces per forward pass (1: classify each frame "
                                                                "as it arrives, as a live camera needs)")
    ap.add_argument("--threads", type=int, default=2, help="threads for torch and OpenCV (default 2)")
    ap.add_argument("--repeat", type=int, default=3, help="timed passes (default 3; the fastest is reported)")
    args = ap.parse_args(argv)

    from ferlab import Recognizer
    from ferlab.hardware import describe

    with tempfile.TemporaryDirectory() as tmp:
        video = Path(args.video) if args.video else make_clip(Path(tmp) / "clip.avi", args.frames)
        rec = Recognizer(args.model, backend=args.backend, detector=args.detector, batch_size=args.batch_size,
                         threads=args.threads)
        measure(rec, video)  # warm-up: model, detector and codec caches
        runs = [measure(rec, video) for _ in range(args.repeat)]
    frames, faces, seconds, stages = min(runs, key=lambda r: r[2])
    print(f"{describe()}; {args.threads} threads; detector {args.detector}; model {rec.model_name} ({args.backend}, "
          f"TTA {rec.tta}), batch size {args.batch_size}")
    print(f"video {video.name if args.video else f'generated 640x480, {args.frames} frames'}: {frames} frames, "
          f"{faces} faces in {seconds:.2f} s (fastest of {args.repeat})")
    print(f"frames/s: {frames / seconds:.1f}   ms a frame: {1000 * seconds / frames:.2f}")
    other = seconds - sum(stages.values())
    for name in ("decode", "detect", "crop", "classify", "track"):
        s = stages.get(name, 0.0)
        print(f"  {name:<9} {1000 * s / frames:7.2f} ms a frame  {s / seconds:6.1%}")
    print(f"  {'other':<9} {1000 * other / frames:7.2f} ms a frame  {other / seconds:6.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
