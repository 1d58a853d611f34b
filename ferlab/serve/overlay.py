"""Heat-map overlays of face crops, encoded as PNG data URLs for the web page and the JSON API."""

from __future__ import annotations

import base64

import numpy as np

OVERLAY_SIZE = 144  # pixels per side of the rendered overlay (3x the 48x48 model input)
OVERLAY_ALPHA = 0.45  # weight of the colour map over the grey face


def heat_overlay(face: np.ndarray, heat: np.ndarray, size: int = OVERLAY_SIZE, alpha: float = OVERLAY_ALPHA,
                 colormap: int | None = None) -> np.ndarray:
    """Blend a JET-coloured heat map over a grey face crop.

    face: (h, w) uint8 grey crop (the model input, e.g. 48x48); heat: (h', w') float in [0, 1].
    Returns (size, size, 3) uint8 BGR (OpenCV's channel order).
    """
    import cv2

    if face.ndim != 2 or heat.ndim != 2:
        raise ValueError(f"heat_overlay expects 2-D face and heat maps, got {face.shape} and {heat.shape}")
    grey = cv2.resize(face.astype(np.uint8), (size, size), interpolation=cv2.INTER_CUBIC)  # (S, S)
    grey = cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)  # (S, S, 3)
    h = np.clip(np.nan_to_num(heat.astype(np.float32)), 0.0, 1.0)
    h = cv2.resize(h, (size, size), interpolation=cv2.INTER_LINEAR)  # (S, S)
    colour = cv2.applyColorMap((h * 255).astype(np.uint8), cv2.COLORMAP_JET if colormap is None else colormap)
    return cv2.addWeighted(colour, alpha, grey, 1.0 - alpha, 0.0)  # (S, S, 3)


def png_data_url(image_bgr: np.ndarray) -> str:
    """``data:image/png;base64,...`` of an (H, W, 3) BGR or (H, W) grey uint8 image."""
    import cv2

    ok, buf = cv2.imencode(".png", image_bgr)
    if not ok:
        raise ValueError(f"could not encode an image of shape {image_bgr.shape} as PNG")
    return "data:image/png;base64," + base64.b64encode(buf.tobytes()).decode("ascii")
