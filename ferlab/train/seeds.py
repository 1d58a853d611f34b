"""Every random stream of a training run, derived from its one ``seed`` here and nowhere else.

A resumed run draws exactly what an uninterrupted one would because each stream depends only on the seed, the
epoch and the rank, never on what was drawn before.
"""

from __future__ import annotations

import torch

EPOCH_STRIDE = 1_000_003  # a prime: seed * EPOCH_STRIDE + epoch never collides for epochs below it
RANK_STRIDE = 7_919  # a prime: each DDP rank's dropout stream starts elsewhere


def init_seed(seed: int) -> int:
    """The global torch seed set before the model is built (its initial weights)."""
    return seed


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The random stream of one epoch (shuffling and augmentation), independent of earlier epochs."""
    return torch.Generator().manual_seed(seed * EPOCH_STRIDE + epoch)


def epoch_torch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """The global torch seed of one epoch on one rank: dropout and the like."""
    return seed * EPOCH_STRIDE + epoch + RANK_STRIDE * rank
