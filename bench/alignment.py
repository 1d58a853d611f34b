"""What the crop does to accuracy on faces in photos: a margin, FER2013's framing, or alignment on landmarks.

    python bench/alignment.py --data fer2013.csv.gz [--split val|test] [--model NAME] [--n 3589]

Each FER2013 face of the split is enlarged 3x (cubic) to 144x144, set in a 320x320 frame with its edges replicated,
and shown twice: upright, and rotated by a seeded random angle of 10-25 degrees either way (the frame turned about
the face's centre). Each detector (haar, mtcnn) runs on every frame; a face counts as found when a box's centre is
within 40 pixels of the face's. On the faces it finds, the model (default: the shipped default, no TTA) classifies
the crops each cropping rule gives:

* ``margin 0.1``: the box grown by 10% on each side (the rule before the framing was measured);
* ``framed``: the box cut the way FER2013 frames the boxes this detector finds in its own faces
  (``ferlab/recognize/framing.json``, measured on Training faces by ``bench/framing.py``);
* ``aligned`` (mtcnn): a rotation and scale that puts the five landmarks where FER2013's fall on average.

The table gives the share found and the accuracy of each rule against the FER2013 label, with the model's accuracy
on the original 48x48 faces of the same rows for reference. Protocol: the crop rule is chosen on PublicTest
(``--split val``); PrivateTest is only reported.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

UP, FRAME = 3, 320


def frame_of(face: np.ndarray, degrees: float) -> np.ndarray:
    """A 48x48 face -> (320, 320, 3) BGR: enlarged 3x, edges replicated out to the frame, turned ``degrees``."""
    import cv2

    big = cv2.resize(face, (48 * UP, 48 * UP), interpolation=cv2.INTER_CUBIC)
    pad = (FRAME - 48 * UP) // 2
    big = cv2.copyMakeBorder(big, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
    if degrees:
        m = cv2.getRotationMatrix2D((FRAME / 2, FRAME / 2), degrees, 1.0)
        big = cv2.warpAffine(big, m, (FRAME, FRAME), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return cv2.cvtColor(big, cv2.COLOR_GRAY2BGR)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="fer2013.csv[.gz]")
    ap.add_argument("--split", default="val", choices=("val", "test"), help="val = PublicTest (choose), test = "
                                                                             "PrivateTest (report)")
    ap.add_argument("--model", default=None, help="model (default: the shipped default)")
    ap.add_argument("--n", type=int, default=None, help="the first N faces of the split (default: all)")
    ap.add_argument("--detectors", nargs="+", default=["haar", "mtcnn"])
    ap.add_argument("--seed", type=int, default=0, help="seed of the rotation angles (default 0)")
    ap.add_argument("--threads", type=int, default=2, help="threads for torch and OpenCV (default 2)")
    args = ap.parse_args(argv)

    import cv2
    from tqdm.auto import tqdm

    from ferlab import Recognizer
    from ferlab.data.source import open_data
    from ferlab.hardware import describe

    data = open_data(args.data, progress=False)
    idx = data.indices(args.split)[: args.n]
    faces, labels = data.images[idx], data.labels[idx]
    rng = np.random.default_rng(args.seed)
    angles = rng.uniform(10, 25, len(idx)) * rng.choice([-1, 1], len(idx))
    print(f"{describe()}; {len(idx)} faces of {args.split}; rotated: {np.abs(angles).min():.1f}-"
          f"{np.abs(angles).max():.1f} degrees either way (seed {args.seed})")
    print("| detector | faces | found | crop | accuracy on the found faces | the 48x48 originals of the same rows |")
    print("| --- | --- | ---: | --- | ---: | ---: |")
    for det_name in args.detectors:
        kw = {"detector": det_name, "threads": args.threads}
        rules = {"margin 0.1": Recognizer(args.model, margin=0.1, **kw), "framed": Recognizer(args.model, **kw)}
        if det_name == "mtcnn":
            rules["aligned"] = Recognizer(args.model, align=True, **kw)
        ref = next(iter(rules.values()))
        original = ref.classify(faces[:, None]).argmax(1)  # (N,) the model on the 48x48 faces themselves
        det = ref.detector
        color = getattr(det, "wants_color", False)
        for condition in ("upright", "rotated"):
            found, crops = [], {r: [] for r in rules}
            for i in tqdm(range(len(idx)), desc=f"{det_name} {condition}", leave=False):
                bgr = frame_of(faces[i], angles[i] if condition == "rotated" else 0.0)
                gray = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
                image = bgr if color else gray
                boxes, marks = (det.detect(image)[:2] if hasattr(det, "detect") else (det(image), None))
                if not len(boxes):
                    continue
                d = np.hypot(*(boxes[:, :2] + boxes[:, 2:] / 2 - FRAME / 2).T)
                k = int(np.argmin(d))
                if d[k] > 40:
                    continue
                found.append(i)
                for r, rec in rules.items():
                    crops[r].append(rec.crops(gray, boxes[k : k + 1], None if marks is None else marks[k : k + 1]))
            found = np.array(found, np.int64)
            ref_acc = float((original[found] == labels[found]).mean()) if len(found) else float("nan")
            for r, rec in rules.items():
                pred = rec.classify(np.concatenate(crops[r])).argmax(1) if len(found) else np.empty(0)
                acc = float((pred == labels[found]).mean()) if len(found) else float("nan")
                print(f"| {det_name} | {condition} | {len(found) / len(idx):.1%} | {r} | {acc:.2%} | {ref_acc:.2%} |",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
