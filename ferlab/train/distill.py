"""Knowledge distillation: a frozen teacher (one checkpoint or an ensemble) and the soft-target loss.

The student learns from ``(1 - w) * cross-entropy(labels) + w * T^2 * KL(teacher_T || student_T)``, where
``_T`` is a softmax at temperature ``T`` (Hinton et al. 2015) and the teacher's probabilities are the mean of
its members'. The teacher sees the very batch the student sees (augmented and mixed), each member through its
own normalisation, so it need not share the student's preprocessing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ferlab.checkpoint import CheckpointError, load_checkpoint, normalizer_from_meta
from ferlab.train.engine import autocast, layout, model_device


class Teacher(nn.Module):
    """Frozen checkpoints whose mean softmax at temperature ``temperature`` are the soft targets."""

    def __init__(self, specs: Sequence[str], temperature: float, *, precision: str = "bf16",
                 channels_last: bool = True) -> None:
        super().__init__()
        if not specs:
            raise ValueError("a teacher needs at least one checkpoint")
        if temperature <= 0:
            raise ValueError(f"distillation temperature must be > 0, got {temperature}")
        members, normalizers, metas = [], [], []
        for spec in specs:
            model, meta = load_checkpoint(spec)
            members.append(model.requires_grad_(False))
            normalizers.append(normalizer_from_meta(meta))
            metas.append(meta)
        self.members = nn.ModuleList(members).eval()  # never put in training mode: the student's train() skips it
        self.normalizers = normalizers
        self.metas = metas
        self.specs = [str(s) for s in specs]
        self.temperature = temperature
        self.precision = precision
        self.channels_last = channels_last

    def check_compatible(self, class_names: Sequence[str], input_size: Sequence[int]) -> None:
        """Raise :class:`CheckpointError` unless every member predicts these classes from this input size."""
        for spec, meta in zip(self.specs, self.metas, strict=True):
            if list(meta["class_names"]) != list(class_names):
                raise CheckpointError(f"teacher {spec}: its classes {meta['class_names']} are not the "
                                      f"student's {list(class_names)}")
            if list(meta["preprocess"]["input_size"]) != list(input_size):
                raise CheckpointError(f"teacher {spec}: input size {meta['preprocess']['input_size']} is not the "
                                      f"student's {list(input_size)}")

    def protocol_warnings(self, fingerprint: str, split: dict[str, Any]) -> list[str]:
        """Why a member might have seen rows the student validates or tests on (empty when none)."""
        out = []
        keys = ("val_carved", "val_fraction", "split_seed")
        for spec, meta in zip(self.specs, self.metas, strict=True):
            theirs = meta.get("data", {}).get("fingerprint")
            if theirs != fingerprint:
                out.append(f"teacher {spec} was trained on other data (fingerprint {theirs}); "
                           "make sure it never saw this run's val or test images")
            elif split["val_carved"] and any(meta.get("split", {}).get(k) != split[k] for k in keys):
                out.append(f"teacher {spec} carved its val part differently; it may have trained on this run's val")
        return out

    @torch.no_grad()
    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        """Images (B, 1, H, W) in [0, 1] -> soft targets (B, K): the members' mean softmax at the temperature."""
        probs = None
        for model, norm in zip(self.members, self.normalizers, strict=True):
            x = layout(norm(x01), self.channels_last).to(model_device(model))  # (B, 1, H, W)
            with autocast(self.precision, x.device):
                p = (model(x).float() / self.temperature).softmax(1)  # (B, K)
            probs = p if probs is None else probs + p
        return probs / len(self.members)

    def loss(self, student_logits: torch.Tensor, x01: torch.Tensor) -> torch.Tensor:
        """The distillation loss of the student's logits (B, K) on the images (B, 1, H, W) in [0, 1]."""
        targets = self(x01).to(student_logits.device)  # (B, K)
        return distillation_loss(student_logits, targets, self.temperature)


def distillation_loss(student_logits: torch.Tensor, soft_targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(soft_targets || softmax(student_logits / T))``, the batch mean; logits (B, K), targets (B, K)."""
    log_p = F.log_softmax(student_logits.float() / temperature, dim=1)
    return F.kl_div(log_p, soft_targets, reduction="batchmean") * temperature**2
