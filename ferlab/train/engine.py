"""``train_one_epoch`` and ``predict_probs``/``evaluate`` as plain functions (as in torchvision's references).

Images stay in memory as one uint8 tensor (N, 1, 48, 48); each batch is gathered,
scaled to [0, 1], augmented on the fly, normalised and fed to the model. The fast
path is channels_last memory layout with bfloat16 autocast.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ferlab.transforms import AugmentConfig, Normalizer, augment, hflip


def autocast(precision: str) -> contextlib.AbstractContextManager:
    """bfloat16 autocast for ``precision='bf16'``; a no-op for fp32."""
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_unit(xb_u8: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) uint8 -> (B, 1, H, W) float in [0, 1]."""
    return xb_u8.float().div_(255.0)


def layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """Put a model input in the chosen memory layout (channels_last is faster on CPU)."""
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def batches(n: int, batch_size: int, g: torch.Generator | None = None) -> Iterator[torch.Tensor]:
    """Index batches over range(n): shuffled with ``g`` when given, else in order."""
    order = torch.randperm(n, generator=g) if g is not None else torch.arange(n)
    for i in range(0, n, batch_size):
        yield order[i : i + batch_size]


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    batch_size: int,
    aug: AugmentConfig,
    normalizer: Normalizer,
    g: torch.Generator,
    label_smoothing: float = 0.0,
    precision: str = "bf16",
    channels_last: bool = True,
    on_step: Callable[[], None] | None = None,
    progress: bool = True,
    desc: str = "train",
) -> dict[str, float]:
    """One pass over (images (N, 1, H, W) uint8, labels (N,) int64); returns mean loss, accuracy, seconds."""
    model.train()
    t0 = time.perf_counter()
    loss_sum, correct, seen = 0.0, 0, 0
    n_batches = (len(images) + batch_size - 1) // batch_size
    bar = tqdm(batches(len(images), batch_size, g), total=n_batches, desc=desc, disable=not progress,
               leave=False, mininterval=1.0, dynamic_ncols=True)
    for idx in bar:
        x = layout(normalizer(augment(to_unit(images[idx]), aug, g)), channels_last)  # (B, 1, H, W)
        y = labels[idx]  # (B,)
        with autocast(precision):
            logits = model(x)  # (B, K)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at batch {seen // batch_size}; lower the learning rate")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if on_step is not None:
            on_step()
        loss_sum += loss.item() * len(y)
        correct += (logits.argmax(1) == y).sum().item()
        seen += len(y)
        bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.4f}", refresh=False)
    bar.close()
    return {"loss": loss_sum / seen, "acc": correct / seen, "seconds": time.perf_counter() - t0}


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    images: torch.Tensor,
    normalizer: Normalizer,
    *,
    batch_size: int = 512,
    precision: str = "bf16",
    channels_last: bool = True,
    tta: bool = False,
    progress: bool = False,
    desc: str = "predict",
) -> torch.Tensor:
    """Logits (N, K) float32 for images (N, 1, H, W) uint8; ``tta`` averages with the mirrored image."""
    model.eval()
    out = []
    n_batches = (len(images) + batch_size - 1) // batch_size
    for idx in tqdm(batches(len(images), batch_size), total=n_batches, desc=desc, disable=not progress, leave=False):
        x = layout(normalizer(to_unit(images[idx])), channels_last)
        with autocast(precision):
            logits = model(x).float()
            if tta:
                logits = (logits + model(hflip(x)).float()) / 2
        out.append(logits)
    return torch.cat(out) if out else torch.empty(0, getattr(model, "num_classes", 7))


def evaluate(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, normalizer: Normalizer, **kw
) -> dict[str, float | np.ndarray]:
    """Loss and accuracy on labelled images, plus the probabilities (N, K)."""
    t0 = time.perf_counter()
    logits = predict_logits(model, images, normalizer, **kw)
    loss = F.cross_entropy(logits, labels).item()
    acc = (logits.argmax(1) == labels).float().mean().item()
    return {"loss": loss, "acc": acc, "probs": logits.softmax(1).numpy(), "seconds": time.perf_counter() - t0}
