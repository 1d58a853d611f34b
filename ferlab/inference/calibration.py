"""Calibrated probabilities: temperature scaling (Guo et al. 2017) and the measures that judge it.

A model's probabilities become ``softmax(z / T)`` with one temperature ``T`` per test-time augmentation mode,
fitted on held-out faces (PublicTest) by minimising the negative log-likelihood. ``T`` is positive, so the
argmax, and every accuracy, is unchanged; only the confidence moves. For an ensemble ``z`` is the log of the mean
of its members' (uncalibrated) probabilities, so its stated accuracies stay those of that mean too.

The shelf stores the fitted temperatures in each manifest entry's ``calibration`` (``bench/calibration.py``
writes them); :func:`temperature_for` reads them back for a TTA mode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ferlab.inference.predict import combine

T_BOUNDS = (0.05, 20.0)  # the temperatures searched; beyond them a model is broken, not miscalibrated
ECE_BINS = 15  # equal-width confidence bins, as in Guo et al. 2017


def log_softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax of (N, K) scores, computed stably in float64."""
    z = np.asarray(z, np.float64)
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def log_probabilities(p: np.ndarray) -> np.ndarray:
    """log p of probabilities (N, K), zeros clamped to 1e-12: an ensemble's scores, with softmax(scores) = p."""
    return np.log(np.maximum(p, 1e-12))


def ensemble_scores(member_logits: list[np.ndarray], weights: list[float] | None = None) -> np.ndarray:
    """An ensemble's scores (N, K) from its members' logits (each (N, K)): the log of the mean of their softmax,
    weighted by ``weights`` (one per member; default equal), as :func:`~ferlab.inference.predict.combine` does."""
    return log_probabilities(combine([scaled_probabilities(z, 1.0) for z in member_logits], weights))


def scaled_probabilities(z: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(z / T) (N, K) float32 for scores z (N, K): logits, or log-probabilities of an ensemble."""
    if not temperature > 0:
        raise ValueError(f"a temperature must be > 0, got {temperature}")
    return np.exp(log_softmax(np.asarray(z, np.float64) / temperature)).astype(np.float32)


def nll(z: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true labels (N,) under softmax(z / T)."""
    lp = log_softmax(np.asarray(z, np.float64) / temperature)  # (N, K)
    return float(-lp[np.arange(len(lp)), np.asarray(labels)].mean())


def fit_temperature(z: np.ndarray, labels: np.ndarray, bounds: tuple[float, float] = T_BOUNDS) -> float:
    """The temperature minimising the NLL of ``labels`` (N,) under softmax(z / T), z (N, K).

    The NLL is convex in 1/T (a log-sum-exp of linear functions minus a linear one), so a golden-section search
    over log T finds the minimum to about 1e-6 relative precision.
    """
    z, labels = np.asarray(z, np.float64), np.asarray(labels)
    if z.ndim != 2 or len(z) != len(labels) or len(z) == 0:
        raise ValueError(f"need scores (N, K) and labels (N,) with N > 0, got {z.shape} and {labels.shape}")
    lo, hi = math.log(bounds[0]), math.log(bounds[1])
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = nll(z, labels, math.exp(a)), nll(z, labels, math.exp(b))
    while hi - lo > 1e-6:
        if fa <= fb:  # the minimum is in [lo, b]
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = nll(z, labels, math.exp(a))
        else:  # in [a, hi]
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = nll(z, labels, math.exp(b))
    return float(math.exp((lo + hi) / 2))


@dataclass(frozen=True)
class Reliability:
    """Per confidence bin: mean confidence, accuracy and count (bins with no face have count 0)."""

    edges: np.ndarray  # (B + 1,)
    confidence: np.ndarray  # (B,)
    accuracy: np.ndarray  # (B,)
    count: np.ndarray  # (B,)

    @property
    def ece(self) -> float:
        """Expected calibration error: the count-weighted mean |accuracy - confidence| over the bins."""
        n = self.count.sum()
        return float((self.count * np.abs(self.accuracy - self.confidence)).sum() / n) if n else 0.0


def reliability(probs: np.ndarray, labels: np.ndarray, n_bins: int = ECE_BINS) -> Reliability:
    """Bin the faces by their top probability (probs (N, K)) into ``n_bins`` equal-width bins over [0, 1]."""
    probs, labels = np.asarray(probs), np.asarray(labels)
    conf = probs.max(1)  # (N,)
    correct = (probs.argmax(1) == labels).astype(np.float64)  # (N,)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)  # bin b holds (e_b, e_b+1]
    count = np.bincount(which, minlength=n_bins).astype(np.float64)
    safe = np.maximum(count, 1)
    return Reliability(edges, np.bincount(which, conf, n_bins) / safe, np.bincount(which, correct, n_bins) / safe,
                       count)


def ece(probs: np.ndarray, labels: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """Expected calibration error of probs (N, K) against labels (N,), with ``n_bins`` equal-width bins."""
    return reliability(probs, labels, n_bins).ece


def temperature_for(calibration: dict[str, Any] | None, tta: str) -> float:
    """The temperature stored for TTA mode ``tta`` in a manifest entry's ``calibration`` (1.0 when none is)."""
    temps = (calibration or {}).get("temperature") or {}
    t = temps.get(tta, 1.0) if isinstance(temps, dict) else temps
    t = float(t)
    if not t > 0:
        raise ValueError(f"a stored temperature must be > 0, got {t} for TTA mode {tta!r}")
    return t
