"""Draw faces on an image: a box per face with its label and probability."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ferlab.recognize.api import Face

# BGR colours per class name (unknown names fall back to white)
COLORS: dict[str, tuple[int, int, int]] = {
    "Angry": (40, 40, 220), "Disgust": (40, 140, 40), "Fear": (160, 60, 160), "Happy": (0, 200, 255),
    "Sad": (200, 120, 40), "Surprise": (0, 140, 255), "Neutral": (190, 190, 190),
    "Contempt": (120, 90, 20),  # FER+'s eighth class
}


def draw_faces(bgr: np.ndarray, faces: Sequence[Face]) -> np.ndarray:
    """A copy of (H, W, 3) uint8 BGR with each face boxed and labelled ``Label 0.93``."""
    import cv2

    out = bgr.copy()
    scale = max(out.shape[:2]) / 1000.0
    thick = max(1, round(2 * scale))
    font_scale = max(0.4, 0.7 * scale)
    for f in faces:
        x, y, w, h = f.box
        color = COLORS.get(f.label, (255, 255, 255))
        cv2.rectangle(out, (x, y), (x + w, y + h), color, thick)
        text = f"{f.label} {f.score:.2f}"
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, thick)
        ty = y - 4 if y - th - base - 4 >= 0 else y + h + th + 4  # above the box, or below it at the top edge
        cv2.rectangle(out, (x, ty - th - base), (x + tw, ty + base), color, cv2.FILLED)
        cv2.putText(out, text, (x, ty), cv2.FONT_HERSHEY_SIMPLEX, font_scale, (0, 0, 0), thick, cv2.LINE_AA)
    return out
