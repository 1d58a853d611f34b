"""Optimisers and learning-rate schedules, built by name from the training config."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ferlab.train.config import TrainConfig


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    # No weight decay on biases and norm parameters (1-D tensors).
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


OPTIMIZERS: dict[str, Callable[[list[dict], TrainConfig], torch.optim.Optimizer]] = {
    "sgd": lambda g, c: torch.optim.SGD(g, lr=c.lr, momentum=c.momentum, nesterov=c.momentum > 0),
    "adam": lambda g, c: torch.optim.Adam(g, lr=c.lr),
    "adamw": lambda g, c: torch.optim.AdamW(g, lr=c.lr),
}


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimiser named by ``cfg.optimizer`` (SGD is Nesterov whenever momentum > 0)."""
    return OPTIMIZERS[cfg.optimizer](_param_groups(model, cfg.weight_decay), cfg)


class Schedule:
    """A learning-rate schedule stepped per batch (onecycle, cosine) or per epoch on a metric (plateau)."""

    def __init__(self, scheduler: object | None, per_batch: bool) -> None:
        self.scheduler = scheduler
        self.per_batch = per_batch

    def step_batch(self) -> None:
        if self.scheduler is not None and self.per_batch:
            self.scheduler.step()

    def step_epoch(self, metric: float) -> None:
        if self.scheduler is not None and not self.per_batch:
            self.scheduler.step(metric)

    def state_dict(self) -> dict:
        return self.scheduler.state_dict() if self.scheduler is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state)


def _onecycle(opt: torch.optim.Optimizer, cfg: TrainConfig, steps: int) -> Schedule:
    pct = min(0.3, max(cfg.warmup_epochs / max(cfg.epochs, 1), 0.01))
    s = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps, pct_start=pct)
    return Schedule(s, per_batch=True)


def _cosine(opt: torch.optim.Optimizer, cfg: TrainConfig, steps: int) -> Schedule:
    warm = min(int(steps * cfg.warmup_epochs / max(cfg.epochs, 1)), int(0.3 * steps))  # as one-cycle: <= 30%
    cos = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps - warm, 1))
    if warm == 0:
        return Schedule(cos, per_batch=True)
    lin = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.01, total_iters=warm)
    return Schedule(torch.optim.lr_scheduler.SequentialLR(opt, [lin, cos], milestones=[warm]), per_batch=True)


def _plateau(opt: torch.optim.Optimizer, cfg: TrainConfig, steps: int) -> Schedule:
    mode = "max" if cfg.monitor.endswith("acc") else "min"
    s = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode=mode, factor=cfg.plateau_factor,
                                                   patience=cfg.plateau_patience)
    return Schedule(s, per_batch=False)


SCHEDULES: dict[str, Callable[[torch.optim.Optimizer, TrainConfig, int], Schedule]] = {
    "onecycle": _onecycle,
    "cosine": _cosine,
    "plateau": _plateau,
    "none": lambda opt, cfg, steps: Schedule(None, per_batch=True),
}


def build_schedule(opt: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> Schedule:
    """The schedule named by ``cfg.schedule`` over ``cfg.epochs * steps_per_epoch`` steps."""
    return SCHEDULES[cfg.schedule](opt, cfg, cfg.epochs * steps_per_epoch)
