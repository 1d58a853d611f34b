"""``train_one_epoch`` and ``evaluate`` as plain functions (as in torchvision's references); prediction itself
is the inference layer's (:mod:`ferlab.inference.predict`).

Images stay in memory as one uint8 tensor (N, 1, 48, 48); each batch is gathered,
scaled to [0, 1], augmented on the fly (on the CPU), normalised, moved to the model's
device and fed to the model. The fast path is channels_last memory layout with
bfloat16 autocast, on the CPU and on CUDA alike. Under DistributedDataParallel each
rank trains on its slice of every global batch (see :func:`epoch_batches`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ferlab.inference.predict import autocast, layout, model_device, predict_logits, to_device, to_unit
from ferlab.transforms import AugmentConfig, Normalizer, augment, mix_batch, resize

SYNC_STEPS = 50  # on a GPU, batches between reads of the running loss (each read waits for the GPU)

if TYPE_CHECKING:
    from ferlab.train.distill import SoftTargets, Teacher
    from ferlab.train.sam import SharpnessAware


def epoch_batches(
    n: int, batch_size: int, g: torch.Generator, rank: int = 0, world_size: int = 1
) -> list[torch.Tensor]:
    """This rank's index batches of one shuffled epoch over range(n).

    Every rank draws the same permutation from ``g`` and cuts it into the same global batches of
    ``batch_size``; rank r takes the r-th of ``world_size`` equal slices of each. With several ranks the
    permutation is first cut to a multiple of ``world_size`` (at most world_size - 1 images skipped, different
    ones each epoch), so all slices of a batch have equal size and DDP's gradient average is the global
    batch's mean gradient. A last batch of a single image per rank is dropped (BatchNorm cannot train on one
    sample; a different image each epoch). Otherwise, with one rank, this is exactly :func:`batches`.
    """
    if world_size > 1 and batch_size % world_size:
        raise ValueError(f"batch_size {batch_size} (the global batch) must be divisible by the {world_size} processes")
    order = torch.randperm(n, generator=g)
    order = order[: n - n % world_size]
    local = []
    for i in range(0, len(order), batch_size):
        b = order[i : i + batch_size]
        k = len(b) // world_size
        local.append(b[rank * k : (rank + 1) * k])
    if len(local) > 1 and len(local[-1]) < 2:
        local.pop()
    return local


def steps_per_epoch(n: int, batch_size: int, world_size: int = 1) -> int:
    """The number of optimiser steps in one epoch of :func:`epoch_batches`."""
    m = n - n % world_size
    steps = math.ceil(m / batch_size)
    return steps - 1 if steps > 1 and (m - (steps - 1) * batch_size) // world_size < 2 else steps


def batch_loss(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    y_mix: torch.Tensor,
    lam: float,
    *,
    precision: str,
    label_smoothing: float,
    teacher: Teacher | SoftTargets | None,
    distill_weight: float,
    x01: torch.Tensor,
    idx: torch.Tensor,
    perm: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(the training loss of one batch, its logits (b, K)) at the model's current weights: cross-entropy against
    ``y`` (b,) or (b, K), mixed with the partners' ``y_mix`` by ``lam``, plus a teacher's distillation term (see
    :func:`train_one_epoch`)."""
    with autocast(precision, x.device):
        logits = model(x)  # (b, K)
    loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
    if lam < 1.0:
        loss = lam * loss + (1.0 - lam) * F.cross_entropy(logits.float(), y_mix, label_smoothing=label_smoothing)
    if teacher is not None:
        loss = (1.0 - distill_weight) * loss + distill_weight * teacher.loss(logits, x01=x01, idx=idx, perm=perm,
                                                                             lam=lam)
    return loss, logits


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
    size: int | None = None,
    mixup: float = 0.0,
    cutmix: float = 0.0,
    teacher: Teacher | SoftTargets | None = None,
    distill_weight: float = 0.5,
    sam: SharpnessAware | None = None,
    precision: str = "bf16",
    channels_last: bool = True,
    on_step: Callable[[], None] | None = None,
    sample_labels: bool = False,
    progress: bool = True,
    desc: str = "train",
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, float]:
    """One pass over (images (N, 1, H, W) uint8, labels (N,) int64) on the model's device.

    ``labels`` may instead be (N, K) float label distributions (FER+ votes): they are soft cross-entropy targets, or,
    with ``sample_labels``, each batch draws a hard label per image from them; accuracy counts their argmax.

    ``size`` trains on images resized to size x size after augmentation (progressive resizing; None or their own
    size: as they are). ``batch_size`` is the global batch; with ``world_size`` > 1 (a DDP-wrapped model) this rank
    trains on its slice of each batch, augmented from its own random stream. ``mixup`` / ``cutmix`` (Beta alphas, 0:
    off) mix each batch with itself after augmentation (see :func:`ferlab.transforms.mix_batch`); the accuracy then
    counts each label with its mixing weight. With a ``teacher`` the loss is ``(1 - distill_weight)`` times the
    cross-entropy plus ``distill_weight`` times the teacher's distillation loss on the same (augmented, mixed)
    batch, or, for precomputed :class:`~ferlab.train.distill.SoftTargets` (offline distillation), on the soft
    targets of the batch's images mixed with the same weights; the reported loss is that sum. With ``sam`` each
    step takes its gradient at the worst nearby weights (sharpness-aware minimisation: a second forward and backward
    pass per batch; the reported loss and accuracy are the first pass's). Returns this rank's
    mean loss, accuracy, number of images ``n`` and seconds.
    """
    model.train()
    device = model_device(model)
    t0 = time.perf_counter()
    # sums kept on the device: on a GPU reading a value waits for all queued work, so it is read every
    # SYNC_STEPS batches (the loss checked, the progress bar updated); on the CPU after every batch
    check_every = 1 if device.type == "cpu" else SYNC_STEPS
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.float64, device=device)
    finite = torch.ones((), dtype=torch.bool, device=device)
    seen = 0
    local_batches = epoch_batches(len(images), batch_size, g, rank, world_size)
    # one rank: augmentation continues g's stream (as always); several: each rank its own stream
    aug_g = g if world_size == 1 else torch.Generator().manual_seed(int(torch.randint(2**62, (1,), generator=g)) + rank)
    bar = tqdm(local_batches, desc=desc, disable=not progress, leave=False, mininterval=1.0, dynamic_ncols=True)
    for step, idx in enumerate(bar):
        y = labels[idx]  # (b,) class ids or (b, K) distributions
        if y.ndim == 2 and sample_labels:
            y = torch.multinomial(y.cpu(), 1, generator=aug_g).squeeze(1).to(y.device)  # (b,) from each image's votes
        x01 = augment(to_unit(images[idx]), aug, aug_g)  # (b, 1, H, W) in [0, 1]
        if size is not None:
            x01 = resize(x01, size)  # (b, 1, size, size)
        x01, perm, lam = mix_batch(x01, mixup, cutmix, aug_g)  # perm (b,): each image's partner (None: unmixed)
        y_mix = y if perm is None else y[perm]  # (b,) the partners' labels
        x = layout(normalizer(x01), channels_last)  # (b, 1, H, W)
        x, y, y_mix = to_device(x, device), to_device(y, device), to_device(y_mix, device)
        forward = partial(batch_loss, model, x, y, y_mix, lam, precision=precision, label_smoothing=label_smoothing,
                          teacher=teacher, distill_weight=distill_weight, x01=x01, idx=idx, perm=perm)
        loss, logits = forward()
        finite &= torch.isfinite(loss.detach())
        if (step + 1) % check_every == 0 and not finite:
            what = (f"loss is {loss.item()} at batch {step}" if check_every == 1
                    else f"loss is not finite at one of batches {step + 1 - check_every}-{step}")
            raise FloatingPointError(f"{what}; lower the learning rate")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if sam is not None:  # SAM: the gradient again, at the worst weights nearby; the step starts from these
            with sam.perturbed(model):
                optimizer.zero_grad(set_to_none=True)
                forward()[0].backward()
        optimizer.step()
        if on_step is not None:
            on_step()
        loss_sum += loss.detach() * len(y)
        pred = logits.argmax(1)
        y_top, y_mix_top = (y, y_mix) if y.ndim == 1 else (y.argmax(1), y_mix.argmax(1))
        correct += lam * (pred == y_top).sum() + (1.0 - lam) * (pred == y_mix_top).sum()
        seen += len(y)
        if progress and (step + 1) % check_every == 0:
            bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", acc=f"{correct.item() / seen:.4f}", refresh=False)
    bar.close()
    if not finite:
        raise FloatingPointError(f"loss is not finite in the last {check_every} batches; lower the learning rate")
    return {"loss": loss_sum.item() / seen, "acc": correct.item() / seen, "n": seen,
            "seconds": time.perf_counter() - t0}


def evaluate(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, normalizer: Normalizer, **kw
) -> dict[str, float | np.ndarray]:
    """Loss and accuracy on labelled images (``n`` of them), plus the probabilities (N, K)."""
    t0 = time.perf_counter()
    logits = predict_logits(model, images, normalizer, **kw)
    loss = F.cross_entropy(logits, labels).item()
    acc = (logits.argmax(1) == labels).float().mean().item()
    return {"loss": loss, "acc": acc, "n": len(labels), "probs": logits.softmax(1).numpy(),
            "seconds": time.perf_counter() - t0}
