"""Deletion and insertion curves (Petsiuk et al. 2018, RISE): is a heat map faithful to the model, or only pretty?

Deletion replaces the pixels a map ranks highest first with the baseline and follows the
probability of the target class: a faithful map makes it fall fast (low area under the
curve). Insertion starts from the baseline image and puts the top-ranked pixels back first:
a faithful map makes the probability rise fast (high area). Both are compared with random
pixel orders, so a score says how much better than chance the map ranks pixels:

- ``deletion_gain``  = AUC(deletion, random) - AUC(deletion, map)   (> 0: faithful)
- ``insertion_gain`` = AUC(insertion, map) - AUC(insertion, random) (> 0: faithful)

Everything runs in model-input space and in batches: (steps - 1) x B images per curve.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass
class Faithfulness:
    """Curves (B, S + 1) of the target probability at the pixel fractions ``fractions`` (S + 1,)."""

    fractions: np.ndarray
    deletion: np.ndarray
    insertion: np.ndarray
    deletion_random: np.ndarray
    insertion_random: np.ndarray

    @staticmethod
    def auc(curves: np.ndarray, fractions: np.ndarray) -> np.ndarray:
        """Area under each curve (B,), trapezoid rule over the fraction of pixels (0..1)."""
        return np.trapezoid(curves, fractions, axis=-1)

    def aucs(self) -> dict[str, np.ndarray]:
        """Per-image areas (B,) of the four curves and the two gains."""
        a = {k: self.auc(getattr(self, k), self.fractions)
             for k in ("deletion", "insertion", "deletion_random", "insertion_random")}
        a["deletion_gain"] = a["deletion_random"] - a["deletion"]
        a["insertion_gain"] = a["insertion"] - a["insertion_random"]
        return a

    def summary(self) -> dict[str, float]:
        """Means over the images of the per-image areas and gains (floats, JSON-ready)."""
        return {f"{k}_auc" if "gain" not in k else k: float(v.mean()) for k, v in self.aucs().items()}

    def per_image(self) -> list[dict[str, float]]:
        """One dict of areas and gains per image."""
        a = self.aucs()
        return [{(f"{k}_auc" if "gain" not in k else k): float(v[i]) for k, v in a.items()}
                for i in range(len(self.deletion))]


def ranks_from_heat(heat: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, H, W) heat -> (B, H*W) rank of each pixel (0 = most salient); ties broken at random."""
    flat = heat.flatten(1).double()  # (B, P)
    jitter = torch.rand(flat.shape, generator=generator, dtype=torch.float64) * 1e-9
    order = (flat + jitter).argsort(dim=1, descending=True)  # (B, P) pixel indices, most salient first
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(flat.shape[1]).expand_as(order))
    return ranks


def random_ranks(b: int, p: int, generator: torch.Generator) -> torch.Tensor:
    """(B, P) ranks of independent uniformly random pixel orders."""
    return torch.rand(b, p, generator=generator).argsort(1).argsort(1)


@torch.no_grad()
def _curves(
    model: nn.Module, x: torch.Tensor, target: torch.Tensor, ranks: torch.Tensor, counts: list[int],
    baseline: float, batch_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Deletion and insertion probabilities (B, len(counts)) for pixels ranked by ``ranks`` (B, P)."""
    b, c, h, w = x.shape
    ranks = ranks.to(x.device)
    xs, tg = [], []
    for k in counts:
        keep_top = (ranks < k).view(b, 1, h, w)  # (B, 1, H, W) the k top-ranked pixels
        xs.append(torch.where(keep_top, torch.as_tensor(baseline, dtype=x.dtype), x))  # deletion
        xs.append(torch.where(keep_top, x, torch.as_tensor(baseline, dtype=x.dtype)))  # insertion
        tg += [target, target]
    batch = torch.cat(xs)  # (2 * len(counts) * B, 1, H, W)
    targets = torch.cat(tg)
    probs = torch.cat([
        model(batch[i:i + batch_size]).float().softmax(1).gather(1, targets[i:i + batch_size, None])[:, 0]
        for i in range(0, len(batch), batch_size)
    ]).view(len(counts), 2, b)  # (S', 2, B)
    return probs[:, 0].T.cpu().numpy(), probs[:, 1].T.cpu().numpy()


def deletion_insertion(
    model: nn.Module,
    x: torch.Tensor,
    heat: torch.Tensor,
    target: torch.Tensor,
    *,
    baseline: float = 0.0,
    steps: int = 16,
    random_orders: int = 1,
    seed: int = 0,
    batch_size: int = 64,
) -> Faithfulness:
    """Deletion/insertion curves of ``heat`` (B, H, W) for ``model`` on normalised inputs ``x`` (B, 1, H, W).

    ``steps`` equal fractions of the pixels; ``baseline`` replaces deleted (or not yet inserted) pixels, in
    model-input units; ``random_orders`` random rankings are averaged for the reference curves.
    """
    from ferlab.explain.methods import eval_mode

    if heat.shape[0] != x.shape[0] or heat.shape[-2:] != x.shape[-2:]:
        raise ValueError(f"heat maps {tuple(heat.shape)} do not match inputs {tuple(x.shape)}")
    if steps < 2:
        raise ValueError(f"steps must be at least 2, got {steps}")
    x = x.detach().float()
    target = torch.as_tensor(target, dtype=torch.long).flatten().to(x.device)
    b, p = x.shape[0], x.shape[-1] * x.shape[-2]
    fractions = np.linspace(0.0, 1.0, steps + 1)
    counts = [round(f * p) for f in fractions]
    gen = torch.Generator().manual_seed(seed)
    with eval_mode(model), torch.no_grad():
        # the end points are the same for every order: the image itself and the all-baseline image
        ends_x = torch.cat([x, torch.full_like(x, baseline)])
        ends = model(ends_x).float().softmax(1).gather(1, torch.cat([target, target])[:, None])[:, 0]
        p_img, p_base = ends[:b].cpu().numpy(), ends[b:].cpu().numpy()

        def curves(ranks: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
            d, i = _curves(model, x, target, ranks, counts[1:-1], baseline, batch_size)
            return (np.concatenate([p_img[:, None], d, p_base[:, None]], 1),
                    np.concatenate([p_base[:, None], i, p_img[:, None]], 1))

        dele, ins = curves(ranks_from_heat(heat.detach().cpu(), gen))
        rand = [curves(random_ranks(b, p, gen)) for _ in range(random_orders)]
    return Faithfulness(fractions, dele, ins, np.mean([r[0] for r in rand], 0), np.mean([r[1] for r in rand], 0))
