"""What ``POST /predict`` computes: faces (Recognizer), then a heat-map overlay per face (ferlab.explain).

Kept apart from the HTTP layer so it can be used and tested without a server.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections import OrderedDict
from typing import Any

import numpy as np

NO_FACE_MESSAGE = "no face found: try a larger, frontal, well-lit face"
FALLBACK_METHOD = "saliency"  # for models without a spatial feature map (MLPs), where Grad-CAM is undefined
MAX_STREAMS = 32  # live webcam streams tracked at once; the least recently seen is forgotten beyond
STREAM_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


class StreamError(ValueError):
    """A bad live-stream parameter (answered 400)."""


def check_stream(stream: str, t: float | None) -> None:
    """StreamError unless ``stream`` is a valid live-stream id and ``t`` (when given) a time in seconds >= 0."""
    if not STREAM_ID.fullmatch(stream):
        raise StreamError(f"stream must be 1-64 letters, digits, '-' or '_', got {stream[:80]!r}")
    if t is not None and not (math.isfinite(t) and t >= 0):
        raise StreamError(f"t must be a finite number of seconds >= 0, got {t}")


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
        self._streams: OrderedDict[str, Any] = OrderedDict()  # live stream id -> its FaceTracker
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

    def analyse(self, image_bgr: np.ndarray, stream: str | None = None, t: float | None = None,
                explain: bool = True) -> dict[str, Any]:
        """(H, W, 3) uint8 BGR -> the JSON answer of ``POST /predict``.

        stream: the id of a live stream (a webcam page): its frames' faces are tracked across calls by the
        recognizer's tracker (:class:`ferlab.recognize.track.FaceTracker`, as for videos), each face gets its
        ``track`` id and ``smoothed`` probabilities, and ``label``/``score`` follow the smoothed ones (the raw
        ``probabilities`` are kept). t: the frame's time in seconds on the stream's clock (default: the server's).
        explain: False skips the heat maps (live frames).
        """
        t0 = time.perf_counter()
        if stream is not None:
            check_stream(stream, t)
            t = time.monotonic() if t is None else float(t)
        with self._lock:
            faces = self.recognizer.predict(image_bgr, color="bgr")  # largest first
            tracked = self._track(stream, faces, t) if stream is not None else None
            explain = explain and bool(faces) and bool(self.explain_method)
            # each face's heat map explains the label it is answered with: on a stream, the smoothed one
            shown = [f.label for f in faces] if tracked is None else \
                [self.class_names[int(np.argmax(p))] for p in tracked[1]]
            overlays = self._overlays(image_bgr, faces, shown) if explain else [None] * len(faces)
        answers = []
        for i, (f, ov) in enumerate(zip(faces, overlays, strict=True)):
            a = {"box": [int(v) for v in f.box], "label": f.label, "score": float(f.score),
                 "probabilities": {c: float(f.probabilities[c]) for c in self.class_names}, "gradcam": ov}
            if tracked is not None:
                ids, smoothed = tracked
                k = int(np.argmax(smoothed[i]))
                a.update(track=int(ids[i]), label=self.class_names[k], score=float(smoothed[i][k]),
                         smoothed={c: float(v) for c, v in zip(self.class_names, smoothed[i], strict=True)})
            answers.append(a)
        out: dict[str, Any] = {
            "faces": answers,
            "width": int(image_bgr.shape[1]),
            "height": int(image_bgr.shape[0]),
            "model": self.model_name,
            "weights": self.weights,
            "tta": str(getattr(self.recognizer, "tta", "none")),
            "explain_method": self.explain_method,
            "seconds": round(time.perf_counter() - t0, 4),
        }
        if stream is not None:
            out["stream"], out["t"] = stream, t
        if not faces:
            out["message"] = NO_FACE_MESSAGE
        return out

    def _track(self, stream: str, faces: list[Any], t: float) -> tuple[list[int], np.ndarray]:
        """Track ids and smoothed probabilities of a live frame's faces; one tracker per stream (the
        recognizer's settings), the least recently seen forgotten beyond MAX_STREAMS. Called under the lock."""
        from ferlab.recognize.track import FaceTracker

        tracker = self._streams.pop(stream, None)
        if tracker is None:
            rec = self.recognizer
            tracker = FaceTracker(getattr(rec, "track_iou", 0.3), smooth_s=getattr(rec, "smooth", 0.5))
        self._streams[stream] = tracker  # now the most recent
        while len(self._streams) > MAX_STREAMS:
            self._streams.popitem(last=False)
        if tracker.last_time is not None and t <= tracker.last_time:  # its smoothing would ignore the frame
            raise StreamError(f"t must grow within a stream: {t} after {tracker.last_time} on stream {stream!r} "
                              "(a restarted clock starts a new stream id)")
        boxes = np.array([f.box for f in faces], np.float64).reshape(-1, 4)  # (F, 4)
        probs = np.array([[f.probabilities[c] for c in self.class_names] for f in faces], np.float64)
        return tracker.update(boxes, probs.reshape(len(faces), len(self.class_names)), t)

    def _overlays(self, image_bgr: np.ndarray, faces: list[Any], labels: list[str]) -> list[str]:
        """A PNG data URL per face: its attribution map for ``labels`` (one per face) over the grey crop the model
        saw."""
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
        target = torch.tensor([self.class_names.index(label) for label in labels])  # (F,) the shown labels
        heat = attribute(model, x, method=self.explain_method, target=target)  # (F, 48, 48) in [0, 1]
        heat = np.asarray(heat.detach().cpu() if hasattr(heat, "detach") else heat, np.float32)
        return [png_data_url(heat_overlay(p[0], hm)) for p, hm in zip(pix, heat, strict=True)]
