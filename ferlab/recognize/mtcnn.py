"""MTCNN face detection with five landmarks (Zhang et al., "Joint Face Detection and Alignment using Multi-task
Cascaded Convolutional Networks", IEEE SPL 2016), offline: the weights ship with ferlab.

Three small nets run as a cascade: P-Net proposes boxes over an image pyramid (a fully convolutional 12x12
window, stride 2), R-Net re-scores and refines the survivors at 24x24, O-Net at 48x48 scores them once more and
gives the eyes, nose and mouth corners. ``mtcnn.safetensors`` holds the original authors' trained weights as
converted to PyTorch by the facenet-pytorch project (MIT licence; see ``MTCNN_LICENSE``), stored in fp16 and
loaded without unpickling.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

WEIGHTS = Path(__file__).with_name("mtcnn.safetensors")


class PNet(nn.Module):
    """Proposal net: (B, 3, H, W) -> box offsets (B, 4, h, w) and face probabilities (B, 2, h, w)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 10, 3), nn.PReLU(10)
        self.conv2, self.prelu2 = nn.Conv2d(10, 16, 3), nn.PReLU(16)
        self.conv3, self.prelu3 = nn.Conv2d(16, 32, 3), nn.PReLU(32)
        self.conv4_1, self.conv4_2 = nn.Conv2d(32, 2, 1), nn.Conv2d(32, 4, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 2, 2, ceil_mode=True)
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return self.conv4_2(x), self.conv4_1(x).softmax(1)


class RNet(nn.Module):
    """Refinement net: (B, 3, 24, 24) -> box offsets (B, 4) and face probabilities (B, 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 28, 3), nn.PReLU(28)
        self.conv2, self.prelu2 = nn.Conv2d(28, 48, 3), nn.PReLU(48)
        self.conv3, self.prelu3 = nn.Conv2d(48, 64, 2), nn.PReLU(64)
        self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
        self.dense5_1, self.dense5_2 = nn.Linear(128, 2), nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu2(self.conv2(x)), 3, 2, ceil_mode=True)
        x = self.prelu3(self.conv3(x))  # (B, 64, 3, 3)
        x = self.prelu4(self.dense4(x.permute(0, 3, 2, 1).flatten(1)))  # the original nets read images transposed
        return self.dense5_2(x), self.dense5_1(x).softmax(1)


class ONet(nn.Module):
    """Output net: (B, 3, 48, 48) -> box offsets (B, 4), landmarks (B, 10: 5 x then 5 y) and probabilities (B, 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 32, 3), nn.PReLU(32)
        self.conv2, self.prelu2 = nn.Conv2d(32, 64, 3), nn.PReLU(64)
        self.conv3, self.prelu3 = nn.Conv2d(64, 64, 3), nn.PReLU(64)
        self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)
        self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.dense6_1, self.dense6_2, self.dense6_3 = nn.Linear(256, 2), nn.Linear(256, 4), nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu2(self.conv2(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu3(self.conv3(x)), 2, 2, ceil_mode=True)
        x = self.prelu4(self.conv4(x))  # (B, 128, 3, 3)
        x = self.prelu5(self.dense5(x.permute(0, 3, 2, 1).flatten(1)))
        return self.dense6_2(x), self.dense6_3(x), self.dense6_1(x).softmax(1)


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float, mode: str = "union") -> np.ndarray:
    """Indices kept by greedy non-maximum suppression of (N, 4) x1, y1, x2, y2 boxes, best score first; overlap is
    intersection over union, or over the smaller box with ``mode="min"``."""
    if not len(boxes):
        return np.empty(0, np.int64)
    x1, y1, x2, y2 = boxes.T
    area = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while len(order):
        i, rest = order[0], order[1:]
        keep.append(i)
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        inter = w * h
        denom = np.minimum(area[i], area[rest]) if mode == "min" else area[i] + area[rest] - inter
        order = rest[inter / denom <= threshold]
    return np.asarray(keep, np.int64)


def _square(boxes: np.ndarray) -> np.ndarray:
    """(N, 4) x1, y1, x2, y2 boxes made square around their centres (side: the longer one)."""
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    side = np.maximum(w, h)
    x1, y1 = boxes[:, 0] + (w - side) / 2, boxes[:, 1] + (h - side) / 2
    return np.stack([x1, y1, x1 + side, y1 + side], 1)


def _regress(boxes: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Apply the nets' (N, 4) offsets, in units of the box size, to (N, 4) boxes."""
    w, h = boxes[:, 2] - boxes[:, 0] + 1, boxes[:, 3] - boxes[:, 1] + 1
    return boxes + offsets * np.stack([w, h, w, h], 1)


def _crops(image: np.ndarray, boxes: np.ndarray, size: int) -> torch.Tensor:
    """(N, 3, size, size) normalised crops of image (H, W, 3) float32 at the (N, 4) boxes, zero outside it."""
    import cv2

    h, w = image.shape[:2]
    out = np.zeros((len(boxes), size, size, 3), np.float32)
    for k, (x1, y1, x2, y2) in enumerate(np.floor(boxes).astype(np.int64).tolist()):
        patch = np.zeros((y2 - y1 + 1, x2 - x1 + 1, 3), np.float32)
        sx0, sy0, sx1, sy1 = max(x1, 0), max(y1, 0), min(x2 + 1, w), min(y2 + 1, h)
        if sx1 > sx0 and sy1 > sy0:
            patch[sy0 - y1 : sy1 - y1, sx0 - x1 : sx1 - x1] = image[sy0:sy1, sx0:sx1]
        out[k] = cv2.resize(patch, (size, size), interpolation=cv2.INTER_AREA)
    return torch.from_numpy(out).permute(0, 3, 1, 2)


class MTCNN:
    """Faces and five landmarks in a colour image (a ferlab detector: ``wants_color``, see
    :mod:`ferlab.recognize.detect`).

    min_face: smallest face side found, in pixels of the image (as the Haar detectors; on an image downscaled to
    ``max_side`` the floor is 12 pixels of the downscaled image); thresholds: the three nets' face probability
    thresholds; max_side: images are downscaled first so that their longest side is at most this.
    """

    wants_color = True

    def __init__(self, min_face: int = 24, thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7),
                 factor: float = 0.709, max_side: int = 1280, weights: str | Path = WEIGHTS) -> None:
        from safetensors.torch import load_file

        state = load_file(str(weights))
        self.pnet, self.rnet, self.onet = PNet(), RNet(), ONet()
        for name, net in (("pnet", self.pnet), ("rnet", self.rnet), ("onet", self.onet)):
            net.load_state_dict({k[len(name) + 1 :]: v.float() for k, v in state.items() if k.startswith(name + ".")})
            net.eval()
        self.min_face, self.thresholds, self.factor, self.max_side = int(min_face), thresholds, factor, int(max_side)
        self._lock = threading.Lock()

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) BGR or (H, W) gray uint8 -> boxes (N, 4) int (x, y, w, h), largest first."""
        return self.detect(image)[0]

    @torch.inference_mode()
    def detect(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Boxes (N, 4) int x, y, w, h (largest first), landmarks (N, 5, 2) float x, y (left eye, right eye, nose,
        left and right mouth corner, as seen in the image) and scores (N,)."""
        import cv2

        rgb = cv2.cvtColor(image, cv2.COLOR_BGR2RGB) if image.ndim == 3 else cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
        h0, w0 = rgb.shape[:2]
        scale = min(1.0, self.max_side / max(h0, w0))
        if scale < 1.0:
            rgb = cv2.resize(rgb, (max(1, round(w0 * scale)), max(1, round(h0 * scale))), interpolation=cv2.INTER_AREA)
        norm = (rgb.astype(np.float32) - 127.5) * 0.0078125  # (H, W, 3) in [-1, 1]
        with self._lock:
            boxes, marks, scores = self._cascade(norm, max(12, round(self.min_face * scale)))
        boxes, marks = boxes / scale, marks / scale
        xywh = np.round(np.stack([boxes[:, 0], boxes[:, 1], boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]],
                                 1)).astype(np.int64).reshape(-1, 4)
        order = np.argsort(-(xywh[:, 2] * xywh[:, 3]), kind="stable")
        return xywh[order], marks[order], scores[order]

    def _pyramid(self, h: int, w: int, min_face: int) -> list[float]:
        """The P-Net scales that find faces of ``min_face`` pixels and more in an h x w image."""
        m = 12.0 / max(min_face, 12)
        scales, side = [], min(h, w) * m
        while side >= 12:
            scales.append(m * self.factor ** len(scales))
            side *= self.factor
        return scales

    def _cascade(self, norm: np.ndarray, min_face: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Boxes (N, 4) x1, y1, x2, y2, landmarks (N, 5, 2) and scores (N,) of faces of ``min_face`` pixels and more
        in a normalised (H, W, 3) image."""
        import cv2

        empty = np.empty((0, 4)), np.empty((0, 5, 2)), np.empty(0)
        h, w = norm.shape[:2]
        # stage 1: P-Net over the pyramid -> candidate boxes (x1, y1, x2, y2), scores, offsets
        found = []
        for s in self._pyramid(h, w, min_face):
            level = cv2.resize(norm, (int(w * s + 1), int(h * s + 1)), interpolation=cv2.INTER_AREA)
            offsets, probs = self.pnet(torch.from_numpy(level).permute(2, 0, 1)[None])  # (1, 4, a, b), (1, 2, a, b)
            ys, xs = np.nonzero(probs[0, 1].numpy() >= self.thresholds[0])
            if not len(ys):
                continue
            score = probs[0, 1].numpy()[ys, xs]
            cells = np.stack([xs, ys], 1).astype(np.float64)
            q1, q2 = np.floor((2 * cells + 1) / s), np.floor((2 * cells + 12) / s)
            cand = np.concatenate([q1, q2], 1)
            reg = offsets[0].numpy()[:, ys, xs].T
            keep = nms(cand, score, 0.5)
            found.append((cand[keep], score[keep], reg[keep]))
        if not found:
            return empty
        boxes, scores, reg = (np.concatenate(parts) for parts in zip(*found, strict=True))
        keep = nms(boxes, scores, 0.7)
        boxes, reg = boxes[keep], reg[keep]
        boxes = _square(boxes + reg * np.tile(boxes[:, 2:] - boxes[:, :2], 2))  # offsets in units of w, h
        # stage 2: R-Net
        offsets, probs = self.rnet(_crops(norm, boxes, 24))
        ok = probs[:, 1].numpy() > self.thresholds[1]
        boxes, scores, reg = boxes[ok], probs[ok, 1].numpy(), offsets[ok].numpy()
        keep = nms(boxes, scores, 0.7)
        if not len(keep):
            return empty
        boxes = _square(_regress(boxes[keep], reg[keep]))
        # stage 3: O-Net, with landmarks
        offsets, lm, probs = self.onet(_crops(norm, boxes, 48))
        ok = probs[:, 1].numpy() > self.thresholds[2]
        boxes, scores, reg, lm = boxes[ok], probs[ok, 1].numpy(), offsets[ok].numpy(), lm[ok].numpy()
        bw, bh = boxes[:, 2:3] - boxes[:, 0:1] + 1, boxes[:, 3:4] - boxes[:, 1:2] + 1
        marks = np.stack([boxes[:, 0:1] + bw * lm[:, :5] - 1, boxes[:, 1:2] + bh * lm[:, 5:] - 1], 2)  # (N, 5, 2)
        boxes = _regress(boxes, reg)
        keep = nms(boxes, scores, 0.7, mode="min")
        return boxes[keep], marks[keep], scores[keep]
