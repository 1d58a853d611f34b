"""Face detection and cropping: a registry of detectors (name -> factory), boxes (x, y, w, h), and the crop that
turns a box into a model input (gray, margin, resized to 48 x 48 with INTER_AREA).

Detectors: OpenCV's Haar cascade (``haar``: ``haarcascade_frontalface_default.xml``, shipped in the opencv-python
wheels up to 4.x; OpenCV 5 moved the cascades out of the main package) and MTCNN (``mtcnn``, with five landmarks;
its weights ship with ferlab, see :mod:`ferlab.recognize.mtcnn`). Add another with :func:`register_detector`: any
callable mapping a gray (H, W) uint8 image to an (N, 4) int array of boxes.
"""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np

Box = tuple[int, int, int, int]  # x, y, w, h in pixels of the original image
# How FER2013 frames a face as each detector sees it (bench/framing.py --write): the median detected box and the mean
# landmarks, in pixels of the 48x48 face
FRAMING_FILE = Path(__file__).with_name("framing.json")
# Chosen by the rules in docs/results/detectors.md: the detector with the best recall on labelled photos that keeps
# 25 frames/s on 640x480 video with the fast model; alignment on landmarks, best on PublicTest's upright and turned
# faces
DEFAULT_DETECTOR = "mtcnn"
DEFAULT_ALIGN: bool | None = None  # None: align when the detector gives landmarks and no margin is set
FALLBACK_MARGIN = 0.1  # the margin of a detector whose FER2013 framing was not measured


class Detector(Protocol):
    """gray (H, W) uint8 -> boxes (N, 4) int (x, y, w, h), largest first. A detector with a true ``wants_color``
    attribute is given the (H, W, 3) BGR image instead."""

    def __call__(self, gray: np.ndarray) -> np.ndarray: ...


class HaarDetector:
    """OpenCV's Viola-Jones cascade on a gray image, downscaled first so that its longest side is <= max_side.

    min_face: smallest face side in original pixels; scale_factor / min_neighbors: as in detectMultiScale.
    The cascade finds nothing under 20 pixels of the downscaled image, so on a photo whose longest side L is over
    max_side the smallest face found is max(min_face, 20 * L / max_side) pixels (62 for a 4000-pixel photo);
    raise max_side to find smaller faces there, at a cost that grows with the pixels searched.

    OpenCV's cascade keeps the integral images of the largest image it has searched (about 50 MB at 1280 x 854)
    for as long as it lives; after an image over :data:`RELEASE_PIXELS` it is reloaded (about 10 ms, 2% of such
    a search) so that a long-lived process, ``ferlab serve``, gives that memory back.
    """

    RELEASE_PIXELS = 640 * 480

    def __init__(self, cascade: str = "haarcascade_frontalface_default.xml", min_face: int = 24,
                 scale_factor: float = 1.1, min_neighbors: int = 5, max_side: int = 1280) -> None:
        import cv2

        if not hasattr(cv2, "CascadeClassifier"):
            raise RuntimeError(f"OpenCV {cv2.__version__} has no Haar cascades (OpenCV 5 moved them out of the "
                               "main package); install opencv-python-headless<5")
        self._path = Path(cascade) if Path(cascade).is_file() else Path(cv2.data.haarcascades) / cascade
        self._clf: cv2.CascadeClassifier | None = self._load()
        self.min_face, self.scale_factor, self.min_neighbors, self.max_side = (
            int(min_face), float(scale_factor), int(min_neighbors), int(max_side))
        self._lock = threading.Lock()  # CascadeClassifier is not documented as safe for concurrent calls

    def _load(self):  # -> cv2.CascadeClassifier
        import cv2

        clf = cv2.CascadeClassifier(str(self._path))
        if clf.empty():
            raise FileNotFoundError(f"cannot load the Haar cascade {self._path}")
        return clf

    def __call__(self, gray: np.ndarray) -> np.ndarray:
        import cv2

        h, w = gray.shape
        scale = min(1.0, self.max_side / max(h, w))
        small = gray if scale == 1.0 else cv2.resize(gray, (max(1, round(w * scale)), max(1, round(h * scale))),
                                                     interpolation=cv2.INTER_AREA)
        min_side = max(20, round(self.min_face * scale))
        with self._lock:
            clf = self._clf if self._clf is not None else self._load()
            found = clf.detectMultiScale(small, scaleFactor=self.scale_factor, minNeighbors=self.min_neighbors,
                                         minSize=(min_side, min_side))
            self._clf = None if small.size > self.RELEASE_PIXELS else clf  # drop its buffers for a large image
        boxes = np.round(np.asarray(found, np.float64).reshape(-1, 4) / scale).astype(np.int64)  # (N, 4)
        return boxes[np.argsort(-(boxes[:, 2] * boxes[:, 3]), kind="stable")]


class WholeImage:
    """The 'detector' of ``crops`` mode: the whole image is one face."""

    def __call__(self, gray: np.ndarray) -> np.ndarray:
        h, w = gray.shape
        return np.array([[0, 0, w, h]], np.int64)


def _mtcnn(**kw) -> Detector:
    from ferlab.recognize.mtcnn import MTCNN

    return MTCNN(**kw)


DETECTORS: dict[str, Callable[..., Detector]] = {
    "haar": HaarDetector,
    "mtcnn": _mtcnn,
    "haar-alt2": lambda **kw: HaarDetector(cascade="haarcascade_frontalface_alt2.xml", **kw),
    "none": lambda **kw: WholeImage(),
}


def register_detector(name: str, factory: Callable[..., Detector]) -> None:
    """Make ``factory(**kw)`` available as detector ``name`` (for Recognizer and ``ferlab predict --detector``)."""
    DETECTORS[name] = factory


def create_detector(name: str = "haar", **kw) -> Detector:
    if name not in DETECTORS:
        raise ValueError(f"unknown detector {name!r}; choose one of {', '.join(sorted(DETECTORS))}")
    return DETECTORS[name](**kw)


def expand_box(box: Box, margin: float) -> Box:
    """Grow a box by ``margin`` x its size on each side (0.1 -> 1.2 x as wide), around the same centre."""
    x, y, w, h = box
    dx, dy = round(margin * w), round(margin * h)
    return x - dx, y - dy, w + 2 * dx, h + 2 * dy


def crop_faces(gray: np.ndarray, boxes: np.ndarray, margin: float = 0.1,
               size: tuple[int, int] = (48, 48)) -> np.ndarray:
    """Cut each box (grown by ``margin``) out of gray (H, W) uint8 and resize: -> (N, 1, size[0], size[1]) uint8.

    Boxes that reach past the border are filled by replicating the edge pixels, so the face stays centred.
    """
    import cv2

    out = np.empty((len(boxes), 1, *size), np.uint8)
    h, w = gray.shape
    for i, box in enumerate(np.asarray(boxes).reshape(-1, 4).tolist()):
        x, y, bw, bh = expand_box(tuple(box), margin) if margin else box
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + bw, w), min(y + bh, h)
        if x1 <= x0 or y1 <= y0:
            raise ValueError(f"box {box} lies outside the {w}x{h} image")
        crop = gray[y0:y1, x0:x1]
        if (x0 - x, y0 - y, x + bw - x1, y + bh - y1) != (0, 0, 0, 0):
            crop = cv2.copyMakeBorder(crop, y0 - y, y + bh - y1, x0 - x, x + bw - x1, cv2.BORDER_REPLICATE)
        interp = cv2.INTER_AREA if bw >= size[1] else cv2.INTER_LINEAR
        out[i, 0] = cv2.resize(crop, (size[1], size[0]), interpolation=interp)
    return out


@functools.cache
def fer2013_framing(detector: str) -> dict | None:
    """The measured FER2013 framing of ``detector`` (``box``: median x, y, w, h and, with landmarks, ``landmarks``:
    five mean x, y, in pixels of the 48x48 face), or None when it was not measured."""
    if not FRAMING_FILE.is_file():
        return None
    return json.loads(FRAMING_FILE.read_text())["detectors"].get(detector)


def framed_boxes(boxes: np.ndarray, box48: tuple[float, float, float, float], size: int = 48) -> np.ndarray:
    """The crops (N, 4) x, y, w, h that frame detected (N, 4) boxes the way a size x size FER2013 face frames its
    own detected box ``box48`` (x, y, w, h in its pixels)."""
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    bx, by, bw, bh = box48
    sx, sy = b[:, 2] / bw, b[:, 3] / bh  # image pixels per FER2013 pixel
    out = np.stack([b[:, 0] - bx * sx, b[:, 1] - by * sy, size * sx, size * sy], 1)
    return np.round(out).astype(np.int64)


def aligned_crops(gray: np.ndarray, landmarks: np.ndarray, template: np.ndarray,
                  size: tuple[int, int] = (48, 48)) -> np.ndarray:
    """Faces cut so that their five landmarks (N, 5, 2) land on ``template`` (5, 2), given in pixels of the 48x48
    FER2013 face: a rotation, scale and shift (eyes level), fitted by least squares. -> (N, 1, *size) uint8.

    The warp goes to 3x the output size, then down with INTER_AREA, so that large faces are not aliased."""
    import cv2

    up = 3
    target = np.asarray(template, np.float32) * (size[1] / 48.0) * up
    out = np.empty((len(landmarks), 1, *size), np.uint8)
    for i, pts in enumerate(np.asarray(landmarks, np.float32).reshape(-1, 5, 2)):
        m, _ = cv2.estimateAffinePartial2D(pts, target, method=cv2.LMEDS)
        if m is None:
            raise ValueError(f"cannot align face {i}: its landmarks are degenerate")
        big = cv2.warpAffine(gray, m, (size[1] * up, size[0] * up), flags=cv2.INTER_LINEAR,
                             borderMode=cv2.BORDER_REPLICATE)
        out[i, 0] = cv2.resize(big, (size[1], size[0]), interpolation=cv2.INTER_AREA)
    return out
