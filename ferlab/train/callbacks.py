"""Early stopping and best-checkpoint keeping as small stateful objects (as in Lightning).

Each has a pure decision method (``improves``) and ``state_dict``/``load_state_dict``
so a resumed run takes exactly the decisions an uninterrupted one would.
"""

from __future__ import annotations

import math


class MetricTracker:
    """Tracks the best value of a monitored metric."""

    def __init__(self, mode: str = "max", min_delta: float = 0.0) -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        self.mode = mode
        self.min_delta = min_delta
        self.best: float = -math.inf if mode == "max" else math.inf
        self.best_epoch: int = -1

    def improves(self, value: float) -> bool:
        """Whether ``value`` beats the best so far by more than min_delta (no state change)."""
        if math.isnan(value):
            return False
        if self.mode == "max":
            return value > self.best + self.min_delta
        return value < self.best - self.min_delta

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)


class EarlyStopping(MetricTracker):
    """Stop when the metric has not improved for ``patience`` epochs (patience 0: never stop)."""

    def __init__(self, patience: int, mode: str = "max", min_delta: float = 0.0) -> None:
        super().__init__(mode, min_delta)
        self.patience = patience
        self.wait = 0

    def update(self, value: float, epoch: int) -> bool:
        """Record the epoch's value; True when training should stop."""
        if self.improves(value):
            self.best, self.best_epoch, self.wait = value, epoch, 0
        else:
            self.wait += 1
        return self.patience > 0 and self.wait >= self.patience


class BestCheckpoint(MetricTracker):
    """Decides when the current weights are the best so far and must be saved."""

    def update(self, value: float, epoch: int) -> bool:
        """Record the epoch's value; True when this epoch's weights should be kept as best."""
        if self.improves(value):
            self.best, self.best_epoch = value, epoch
            return True
        return False
