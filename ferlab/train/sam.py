"""Sharpness-aware minimisation (SAM, Foret et al. 2021) as a small object around any optimiser's step.

SAM takes each step's gradient not at the weights w but at the worst nearby point w + e, with
e = rho * g / ||g|| (g: the gradient at w), and applies the step at w. That costs a second forward and backward
pass per batch. ``adaptive`` (ASAM, Kwon et al. 2021) scales e by |w| per weight, so that rho means the same for
layers of any scale; its rho is then typically ten times larger (e.g. 0.5 against 0.05).

Usage, per batch::

    loss(model).backward()              # g at w
    with sam.perturbed(model):          # weights at w + e, BatchNorm statistics frozen
        optimizer.zero_grad()
        loss(model).backward()          # the gradient at w + e
    optimizer.step()                    # back at w: the step uses the gradient taken at w + e
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

EPS = 1e-12  # keeps e finite when the gradient vanishes


class SharpnessAware:
    """Moves a model's weights to w + e for the second pass of a SAM step and back (see the module docstring)."""

    def __init__(self, rho: float, adaptive: bool = False) -> None:
        if rho <= 0:
            raise ValueError(f"SAM's rho must be > 0, got {rho}")
        self.rho = rho
        self.adaptive = adaptive

    @torch.no_grad()
    def perturbation(self, params: list[nn.Parameter]) -> list[torch.Tensor]:
        """e for each of ``params`` (those with a gradient), from the gradients they hold now."""
        scales = [p.abs() if self.adaptive else None for p in params]  # ASAM's |w|
        grads = [p.grad if t is None else p.grad * t for p, t in zip(params, scales, strict=True)]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
        scale = self.rho / (norm + EPS)
        return [g * scale if t is None else g * t * scale for g, t in zip(grads, scales, strict=True)]

    @contextmanager
    def perturbed(self, model: nn.Module) -> Iterator[None]:
        """Inside: the weights at w + e (e from the gradients the model holds on entry) and BatchNorm's running
        statistics left as they are; on exit the weights are w again, exactly (restored from a copy)."""
        params = [p for p in model.parameters() if p.grad is not None]
        if not params:
            raise RuntimeError("SAM needs the gradients of a first backward pass: call loss.backward() first")
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, e in zip(params, self.perturbation(params), strict=True):
                p.add_(e)
        try:
            with frozen_batchnorm_stats(model):
                yield
        finally:
            with torch.no_grad():
                for p, w in zip(params, saved, strict=True):
                    p.copy_(w)


@contextmanager
def frozen_batchnorm_stats(model: nn.Module) -> Iterator[None]:
    """BatchNorm layers still normalise by the batch's statistics (training mode) but do not update their running
    mean and variance: SAM's second pass sees the same batch again and must not count it twice."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(norms, saved, strict=True):
            m.momentum = momentum
            m.num_batches_tracked.copy_(tracked)
