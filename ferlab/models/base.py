"""The base class every ferlab model derives from."""

from __future__ import annotations

import torch
from torch import nn


class FerModel(nn.Module):
    """A classifier of (B, in_chans, 48, 48) faces into ``num_classes`` logits.

    Subclasses implement :meth:`forward_features` (the stable hook point for
    explanation code: for CNNs the last convolutional feature map, (B, C, H, W);
    for MLPs the last hidden layer, (B, D)) and :meth:`forward_head` (features to
    logits, (B, num_classes)).
    """

    num_classes: int = 7
    in_chans: int = 1
    input_size: tuple[int, int] = (48, 48)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C, H, W) float -> (B, num_classes) logits
        return self.forward_head(self.forward_features(x))
