"""Ensemble selection on the validation split: greedy forward selection (Caruana et al. 2004), with or without
replacement."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Step:
    """One step of the selection: the candidate added and the ensemble's validation accuracy after it."""

    added: int
    members: tuple[int, ...]
    val_acc: float


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of probabilities (N, K) against labels (N,)."""
    return float((probs.argmax(1) == labels).mean())


def greedy_selection(
    val_probs: Sequence[np.ndarray], val_labels: np.ndarray, max_members: int | None = None, *,
    replacement: bool = False,
) -> list[Step]:
    """Grow an ensemble (mean of probabilities) one candidate at a time, each time adding the one that gives the
    highest validation accuracy (ties: the earlier candidate). Only validation data is looked at. Returns every
    step up to the chosen ensemble, which is the last.

    Without replacement each candidate joins at most once and the selection stops when none improves the accuracy
    or ``max_members`` are in. With ``replacement`` (Caruana et al.'s variant) a candidate may join again, which
    raises its weight; the selection takes ``max_members`` steps (default: twice the candidates) whether or not a
    step helps, and keeps the shortest prefix with the highest accuracy.
    """
    if not len(val_probs):
        raise ValueError("no candidates to select from")
    if max_members is not None and max_members < 1:
        raise ValueError(f"max_members must be at least 1, got {max_members}")
    if replacement:
        limit = 2 * len(val_probs) if max_members is None else max_members
    else:
        limit = len(val_probs) if max_members is None else min(max_members, len(val_probs))
    chosen: list[int] = []
    total = np.zeros_like(val_probs[0], dtype=np.float64)  # (N, K), the sum of the chosen members' probabilities
    steps: list[Step] = []
    best = -1.0
    while len(chosen) < limit:
        scores = [(accuracy(total + p, val_labels), i) for i, p in enumerate(val_probs)
                  if replacement or i not in chosen]
        acc, i = max(scores, key=lambda s: (s[0], -s[1]))
        if acc <= best and not replacement:
            break
        chosen.append(i)
        total += val_probs[i]
        best = max(best, acc)
        steps.append(Step(i, tuple(chosen), acc))
    end = next(n for n, s in enumerate(steps) if s.val_acc == best)  # the shortest best prefix
    return steps[:end + 1]
