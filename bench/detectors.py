"""Face detectors against labelled photos: recall and false positives at IoU 0.5, and speed on 640x480.

    python bench/detectors.py --faces DLIB/examples/faces [--detectors haar haar-alt2 mtcnn] [--iou 0.5]

``--faces`` is a folder with dlib-style XML files (``training.xml``, ``testing.xml``: ``<image file=...>`` with
``<box top left width height/>`` per face, ``ignore='1'`` boxes skipped) and their images, for example the
``examples/faces`` folder of dlib's public repository (photos from PASCAL VOC 2011 and the web; not shipped with
ferlab). Each detector runs with ``min_face`` 20 on every image; a detection matches an unmatched labelled face
when their IoU is at least ``--iou`` (greedy, highest IoU first). Speed: the median milliseconds per image with
every image resized to 640x480, with ``--threads`` threads for OpenCV and torch.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

DEFAULT_XML = ("training.xml", "testing.xml")


def read_boxes(folder: Path, xml_names: tuple[str, ...] = DEFAULT_XML) -> dict[Path, np.ndarray]:
    """Image path -> labelled boxes (N, 4) x, y, w, h, from the dlib XML files in ``folder``."""
    out: dict[Path, np.ndarray] = {}
    for name in xml_names:
        xml = folder / name
        if not xml.is_file():
            continue
        for image in ET.parse(xml).getroot().iter("image"):
            boxes = [[int(b.get(k)) for k in ("left", "top", "width", "height")] for b in image.iter("box")
                     if b.get("ignore") != "1"]
            out[folder / image.get("file")] = np.array(boxes, np.int64).reshape(-1, 4)
    if not out:
        raise SystemExit(f"{folder}: no {' or '.join(xml_names)} with <image> entries")
    return out


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, M) IoU of (N, 4) and (M, 4) x, y, w, h boxes."""
    ax1, ay1, aw, ah = (a[:, i : i + 1].astype(float) for i in range(4))
    bx1, by1, bw, bh = (b[None, :, i].astype(float) for i in range(4))
    iw = np.clip(np.minimum(ax1 + aw, bx1 + bw) - np.maximum(ax1, bx1), 0, None)
    ih = np.clip(np.minimum(ay1 + ah, by1 + bh) - np.maximum(ay1, by1), 0, None)
    inter = iw * ih
    return inter / (aw * ah + bw * bh - inter)


def match(found: np.ndarray, truth: np.ndarray, threshold: float) -> int:
    """How many labelled faces a detection matches one to one at IoU >= threshold (greedy, best IoU first)."""
    if not len(found) or not len(truth):
        return 0
    m = iou(found, truth)
    hits = 0
    while True:
        i, j = np.unravel_index(np.argmax(m), m.shape)
        if m[i, j] < threshold:
            return hits
        hits += 1
        m[i, :], m[:, j] = -1, -1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--faces", required=True, help="folder with dlib-style XML box files and their images")
    ap.add_argument("--detectors", nargs="+", default=["haar", "haar-alt2", "mtcnn"], help="registered detectors")
    ap.add_argument("--iou", type=float, default=0.5, help="IoU for a match (default 0.5)")
    ap.add_argument("--threads", type=int, default=2, help="threads for OpenCV and torch (default 2)")
    ap.add_argument("--repeat", type=int, default=3, help="timed passes over the images (default 3)")
    args = ap.parse_args(argv)

    import cv2
    import torch

    from ferlab.hardware import describe
    from ferlab.images import read_image
    from ferlab.recognize.detect import create_detector

    cv2.setNumThreads(args.threads)
    torch.set_num_threads(args.threads)
    labelled = read_boxes(Path(args.faces))
    images = {p: read_image(p) for p in labelled}  # BGR
    n_faces = sum(len(b) for b in labelled.values())
    print(f"{describe()}; {args.threads} threads; {len(images)} images, {n_faces} labelled faces in {args.faces}; "
          f"IoU >= {args.iou}")
    print("| detector | found | recall | false positives | ms per 640x480 image |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name in args.detectors:
        det = create_detector(name, min_face=20)
        color = getattr(det, "wants_color", False)
        hits = fps = 0
        for p, img in images.items():
            boxes = det(img if color else cv2.cvtColor(img, cv2.COLOR_BGR2GRAY))
            h = match(boxes, labelled[p], args.iou)
            hits, fps = hits + h, fps + len(boxes) - h
        frames = [cv2.resize(img, (640, 480), interpolation=cv2.INTER_AREA) for img in images.values()]
        frames = [f if color else cv2.cvtColor(f, cv2.COLOR_BGR2GRAY) for f in frames]
        det(frames[0])  # warm-up
        ms = []
        for _ in range(args.repeat):
            for f in frames:
                t0 = time.perf_counter()
                det(f)
                ms.append(1000 * (time.perf_counter() - t0))
        print(f"| {name} | {hits} / {n_faces} | {hits / n_faces:.1%} | {fps} | {statistics.median(ms):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
