"""What ``POST /predict`` computes: faces (Recognizer), then a heat-map overlay per face (ferlab.explain).

Kept apart from the HTTP layer so it can be used and tested without a server.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np

NO_FACE_MESSAGE = "no face found: try a larger, frontal, well-lit face"
FALLBACK_METHOD = "saliency"  # for models without a spatial feature map (MLPs), where Grad-CAM is undefined


class FaceService:
    """Detects and classifies faces with ``recognizer`` and renders an attribution overlay for each.

    explain_method: a name in ``ferlab.explain.METHODS`` or None (no overlays). The overlay needs a PyTorch
    model: ``explain_model`` (model, normalizer), by default the recognizer's own when its backend is torch;
    with an ONNX-only recognizer and no ``explain_model``, faces come without overlays.
    Calls are serialised by a lock: the model, its hooks and the detector are shared.
    """

    def __init__(self, recognizer: Any, explain_method: str | None = "gradcam",
                 explain_model: tuple[Any, Any] | None = None, model_name: str | None = None) -> None:
        self.recognizer = recognizer
        self.class_names: list[str] = list(recognizer.class_names)
        self.model_name = model_name or str(getattr(recognizer, "model_name", None)
                                            or recognizer.meta.get("model", {}).get("name", "model"))
        self.weights = str(getattr(recognizer, "weights", None) or self.model_name)  # shipped name or path
        self.backend_name = str(getattr(recognizer.backend, "name", "?"))
        self._lock = threading.Lock()
        if explain_model is None and hasattr(recognizer.backend, "model"):
            explain_model = (recognizer.backend.model, recognizer.backend.normalizer)
        self._explain_model = explain_model if explain_method else None
        self.explain_method = self._usable_method(explain_method) if self._explain_model else None

    def _usable_method(self, method: str) -> str:
        """``method``, or the fallback when the model cannot do it (Grad-CAM on an MLP); checked on a blank face."""
        import torch

        from ferlab.explain import METHODS, attribute

        if method not in METHODS:
            raise ValueError(f"unknown explanation method {method!r}; choose one of {', '.join(METHODS)} or none")
        model, _ = self._explain_model
        h, w = self.recognizer.backend.input_size
        try:
            attribute(model, torch.zeros(1, 1, h, w), method=method, target=0)
        except ValueError:
            if method == FALLBACK_METHOD:
                raise
            return FALLBACK_METHOD
        return method

    def analyse(self, image_bgr: np.ndarray) -> dict[str, Any]:
        """(H, W, 3) uint8 BGR -> the JSON answer of ``POST /predict``."""
        t0 = time.perf_counter()
        with self._lock:
            faces = self.recognizer.predict(image_bgr, color="bgr")  # largest first
            overlays = self._overlays(image_bgr, faces) if faces and self.explain_method else [None] * len(faces)
        out: dict[str, Any] = {
            "faces": [
                {"box": [int(v) for v in f.box], "label": f.label, "score": float(f.score),
                 "probabilities": {c: float(f.probabilities[c]) for c in self.class_names}, "gradcam": ov}
                for f, ov in zip(faces, overlays, strict=True)
            ],
            "width": int(image_bgr.shape[1]),
            "height": int(image_bgr.shape[0]),
            "model": self.model_name,
            "weights": self.weights,
            "tta": str(getattr(self.recognizer, "tta", "none")),
            "explain_method": self.explain_method,
            "seconds": round(time.perf_counter() - t0, 4),
        }
        if not faces:
            out["message"] = NO_FACE_MESSAGE
        return out

    def _overlays(self, image_bgr: np.ndarray, faces: list[Any]) -> list[str]:
        """A PNG data URL per face: its attribution map over the grey crop the model saw."""
        import cv2
        import torch

        from ferlab.explain import attribute
        from ferlab.serve.overlay import heat_overlay, png_data_url

        rec = self.recognizer
        model, normalizer = self._explain_model
        gray = cv2.cvtColor(image_bgr, cv2.COLOR_BGR2GRAY)  # (H, W), as Recognizer does
        boxes = np.array([f.box for f in faces], np.int64).reshape(-1, 4)  # (F, 4)
        marks = np.array([f.landmarks for f in faces]) if faces and faces[0].landmarks is not None else None
        pix = rec.crops(gray, boxes, marks)  # (F, 1, 48, 48) uint8: the model input
        x = normalizer(torch.from_numpy(pix).float() / 255.0)  # (F, 1, 48, 48)
        target = torch.tensor([self.class_names.index(f.label) for f in faces])  # (F,) explain the shown label
        heat = attribute(model, x, method=self.explain_method, target=target)  # (F, 48, 48) in [0, 1]
        heat = np.asarray(heat.detach().cpu() if hasattr(heat, "detach") else heat, np.float32)
        return [png_data_url(heat_overlay(p[0], hm)) for p, hm in zip(pix, heat, strict=True)]
