"""Seeded image corruptions for a robustness benchmark in the spirit of ImageNet-C (Hendrycks & Dietterich 2019).

Each corruption is a small function of a face batch (N, H, W) uint8, a severity from 1 to 5 and a NumPy random
generator, returning a batch of the same shape and dtype. The corruptions stand for what users' photos do to a
FER2013-style face: the detector frames it tighter, looser or off-centre, or tilted; the light is brighter,
darker, flatter or harsher; the camera or the face moves, the lens is out of focus, the sensor is noisy, the file
is a small JPEG or an upscaled thumbnail, and something (a hand, a cup, glasses) hides part of the face.

:func:`corrupt` draws every random parameter from a generator seeded by ``(seed, corruption, severity)``, so one
seed always gives the same benchmark, and each (corruption, severity) cell is independent of which others are
built. The severities are chosen for 48x48 faces (ImageNet-C's are for 224x224 photos).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

SEVERITIES = (1, 2, 3, 4, 5)
DEFAULT_SEED = 0
DEFAULT_FACES = 1000  # the benchmark's seeded sample of a split (see ferlab.robustness)
BORDER = 4  # cv2.BORDER_REFLECT_101: what lies outside a face crop in a photo is more face and background
# (OpenCV is imported where it is used, so that the command-line parser can list the corruptions cheaply)


@dataclass(frozen=True)
class Corruption:
    """A named corruption: ``fn(images (N, H, W) uint8, level, rng) -> (N, H, W) uint8`` with ``level`` the
    severity's parameter from ``levels`` (severity s uses ``levels[s - 1]``)."""

    name: str
    group: str  # framing, light, blur, sensor, occlusion
    levels: tuple[float, ...]
    fn: Callable[[np.ndarray, float, np.random.Generator], np.ndarray]
    description: str


def _warp(images: np.ndarray, matrices: np.ndarray) -> np.ndarray:
    """Apply one 2x3 affine matrix per image (matrices (N, 2, 3)), bilinear, reflected borders."""
    import cv2

    n, h, w = images.shape
    out = np.empty_like(images)
    for i in range(n):
        out[i] = cv2.warpAffine(images[i], matrices[i], (w, h), flags=cv2.INTER_LINEAR, borderMode=BORDER)
    return out


def _about_centre(images: np.ndarray, degrees: np.ndarray, scale: np.ndarray,
                  shift: np.ndarray | None = None) -> np.ndarray:
    """Rotate by ``degrees`` (N,), scale by ``scale`` (N,) about the centre and shift by ``shift`` (N, 2) pixels."""
    import cv2

    n, h, w = images.shape
    centre = ((w - 1) / 2, (h - 1) / 2)
    mats = np.stack([cv2.getRotationMatrix2D(centre, float(d), float(s)) for d, s in zip(degrees, scale, strict=True)])
    if shift is not None:
        mats[:, :, 2] += shift
    return _warp(images, mats)


def zoom_in(images: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """Tighter framing: the face fills ``level`` times more of the crop (its edges are cut off)."""
    n = len(images)
    return _about_centre(images, np.zeros(n), np.full(n, level))


def zoom_out(images: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """Looser framing: the face shrinks to ``1 / level`` of the crop, the rest reflected surroundings."""
    n = len(images)
    return _about_centre(images, np.zeros(n), np.full(n, 1.0 / level))


def shift(images: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """Off-centre framing: moved by ``level`` of the side in a random direction."""
    n, h, _ = images.shape
    angle = rng.uniform(0, 2 * np.pi, n)
    offset = np.stack([np.cos(angle), np.sin(angle)], 1) * level * h  # (N, 2) pixels
    return _about_centre(images, np.zeros(n), np.ones(n), offset)


def rotate(images: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """A tilted head: rotated by ``level`` degrees, clockwise or anticlockwise at random."""
    n = len(images)
    return _about_centre(images, rng.choice([-1.0, 1.0], n) * level, np.ones(n))


def brightness(images: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """Over- or under-exposure: ``level`` x 255 added or subtracted at random, clipped."""
    sign = rng.choice([-1.0, 1.0], len(images))[:, None, None]
    return np.clip(images + sign * level * 255.0, 0, 255).astype(np.uint8)


def contrast(images: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """Flat light: deviations from each face's mean scaled by ``level`` (< 1)."""
    x = images.astype(np.float32)
    mean = x.mean((1, 2), keepdims=True)
    return np.clip((x - mean) * level + mean, 0, 255).astype(np.uint8)


def gamma(images: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """A different tone curve: x^g on [0, 1] with g = ``level`` or 1 / ``level`` at random."""
    g = np.where(rng.random(len(images)) < 0.5, level, 1.0 / level)[:, None, None]
    return np.clip(np.power(images / 255.0, g) * 255.0 + 0.5, 0, 255).astype(np.uint8)


def gaussian_blur(images: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """Out of focus: a Gaussian blur of standard deviation ``level`` pixels."""
    import cv2

    return np.stack([cv2.GaussianBlur(im, (0, 0), level, borderType=BORDER) for im in images])


def motion_blur(images: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """Movement: a line blur ``level`` pixels long at a random angle."""
    import cv2

    size = int(level)
    out = np.empty_like(images)
    for i, angle in enumerate(rng.uniform(0, 180, len(images))):
        kernel = np.zeros((size, size), np.float32)
        kernel[size // 2, :] = 1.0
        rot = cv2.getRotationMatrix2D(((size - 1) / 2, (size - 1) / 2), float(angle), 1.0)
        kernel = cv2.warpAffine(kernel, rot, (size, size))
        out[i] = cv2.filter2D(images[i], -1, kernel / max(kernel.sum(), 1e-6), borderType=BORDER)
    return out


def gaussian_noise(images: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """Sensor noise: Gaussian, standard deviation ``level`` x 255."""
    return np.clip(images + rng.normal(0.0, level * 255.0, images.shape), 0, 255).astype(np.uint8)


def jpeg(images: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """Compression artefacts: encoded as JPEG at quality ``level`` and decoded."""
    import cv2

    out = np.empty_like(images)
    for i, im in enumerate(images):
        ok, buf = cv2.imencode(".jpg", im, [cv2.IMWRITE_JPEG_QUALITY, int(level)])
        if not ok:
            raise RuntimeError("OpenCV could not encode a JPEG")
        out[i] = cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE)
    return out


def low_resolution(images: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """A small face upscaled: reduced to ``level`` pixels a side (area) and enlarged back (bilinear)."""
    import cv2

    _, h, w = images.shape
    side = int(level)
    return np.stack([cv2.resize(cv2.resize(im, (side, side), interpolation=cv2.INTER_AREA), (w, h),
                                interpolation=cv2.INTER_LINEAR) for im in images])


def occlusion(images: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """Something in front of the face: a rectangle of ``level`` of the area (aspect 1:2 to 2:1), of one random
    grey, at a random place that keeps it inside the crop."""
    n, h, w = images.shape
    out = images.copy()
    aspect = np.exp(rng.uniform(np.log(0.5), np.log(2.0), n))
    eh = np.clip(np.round(np.sqrt(level * h * w * aspect)), 1, h).astype(int)
    ew = np.clip(np.round(np.sqrt(level * h * w / aspect)), 1, w).astype(int)
    y0 = (rng.random(n) * (h - eh + 1)).astype(int)
    x0 = (rng.random(n) * (w - ew + 1)).astype(int)
    grey = rng.integers(0, 256, n)
    for i in range(n):
        out[i, y0[i] : y0[i] + eh[i], x0[i] : x0[i] + ew[i]] = grey[i]
    return out


CORRUPTIONS: dict[str, Corruption] = {c.name: c for c in (
    Corruption("zoom_in", "framing", (1.08, 1.16, 1.25, 1.35, 1.5), zoom_in, "tighter framing (zoom factor)"),
    Corruption("zoom_out", "framing", (1.08, 1.16, 1.25, 1.35, 1.5), zoom_out, "looser framing (zoom factor)"),
    Corruption("shift", "framing", (0.04, 0.07, 0.10, 0.13, 0.16), shift, "off-centre (fraction of the side)"),
    Corruption("rotate", "framing", (5, 10, 15, 20, 25), rotate, "tilt (degrees)"),
    Corruption("brightness", "light", (0.1, 0.2, 0.3, 0.4, 0.5), brightness, "exposure (fraction of 255)"),
    Corruption("contrast", "light", (0.7, 0.55, 0.4, 0.3, 0.2), contrast, "contrast kept (factor)"),
    Corruption("gamma", "light", (1.3, 1.6, 2.0, 2.5, 3.0), gamma, "tone curve (gamma)"),
    Corruption("gaussian_blur", "blur", (0.5, 0.8, 1.1, 1.5, 2.0), gaussian_blur, "defocus (sigma, pixels)"),
    Corruption("motion_blur", "blur", (3, 5, 7, 9, 11), motion_blur, "movement (length, pixels)"),
    Corruption("gaussian_noise", "sensor", (0.03, 0.06, 0.09, 0.12, 0.16), gaussian_noise, "noise (sigma / 255)"),
    Corruption("jpeg", "sensor", (30, 20, 15, 10, 7), jpeg, "JPEG quality"),
    Corruption("low_resolution", "sensor", (32, 24, 18, 14, 10), low_resolution, "resolution (pixels a side)"),
    Corruption("occlusion", "occlusion", (0.05, 0.10, 0.15, 0.20, 0.30), occlusion, "area hidden (fraction)"),
)}


def corrupt(images: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
    """Corruption ``name`` at ``severity`` (1-5) of a face batch (N, H, W) or (N, 1, H, W) uint8, seeded by
    ``(seed, name, severity)``; same shape and dtype."""
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; known: {', '.join(CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}, got {severity}")
    x = np.asarray(images)
    if x.dtype != np.uint8 or x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[1] != 1):
        raise ValueError(f"expected faces (N, H, W) or (N, 1, H, W) uint8, got {x.shape} {x.dtype}")
    c = CORRUPTIONS[name]
    index = list(CORRUPTIONS).index(name)
    rng = np.random.default_rng([seed, index, severity])
    out = c.fn(np.ascontiguousarray(x.reshape(-1, *x.shape[-2:])), c.levels[severity - 1], rng)
    return out.reshape(x.shape)
