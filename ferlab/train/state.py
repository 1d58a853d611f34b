"""The resumable state of a training run (RUN_DIR/last.pt): one schema, written and read here only."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn
from torch.optim import Optimizer

from ferlab.checkpoint import CheckpointError, load_state, save_state
from ferlab.train.callbacks import BestCheckpoint, EarlyStopping


@dataclass
class ResumeState:
    """What a run needs to continue after ``epoch`` (0-based) exactly as if it had not stopped."""

    epoch: int
    model: dict[str, Any]
    optimizer: dict[str, Any]
    schedule: dict[str, Any]
    early: dict[str, Any]
    best: dict[str, Any]
    history: list[dict[str, float]]
    stopped_early: bool
    data_fingerprint: str
    ema: dict[str, Any] | None = field(default=None)  # the weight average's state, when the run keeps one

    @classmethod
    def capture(cls, epoch: int, net: nn.Module, optimizer: Optimizer, schedule: Any, early: EarlyStopping,
                best: BestCheckpoint, history: list[dict[str, float]], stopped_early: bool, data_fingerprint: str,
                ema: nn.Module | None = None) -> ResumeState:
        return cls(epoch, net.state_dict(), optimizer.state_dict(), schedule.state_dict(), early.state_dict(),
                   best.state_dict(), history, stopped_early, data_fingerprint,
                   ema.state_dict() if ema is not None else None)

    def restore(self, net: nn.Module, optimizer: Optimizer, schedule: Any, early: EarlyStopping,
                best: BestCheckpoint, ema: nn.Module | None = None) -> None:
        """Load this state into the run's freshly built objects."""
        net.load_state_dict(self.model)
        optimizer.load_state_dict(self.optimizer)
        schedule.load_state_dict(self.schedule)
        early.load_state_dict(self.early)
        best.load_state_dict(self.best)
        if ema is not None:
            if self.ema is None:
                raise CheckpointError("the saved state has no weight average (ema) to resume")
            ema.load_state_dict(self.ema)

    def to_dict(self) -> dict[str, Any]:
        """The dict saved in last.pt (tensors, numbers, strings, lists and dicts only)."""
        out = {"epoch": self.epoch, "model": self.model, "optimizer": self.optimizer, "schedule": self.schedule,
               "early": self.early, "best": self.best, "history": self.history,
               "stopped_early": self.stopped_early, "data_fingerprint": self.data_fingerprint}
        if self.ema is not None:
            out["ema"] = self.ema
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str | Path = "state") -> ResumeState:
        try:
            return cls(d["epoch"], d["model"], d["optimizer"], d["schedule"], d["early"], d["best"],
                       list(d["history"]), d["stopped_early"], d["data_fingerprint"], d.get("ema"))
        except (KeyError, TypeError) as e:
            raise CheckpointError(f"{source}: not a ferlab training state (missing {e})") from None

    def save(self, path: str | Path) -> None:
        save_state(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> ResumeState:
        return cls.from_dict(load_state(path), path)
