"""How FER2013 frames a face, as each detector sees it: where its box and (MTCNN) landmarks fall in the 48x48.

    python bench/framing.py --data fer2013.csv.gz [--detectors haar mtcnn] [--n 3000] [--write]

Training faces (the first ``--n`` of the Training split; never PublicTest or PrivateTest) are enlarged 3x (cubic) to
144x144 and set in the middle of a 288x288 frame with their edges replicated, so that the detector sees a face with
context, as in a photo. Each detector runs on every frame; a face counts when exactly one box is found whose centre
lies in the middle 144x144. The median box (x, y, w, h) and mean landmarks are printed in 48x48 units, with the
share of faces found. ``--write`` stores them in ``ferlab/recognize/framing.json``, which ``ferlab predict`` and
``Recognizer`` use to cut each detected face the way FER2013 frames faces (see ``ferlab.recognize.detect``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

UP, PAD = 3, 72  # enlargement of the 48x48 face, and the replicated border around it (pixels after enlargement)
OUT = Path(__file__).resolve().parents[1] / "ferlab" / "recognize" / "framing.json"


def frames_of(faces: np.ndarray) -> np.ndarray:
    """(N, 48, 48) uint8 -> (N, 288, 288, 3) uint8 BGR: enlarged 3x, edges replicated around."""
    import cv2

    out = []
    for f in faces:
        big = cv2.resize(f, (48 * UP, 48 * UP), interpolation=cv2.INTER_CUBIC)
        big = cv2.copyMakeBorder(big, PAD, PAD, PAD, PAD, cv2.BORDER_REPLICATE)
        out.append(cv2.cvtColor(big, cv2.COLOR_GRAY2BGR))
    return np.stack(out)


def measure(detector_name: str, faces: np.ndarray) -> dict:
    """The detector's median box and mean landmarks in 48x48 units over ``faces`` (N, 48, 48) uint8."""
    import cv2
    from tqdm.auto import tqdm

    from ferlab.recognize.detect import create_detector

    det = create_detector(detector_name, min_face=24)
    color = getattr(det, "wants_color", False)
    boxes, marks = [], []
    for frame in tqdm(frames_of(faces), desc=detector_name, leave=False):
        image = frame if color else cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
        if hasattr(det, "detect"):
            found, lm, _ = det.detect(image)
        else:
            found, lm = det(image), None
        centre = found[:, :2] + found[:, 2:] / 2
        inside = np.all((centre >= PAD) & (centre <= PAD + 48 * UP), axis=1)
        if inside.sum() != 1:
            continue
        k = int(np.flatnonzero(inside)[0])
        boxes.append((found[k] - [PAD, PAD, 0, 0]) / UP)
        if lm is not None:
            marks.append((lm[k] - PAD) / UP)
    boxes = np.array(boxes)
    result = {"found": len(boxes), "of": len(faces), "box": np.median(boxes, 0).round(2).tolist(),
              "box_iqr": (np.percentile(boxes, 75, 0) - np.percentile(boxes, 25, 0)).round(2).tolist()}
    if marks:
        result["landmarks"] = np.mean(marks, 0).round(2).tolist()
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="fer2013.csv[.gz]")
    ap.add_argument("--detectors", nargs="+", default=["haar", "mtcnn"], help="registered detectors")
    ap.add_argument("--n", type=int, default=3000, help="Training faces to measure on (default 3000)")
    ap.add_argument("--threads", type=int, default=1, help="threads for torch and OpenCV (default 1)")
    ap.add_argument("--write", action="store_true", help=f"store the figures in {OUT.relative_to(OUT.parents[2])}")
    args = ap.parse_args(argv)

    import cv2
    import torch

    from ferlab.data.source import open_data

    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    data = open_data(args.data, progress=False)
    faces = data.images[data.indices("train")[: args.n]]
    results = {}
    for name in args.detectors:
        r = measure(name, faces)
        results[name] = r
        x, y, w, h = r["box"]
        print(f"{name}: found in {r['found']} of {r['of']} faces ({r['found'] / r['of']:.1%}); median box in 48x48: "
              f"x {x:.1f} y {y:.1f} w {w:.1f} h {h:.1f} (interquartile ranges {r['box_iqr']})")
        if "landmarks" in r:
            names = ("left eye", "right eye", "nose", "mouth left", "mouth right")
            print("  mean landmarks: " + "; ".join(f"{n} ({px:.1f}, {py:.1f})"
                                                    for n, (px, py) in zip(names, r["landmarks"], strict=True)))
    if args.write:
        doc = {"command": f"python bench/framing.py --data fer2013.csv.gz --n {args.n} --write",
               "units": "pixels of the 48x48 FER2013 face", "detectors": results}
        OUT.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
