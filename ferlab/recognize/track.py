"""Faces followed across video frames: a track id per person, and probabilities smoothed per track over time.

Association is by box overlap: each live track's box is moved by its velocity (a constant-velocity prediction),
the predicted boxes and the frame's detections are matched one to one by the Hungarian algorithm on their IoU,
and a pair counts only above ``iou_threshold``. An unmatched detection starts a track; a track unmatched for more
than ``max_missed`` processed frames ends. Smoothing is an exponential moving average per track with time
constant ``smooth_s`` seconds (0: off), so it behaves the same at any frame rate or ``--every``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU (A, B) of boxes a (A, 4) and b (B, 4), each (x, y, w, h)."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    ax1, ay1, ax2, ay2 = a[:, 0:1], a[:, 1:2], a[:, 0:1] + a[:, 2:3], a[:, 1:2] + a[:, 3:4]  # (A, 1) each
    bx1, by1, bx2, by2 = b[:, 0], b[:, 1], b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]  # (B,) each
    iw = np.clip(np.minimum(ax2, bx2) - np.maximum(ax1, bx1), 0, None)  # (A, B)
    ih = np.clip(np.minimum(ay2, by2) - np.maximum(ay1, by1), 0, None)
    inter = iw * ih
    union = a[:, 2:3] * a[:, 3:4] + b[:, 2] * b[:, 3] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


@dataclass
class Track:
    """One followed face: its last box, velocity per processed frame, and smoothed probabilities."""

    id: int
    box: np.ndarray  # (4,) float: x, y, w, h
    time: float  # seconds of the last update
    smoothed: np.ndarray  # (K,)
    velocity: np.ndarray = field(default_factory=lambda: np.zeros(4))
    missed: int = 0  # processed frames since it was last matched

    def predicted(self) -> np.ndarray:
        return self.box + self.velocity * (self.missed + 1)


def frame_seconds(time: float | None, frame: int | None) -> float:
    """A video frame's time in seconds; a video without timestamps counts its frames as seconds."""
    return float(time) if time is not None else float(frame or 0)


class FaceTracker:
    """Assigns track ids to each frame's faces (see the module docstring). One tracker per video."""

    def __init__(self, iou_threshold: float = 0.3, max_missed: int = 15, smooth_s: float = 0.5) -> None:
        if not 0 < iou_threshold <= 1:
            raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
        if max_missed < 0 or smooth_s < 0:
            raise ValueError(f"max_missed and smooth_s must be >= 0, got {max_missed} and {smooth_s}")
        self.iou_threshold, self.max_missed, self.smooth_s = iou_threshold, max_missed, smooth_s
        self.tracks: list[Track] = []
        self.next_id = 1
        self.last_time: float | None = None  # of the last frame updated

    def update(self, boxes: np.ndarray, probs: np.ndarray, time: float) -> tuple[list[int], np.ndarray]:
        """The track id of each face (boxes (F, 4), probabilities (F, K)) of the frame at ``time`` seconds, and
        the faces' smoothed probabilities (F, K)."""
        from scipy.optimize import linear_sum_assignment

        boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
        probs = np.asarray(probs, np.float64)
        probs = probs.reshape(len(boxes), -1) if len(boxes) else probs.reshape(0, probs.shape[-1] if probs.ndim == 2
                                                                                   else 0)
        ids = [0] * len(boxes)
        smoothed = probs.copy()
        matched_tracks: set[int] = set()
        if self.tracks and len(boxes):
            iou = iou_matrix(np.stack([t.predicted() for t in self.tracks]), boxes)  # (T, F)
            rows, cols = linear_sum_assignment(-iou)
            for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
                if iou[r, c] < self.iou_threshold:
                    continue
                t = self.tracks[r]
                step = boxes[c] - t.box
                t.velocity = 0.5 * t.velocity + 0.5 * step / (t.missed + 1)
                t.box, t.missed = boxes[c], 0
                alpha = 1.0 if self.smooth_s == 0 else 1.0 - math.exp(-max(time - t.time, 0.0) / self.smooth_s)
                t.smoothed = t.smoothed + alpha * (probs[c] - t.smoothed)
                t.time = time
                ids[c], smoothed[c] = t.id, t.smoothed
                matched_tracks.add(r)
        for i, t in enumerate(self.tracks):
            if i not in matched_tracks:
                t.missed += 1
        self.tracks = [t for t in self.tracks if t.missed <= self.max_missed]
        for c in range(len(boxes)):
            if ids[c] == 0:  # a face no live track explains: a new track
                self.tracks.append(Track(self.next_id, boxes[c], time, probs[c].copy()))
                ids[c] = self.next_id
                self.next_id += 1
        self.last_time = time
        return ids, smoothed


@dataclass
class TrackSummary:
    """What one track showed over its time in view."""

    file: str | None
    track: int
    first_s: float
    last_s: float
    frames: int
    mean: dict[str, float]  # mean (raw) probability of each class
    share: dict[str, float]  # the share of its frames whose top class is each class
    dominant: str

    def to_dict(self) -> dict:
        return {"file": self.file, "track": self.track, "first_s": self.first_s, "last_s": self.last_s,
                "duration_s": self.last_s - self.first_s, "frames": self.frames, "dominant": self.dominant,
                "mean": self.mean, "share": self.share}


class TrackLog:
    """The per-frame values of every track while a video streams (a few floats per face, not the frames), for
    the summary and the timeline picture."""

    def __init__(self, class_names: list[str]) -> None:
        self.class_names = list(class_names)
        self.rows: dict[tuple[str | None, int], list[tuple[float, np.ndarray, np.ndarray]]] = {}

    def add(self, face) -> None:  # a recognize.api.Face with track and time set
        if face.track is None:
            return
        raw = np.array([face.probabilities[c] for c in self.class_names])
        smooth = np.array([(face.smoothed or face.probabilities)[c] for c in self.class_names])
        self.rows.setdefault((face.file, face.track), []).append((frame_seconds(face.time, face.frame), raw, smooth))

    def summaries(self) -> list[TrackSummary]:
        out = []
        for (file, track), rows in self.rows.items():
            raw = np.stack([r[1] for r in rows])  # (T, K)
            top = raw.argmax(1)
            share = {c: float((top == k).mean()) for k, c in enumerate(self.class_names)}
            mean = {c: float(v) for c, v in zip(self.class_names, raw.mean(0), strict=True)}
            out.append(TrackSummary(file, track, rows[0][0], rows[-1][0], len(rows), mean, share,
                                    max(share, key=share.__getitem__)))
        return out

    def plot(self, path: str, max_tracks: int = 12) -> int:
        """One strip per track (the longest ``max_tracks``): its smoothed probabilities over time. Returns how
        many tracks were drawn."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from ferlab.recognize.annotate import COLORS

        items = sorted(self.rows.items(), key=lambda kv: -len(kv[1]))[:max_tracks]
        if not items:
            raise ValueError("no tracked face to draw a timeline of (no video, or no face in it)")
        fig, axes = plt.subplots(len(items), 1, figsize=(10, 1.6 * len(items) + 0.6), sharex=True, squeeze=False)
        for ax, ((file, track), rows) in zip(axes[:, 0], items, strict=True):
            t = np.array([r[0] for r in rows])
            s = np.stack([r[2] for r in rows])  # (T, K)
            for k, c in enumerate(self.class_names):
                b, g, r = COLORS.get(c, (128, 128, 128))
                ax.plot(t, s[:, k], color=(r / 255, g / 255, b / 255), label=c, lw=1.5)
            ax.set_ylim(0, 1)
            ax.set_ylabel(f"track {track}", rotation=0, ha="right", va="center")
            ax.set_title(f"{file}" if file else "", fontsize=8, loc="left")
        axes[-1, 0].set_xlabel("time (s)")
        axes[0, 0].legend(ncol=len(self.class_names), fontsize=7, loc="lower left", bbox_to_anchor=(0, 1.15))
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return len(items)
