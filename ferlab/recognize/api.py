"""The Python API: ``Recognizer`` finds faces in photos, folders and videos and classifies their expressions.

Example::

    from ferlab import Recognizer

    rec = Recognizer("runs/fer-resnet-s")   # a run directory, checkpoint, shipped name or exported .onnx file
    for face in rec.predict("group.jpg"):
        print(face.box, face.label, round(face.score, 2))   # (412, 188, 96, 96) Happy 0.91
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ferlab.hardware import MAX_THREADS
from ferlab.images import (
    DEFAULT_MAX_PIXELS,
    ImageError,
    check_pixels,
    collect_inputs,
    decode_image,
    is_video,
    one_line,
    read_camera,
    read_image,
    read_video_frames,
    to_bgr8,
)
from ferlab.inference.backends import Backend, ModelSpec, default_model, open_backend
from ferlab.recognize.detect import (
    DEFAULT_ALIGN,
    DEFAULT_DETECTOR,
    FALLBACK_MARGIN,
    WholeImage,
    aligned_crops,
    create_detector,
    crop_faces,
    fer2013_framing,
    framed_boxes,
)
from ferlab.recognize.track import FaceTracker, frame_seconds
from ferlab.transforms import tta_mode

ImageInput = str | Path | bytes | np.ndarray
KEEP_BYTES = 256 * 2**20  # with keep_images, classify early rather than hold more decoded images than this


@dataclass
class Face:
    """One classified face. box: (x, y, w, h) in pixels of the original image (as detected, before the margin; cut
    to the image where the face reaches past its edge)."""

    box: tuple[int, int, int, int]
    label: str
    score: float  # probability of ``label``
    probabilities: dict[str, float]
    file: str | None = None
    frame: int | None = None  # video frame index; None for images
    index: int = 0  # face number within its image, largest first
    track: int | None = None  # videos: the same number while the same person stays in view
    time: float | None = None  # videos: seconds from the start (the frame's timestamp)
    smoothed: dict[str, float] | None = None  # videos: the track's probabilities smoothed over time
    # detectors with landmarks (mtcnn): left eye, right eye, nose, left and right mouth corner (x, y), as seen
    landmarks: list[tuple[float, float]] | None = None

    def to_dict(self) -> dict[str, Any]:
        x, y, w, h = self.box
        d = {"file": self.file, "frame": self.frame, "face": self.index, "x": x, "y": y, "w": w, "h": h,
             "label": self.label, "score": self.score, "probabilities": dict(self.probabilities)}
        if self.landmarks is not None:
            d["landmarks"] = [list(p) for p in self.landmarks]
        if self.track is not None:
            d |= {"track": self.track, "time": self.time, "smoothed": self.smoothed}
        return d


@dataclass
class Result:
    """What one image or video frame gave: its faces, or the error that stopped it."""

    file: str | None
    frame: int | None = None
    faces: list[Face] = field(default_factory=list)
    time: float | None = None  # video frames: seconds from the start
    video_pass: int | None = field(default=None, repr=False)  # which reading of the video (one tracker each)
    error: str | None = None
    image: np.ndarray | None = None  # (H, W, 3) uint8 BGR, kept only with keep_images=True

    @property
    def status(self) -> str:
        """``ok`` (faces found), ``no_face`` or ``error``."""
        return "error" if self.error else "ok" if self.faces else "no_face"


def to_dataframe(items: Iterable[Result | Face]) -> Any:
    """A pandas DataFrame with one row per face of ``items`` (Results, as ``predict_many``, ``track`` and ``camera``
    yield, or Faces, as ``predict`` returns): file, frame, time, track, face, x, y, w, h, label, score, the
    probabilities ``p_<class>`` and, for tracked faces, the smoothed ``s_<class>``."""
    import pandas as pd

    rows = []
    for item in items:
        for f in item.faces if isinstance(item, Result) else [item]:
            x, y, w, h = f.box
            row = {"file": f.file, "frame": f.frame, "time": f.time, "track": f.track, "face": f.index, "x": x,
                   "y": y, "w": w, "h": h, "label": f.label, "score": f.score}
            row |= {f"p_{c}": v for c, v in f.probabilities.items()}
            row |= {f"s_{c}": v for c, v in (f.smoothed or {}).items()}
            rows.append(row)
    return pd.DataFrame(rows)


def load_image(image: ImageInput, color: str = "rgb", max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A path, encoded bytes or array -> (H, W, 3) uint8 BGR. Arrays are RGB unless ``color='bgr'`` (OpenCV)."""
    if isinstance(image, str | Path):
        return read_image(image, max_pixels)
    if isinstance(image, bytes | bytearray | memoryview):
        return decode_image(bytes(image), max_pixels)
    arr = np.asarray(image)
    if arr.ndim >= 2:
        check_pixels(arr.shape[1], arr.shape[0], max_pixels)
    return to_bgr8(arr, color)


def inside(boxes: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Boxes (F, 4) x, y, w, h cut to the part inside an image of ``shape`` (H, W, ...): a face the photo's edge
    cuts is reported by its visible part, so that ``image[y:y + h, x:x + w]`` is that part."""
    h, w = shape[:2]
    b = np.asarray(boxes, np.int64).reshape(-1, 4)
    x0, y0 = np.clip(b[:, 0], 0, w - 1), np.clip(b[:, 1], 0, h - 1)
    x1, y1 = np.clip(b[:, 0] + b[:, 2], x0 + 1, w), np.clip(b[:, 1] + b[:, 3], y0 + 1, h)
    return np.stack([x0, y0, x1 - x0, y1 - y0], 1)


def _check_frames(every: int, max_frames: int | None) -> None:
    """ValueError unless ``every`` >= 1 and ``max_frames`` is None or >= 1 (checked before any input is read)."""
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")


def _thread_governor():  # -> hardware.ThreadGovernor
    """A thread governor setting both torch's and OpenCV's thread counts (see :class:`ThreadGovernor`)."""
    import cv2
    import torch

    from ferlab.hardware import ThreadGovernor

    def apply(n: int) -> None:
        torch.set_num_threads(n)
        cv2.setNumThreads(n)

    return ThreadGovernor(max_threads=torch.get_num_threads(), apply=apply)  # never above torch's own default


class Recognizer:
    """Face detection + expression classification, batched.

    model: run directory, .safetensors checkpoint, shipped model or ensemble name (``ferlab models --pretrained``)
    or exported .onnx file (default: the shipped default model). backend: ``torch`` or ``onnx`` (default: onnx for
    an .onnx file, else torch), or a ready :class:`~ferlab.inference.backends.Backend`. detector: a name in
    ``detect.DETECTORS`` (``haar``, ``mtcnn``). margin: fraction of the face box added on each side before
    cropping; None (default): cut each box the way FER2013 frames the boxes this detector finds in FER2013's own
    faces (``bench/framing.py``; 0.1 for a detector not measured). align: rotate and scale each face so that its
    five landmarks fall where FER2013's do on average (eyes level; needs a detector with landmarks, ``mtcnn``);
    None (default): align when the detector gives landmarks and no margin is given.
    tta: test-time augmentation, ``none``, ``flip`` (or True), ``shift`` or ``affine``
    (1, 2, 10 or 18 views per face, each a forward pass of every member; None: an .onnx file's own mode, else
    none). min_face: smallest face side in pixels.
    batch_size: faces per forward pass. max_pixels: larger images are refused (decompression bombs).
    smooth: videos: time constant in seconds of the per-track smoothing of the probabilities (0: off; the raw
    probabilities are kept). track_iou: the box overlap that continues a track from one processed frame to the next.
    precision: torch backend only, ``fp32`` (default), ``bf16`` or ``auto`` (bf16 where the CPU computes it
    natively). threads: inference threads (None: torch's default, lowered to the cores other processes leave free
    while a long prediction runs, re-checked every 10 s; this sets torch's and OpenCV's process-wide counts).

    Example::

        rec = Recognizer("runs/fer-resnet-s")
        faces = rec.predict("photo.jpg")                  # list[Face], largest first
        faces = rec.predict(rgb_array)                    # numpy (H, W, 3) RGB, e.g. np.asarray(PIL image)
        faces = rec.predict("crop48.png", crops=True)     # the image is already a face
        for r in rec.predict_many(["photos/", "clip.mp4"], every=10):   # folders, videos; errors per file
            print(r.file, r.frame, r.status, [f.label for f in r.faces])
    """

    def __init__(self, model: ModelSpec | None = None, backend: str | Backend | None = None,
                 detector: str = DEFAULT_DETECTOR, margin: float | None = None, align: bool | None = DEFAULT_ALIGN,
                 tta: bool | str | None = None, min_face: int = 24, batch_size: int = 128,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS, precision: str | None = None,
                 threads: int | None = None, smooth: float = 0.5, track_iou: float = 0.3) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if margin is not None and not (math.isfinite(margin) and margin >= 0):
            raise ValueError(f"margin must be a finite number >= 0, got {margin}")
        if min_face < 1:
            raise ValueError(f"min_face must be >= 1 pixel, got {min_face}")
        if threads is not None and not 0 <= threads <= MAX_THREADS:
            raise ValueError(f"threads must be in [0, {MAX_THREADS}] (0 or None: the library's default), got {threads}")
        if backend is not None and not isinstance(backend, str):
            if model is not None:
                raise ValueError("pass either a model spec or a ready backend, not both")
            self.backend: Backend = backend
            if tta is not None and tta_mode(tta) != getattr(backend, "tta", "none"):
                loaded = getattr(backend, "loaded", None)  # a torch backend: the same model with another TTA mode
                if loaded is None:
                    raise ValueError(f"this {backend.name} backend applies test-time augmentation "
                                     f"{getattr(backend, 'tta', 'none')!r}; open one with tta={tta_mode(tta)!r}")
                self.backend = open_backend(loaded, "torch", tta=tta, precision=getattr(backend, "precision", None))
        else:
            self.backend = open_backend(model if model is not None else default_model(), backend, tta=tta,
                                        precision=precision, threads=threads or None)
        self.detector = create_detector(detector, min_face=min_face)
        self.detector_name = detector
        framing = fer2013_framing(detector)
        # margin None: cut each box the way FER2013 frames the boxes this detector finds in its faces, when measured
        self._box48 = framing["box"] if margin is None and framing else None
        can_align = bool(hasattr(self.detector, "detect") and framing and "landmarks" in framing)
        if align and not can_align:
            raise ValueError(f"align=True needs a detector with landmarks and a measured FER2013 framing "
                             f"(mtcnn); {detector!r} has none")
        self.align = bool(align) if align is not None else (can_align and margin is None)
        self._template = np.asarray(framing["landmarks"]) if self.align else None
        self._whole = WholeImage()
        # threads not set: follow the cores other processes leave free during long predictions (torch and OpenCV)
        self._governor = _thread_governor() if not threads else None
        self.margin = margin if margin is not None else (None if self._box48 else FALLBACK_MARGIN)
        self.batch_size, self.max_pixels = batch_size, max_pixels
        FaceTracker(track_iou, smooth_s=smooth)  # checks the settings now
        self.smooth, self.track_iou = smooth, track_iou
        self._tracker: tuple[int, FaceTracker] | None = None  # (video pass, its tracker): one video at a time
        self._video_passes = 0

    @property
    def class_names(self) -> list[str]:
        return self.backend.class_names

    @property
    def meta(self) -> dict[str, Any]:
        """The model's ferlab metadata (model name, preprocessing, training config, ...)."""
        return self.backend.meta

    @property
    def model_name(self) -> str:
        """The architecture (e.g. ``fer-resnet-s``), or ``ensemble of N`` for an ensemble."""
        n = getattr(self.backend, "n_members", 1)
        return f"ensemble of {n}" if n > 1 else str(self.meta["model"]["name"])

    @property
    def tta(self) -> str:
        """The test-time augmentation mode the backend applies."""
        return getattr(self.backend, "tta", "none")

    @property
    def weights(self) -> str:
        """Which weights were loaded: the shipped model's name, or the run directory or file given."""
        return str(getattr(self.backend, "weights", None) or f"{self.meta['model']['name']} (in memory)")

    def __repr__(self) -> str:
        framing = "fer2013" if self.margin is None else self.margin
        return (f"Recognizer(model={self.model_name!r}, weights={self.weights!r}, backend={self.backend.name!r}, "
                f"detector={self.detector_name!r}, framing={framing!r}, align={self.align}, tta={self.tta})")

    # ------------------------------------------------------------------ classification of ready crops
    def classify(self, pixels: np.ndarray) -> np.ndarray:
        """Probabilities (N, K) for face crops (N, H, W) or (N, 1, H, W) uint8 of the model's input size."""
        x = np.asarray(pixels)
        x = x[:, None] if x.ndim == 3 else x  # (N, 1, H, W)
        if x.ndim != 4 or x.shape[1] != 1 or tuple(x.shape[2:]) != tuple(self.backend.input_size):
            raise ValueError(f"expected crops of shape (N, 1, {self.backend.input_size[0]}, "
                             f"{self.backend.input_size[1]}), got {np.shape(pixels)}")
        out = np.empty((len(x), len(self.class_names)), np.float32)
        for i in range(0, len(x), self.batch_size):
            xb = np.ascontiguousarray(x[i : i + self.batch_size], np.uint8)  # (B, 1, H, W)
            out[i : i + len(xb)] = self.backend.probabilities(xb)  # (B, K): TTA views and members included
        return out

    # ------------------------------------------------------------------ images
    def predict(self, image: ImageInput, crops: bool = False, color: str = "rgb", every: int = 1) -> list[Face]:
        """Faces in one image (path, encoded bytes, or array: RGB unless color='bgr'), largest first.

        A video path gives the faces of every ``every``-th frame (Face.frame says which). ``crops=True``
        takes the whole image as one face. Bad input raises ImageError / FileNotFoundError; a video that stops
        decoding part-way raises ImageError with the faces of the frames read before it in its ``faces``.
        """
        if isinstance(image, str | Path) and is_video(image):
            faces: list[Face] = []
            try:
                for r in self._run(self._video_frames(Path(image), every), crops, keep_images=False):
                    faces.extend(r.faces)
            except ImageError as e:
                e.faces = faces  # what was computed is the caller's to keep
                raise
            return faces
        return self.predict_batch([image], crops=crops, color=color)[0]

    def predict_batch(self, images: Sequence[ImageInput], crops: bool = False, color: str = "rgb") -> list[list[Face]]:
        """The faces of each image (as :meth:`predict`), classified in shared batches. Raises on bad input."""
        if isinstance(images, str | Path | bytes | bytearray | memoryview):
            raise TypeError(f"predict_batch takes a list of images, got one {type(images).__name__}: use "
                            "predict() for one image, or predict_batch([image])")

        def frames() -> Iterator[tuple[Result, np.ndarray | None]]:
            for img in images:
                name = str(img) if isinstance(img, str | Path) else None
                yield Result(name), load_image(img, color, self.max_pixels)

        return [r.faces for r in self._run(frames(), crops, keep_images=False)]

    def predict_many(self, inputs: Iterable[str | Path] | str | Path, crops: bool = False, every: int = 1,
                     progress: bool = False, keep_images: bool = False,
                     max_frames: int | None = None) -> Iterator[Result]:
        """Stream one :class:`Result` per image or kept video frame, for files and folders (recursive); one path
        alone is a list of one. Videos: every ``every``-th frame of the first ``max_frames`` (None: all).

        A file that cannot be read (missing, corrupt, not an image, too large) gives a Result whose ``error``
        says why, and the rest go on. Faces are classified in batches of ``batch_size``; ``progress`` shows a
        bar over the files; ``keep_images`` keeps each decoded image in ``Result.image`` (for annotation).
        """
        _check_frames(every, max_frames)
        files = collect_inputs(inputs)
        yield from self._run(self._file_frames(files, every, progress, max_frames), crops, keep_images)

    # ------------------------------------------------------------------ pipeline
    def _file_frames(self, files: list[Path], every: int, progress: bool,
                     max_frames: int | None = None) -> Iterator[tuple[Result, np.ndarray | None]]:
        from tqdm.auto import tqdm

        with tqdm(total=len(files), unit="file", disable=not progress, dynamic_ncols=True) as bar:
            for f in files:
                try:
                    if is_video(f):
                        yield from self._video_frames(f, every, max_frames)
                    else:
                        yield Result(str(f)), read_image(f, self.max_pixels)
                except (ImageError, OSError) as e:
                    msg = str(e)
                    yield Result(str(f), error=msg[len(f"{f}: "):] if msg.startswith(f"{f}: ") else msg), None
                bar.update(1)

    def _video_frames(self, path: Path, every: int,
                      max_frames: int | None = None) -> Iterator[tuple[Result, np.ndarray]]:
        self._video_passes += 1
        run = self._video_passes  # reading the same video again starts new tracks
        for f in read_video_frames(path, every, self.max_pixels, max_frames):
            yield Result(str(path), frame=f.index, time=f.time, video_pass=run), f.image

    def track(self, video: str | Path, every: int = 1, crops: bool = False,
              max_frames: int | None = None) -> Iterator[Result]:
        """Stream the frames of ``video`` (every ``every``-th of the first ``max_frames``), each with its faces; a
        face keeps its ``track`` number while the person stays in view, with ``time`` in seconds and ``smoothed``
        probabilities."""
        _check_frames(every, max_frames)
        yield from self._run(self._video_frames(Path(video), every, max_frames), crops, keep_images=False)

    def camera(self, index: int = 0, every: int = 1, max_frames: int | None = None) -> Iterator[Result]:
        """Stream tracked faces from camera ``index`` (every ``every``-th frame, ``max_frames`` read at most), each
        frame answered as soon as it is read; ``time`` is seconds since the first frame."""
        _check_frames(every, max_frames)
        self._video_passes += 1
        run = self._video_passes

        def frames() -> Iterator[tuple[Result, np.ndarray]]:
            for i, t, bgr in read_camera(index, max_frames, self.max_pixels):
                if i % every == 0:
                    yield Result(f"camera:{index}", frame=i, time=t, video_pass=run), bgr

        yield from self._run(frames(), crops=False, keep_images=False, live=True)

    def _track(self, res: Result, boxes: np.ndarray, probs: np.ndarray) -> tuple[list[int], np.ndarray]:
        """Track ids and smoothed probabilities of a video frame's faces (a new tracker for each video)."""
        if self._tracker is None or self._tracker[0] != res.video_pass:
            self._tracker = (res.video_pass, FaceTracker(self.track_iou, smooth_s=self.smooth))
        return self._tracker[1].update(boxes, probs, frame_seconds(res.time, res.frame))

    def _run(self, frames: Iterator[tuple[Result, np.ndarray | None]], crops: bool,
             keep_images: bool, live: bool = False) -> Iterator[Result]:
        """Detect, batch and classify; ``live``: answer every frame as soon as it is read (a camera)."""
        pending: list[tuple[Result, np.ndarray, np.ndarray, np.ndarray | None]] = []
        n_faces, kept_bytes = 0, 0
        try:
            for res, bgr in frames:
                if self._governor is not None:
                    self._governor.step()
                boxes, marks, pix = self._detect(res, bgr, crops)
                if keep_images and res.error is None and bgr is not None:
                    res.image = bgr
                    kept_bytes += bgr.nbytes
                pending.append((res, boxes, pix, marks))
                n_faces += len(pix)
                # flush on a full batch, or before many faceless images / kept images pile up
                if (live or n_faces >= self.batch_size or len(pending) >= 4 * self.batch_size
                        or kept_bytes > KEEP_BYTES):
                    yield from self._classify_pending(pending)
                    pending, n_faces, kept_bytes = [], 0, 0
        except Exception:  # e.g. a video that stops decoding mid-file: the frames read before it are still answered
            yield from self._classify_pending(pending)
            raise
        yield from self._classify_pending(pending)

    def _detect(self, res: Result, bgr: np.ndarray | None, crops: bool
                ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """The face boxes (F, 4) of one image, their landmarks (F, 5, 2) or None, and the model inputs
        (F, 1, H, W) uint8; no faces (and ``res.error`` set) where detection fails on it."""
        import cv2

        none = np.empty((0, 4), np.int64), None, np.empty((0, 1, *self.backend.input_size), np.uint8)
        if bgr is None:
            return none
        try:
            gray = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
            if crops:
                boxes = self._whole(gray)
                return boxes, None, crop_faces(gray, boxes, 0.0, self.backend.input_size)
            image = bgr if getattr(self.detector, "wants_color", False) else gray
            if hasattr(self.detector, "detect"):
                boxes, marks, _ = self.detector.detect(image)  # (F, 4), (F, 5, 2)
            else:
                boxes, marks = self.detector(image), None
            pix = self.crops(gray, boxes, marks)  # from the detector's boxes, which may reach past the edge
            return inside(boxes, gray.shape), marks, pix
        except (cv2.error, ValueError) as e:  # one odd image fails alone; the batch's other results stay
            res.error = f"face detection failed on this {bgr.shape[1]}x{bgr.shape[0]} image: {one_line(e)}"
            return none

    def crops(self, gray: np.ndarray, boxes: np.ndarray, landmarks: np.ndarray | None = None) -> np.ndarray:
        """The model inputs (F, 1, H, W) uint8 of detected faces in gray (H, W) uint8: aligned on their landmarks
        (``align``), or each box cut with the detector's FER2013 framing or with ``margin``."""
        size = self.backend.input_size
        if self.align and landmarks is not None:
            return aligned_crops(gray, landmarks, self._template, size)
        if self._box48 is not None:
            return crop_faces(gray, framed_boxes(boxes, self._box48, size[1]), 0.0, size)
        return crop_faces(gray, boxes, self.margin, size)

    def _classify_pending(self, pending: list[tuple[Result, np.ndarray, np.ndarray, np.ndarray | None]]
                          ) -> Iterator[Result]:
        if not pending:
            return
        pix = np.concatenate([p for _, _, p, _ in pending])  # (F, 1, H, W)
        probs = self.classify(pix) if len(pix) else np.empty((0, len(self.class_names)), np.float32)
        names, j = self.class_names, 0
        for res, boxes, _, marks in pending:
            mine = probs[j : j + len(boxes)]  # (F, K)
            ids, smooth = self._track(res, boxes, mine) if res.frame is not None else (None, None)
            for k, box in enumerate(boxes.tolist()):
                pr = mine[k]
                top = int(pr.argmax())
                res.faces.append(Face(box=tuple(int(v) for v in box), label=names[top], score=float(pr[top]),
                                      probabilities={c: float(v) for c, v in zip(names, pr, strict=True)},
                                      file=res.file, frame=res.frame, index=k,
                                      track=None if ids is None else ids[k], time=res.time,
                                      smoothed=None if smooth is None else
                                      {c: float(v) for c, v in zip(names, smooth[k], strict=True)},
                                      landmarks=None if marks is None else
                                      [(round(float(px), 1), round(float(py), 1)) for px, py in marks[k]]))
            j += len(boxes)
            yield res
