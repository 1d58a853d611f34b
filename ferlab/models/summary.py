"""Model summaries: parameter counts (PyTorch and Keras-style) and FLOPs per image."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ferlab.models.registry import count_params, create_model, get_entry, list_models


def flops_per_image(model: nn.Module, input_size: tuple[int, int] = (48, 48), in_chans: int = 1) -> int:
    """FLOPs (2 x multiply-adds) of one forward pass on one image, counted by torch's FlopCounterMode."""
    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, in_chans, *input_size))
    model.train(was_training)
    return int(counter.get_total_flops())


def model_table(pattern: str = "*") -> list[dict[str, Any]]:
    """One row per registered model: name, source, Keras-style total, trainable, MFLOPs, description."""
    rows = []
    for name in list_models(pattern):
        entry = get_entry(name)
        model = create_model(name)
        rows.append({
            "name": name, "source": entry.source, **count_params(model),
            "mflops": flops_per_image(model) / 1e6, "description": entry.description,
        })
    return rows
