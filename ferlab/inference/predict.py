"""uint8 face batches -> logits or probabilities, with any test-time augmentation and any ensemble.

The one place where a face batch meets a model: scaled to [0, 1], expanded into the test-time views of
:data:`ferlab.transforms.TTA_MODES`, normalised as the model was trained, put in the model's memory layout and
run under its precision. An ensemble's probabilities are the mean of its members' softmax probabilities, each of
the mean logits over the views (what ``ferlab evaluate`` has always reported). :class:`PixelsToProbabilities` is the
same computation as one module, for the ONNX export.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ferlab.transforms import Normalizer, TTAViews, tta_mode, tta_view_count, tta_views


def autocast(precision: str, device: torch.device | str = "cpu") -> contextlib.AbstractContextManager:
    """bfloat16 autocast on ``device`` for ``precision='bf16'``; a no-op for fp32."""
    if precision == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's parameters (the CPU for a model without any)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``. A CPU tensor bound for a GPU goes through pinned memory without blocking: a copy from
    pageable memory waits for the GPU's queued work, so the CPU could not prepare the next batch meanwhile (the
    pinned buffer is kept until its copy is done)."""
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


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


@torch.no_grad()
def predict_view_logits(
    model: nn.Module,
    images: torch.Tensor,
    normalizer: Normalizer,
    *,
    batch_size: int = 512,
    precision: str = "bf16",
    channels_last: bool = True,
    tta: bool | str = False,
    progress: bool = False,
    desc: str = "predict",
) -> torch.Tensor:
    """Logits (V, N, K) float32 on the CPU of each of the V test-time views of ``tta`` (see
    :data:`ferlab.transforms.TTA_MODES`; V = 1 without TTA) for images (N, 1, H, W) uint8, computed on the
    model's device. The modes' views are nested, so the first views of a larger mode are a smaller mode's."""
    model.eval()
    device = model_device(model)
    out = []
    n_batches = (len(images) + batch_size - 1) // batch_size
    for idx in tqdm(batches(len(images), batch_size), total=n_batches, desc=desc, disable=not progress, leave=False):
        per_view = []
        for view in tta_views(to_unit(images[idx]), tta):  # V x (B, 1, H, W) in [0, 1]
            x = to_device(layout(normalizer(view), channels_last), device)  # (B, 1, H, W)
            with autocast(precision, device):
                per_view.append(model(x).float())  # (B, K) on the device
        out.append(torch.stack(per_view).cpu())  # (V, B, K): one wait for the device a batch
    if not out:
        return torch.empty(tta_view_count(tta, images.shape[1:]), 0, getattr(model, "num_classes", 7))
    return torch.cat(out, dim=1)


def predict_logits(model: nn.Module, images: torch.Tensor, normalizer: Normalizer, **kw) -> torch.Tensor:
    """Logits (N, K) float32 on the CPU for images (N, 1, H, W) uint8: with ``tta``, the mean over the
    test-time views. Keywords as :func:`predict_view_logits`."""
    return predict_view_logits(model, images, normalizer, **kw).mean(0)


def member_weights(weights: Sequence[float] | None, n: int) -> np.ndarray:
    """An ensemble's member weights (n,), summing to 1: ``weights`` normalised, or equal ones for None.

    A weight is how often greedy selection with replacement picked the member (Caruana et al. 2004)."""
    if weights is None:
        return np.full(n, 1.0 / n)
    w = np.asarray(weights, np.float64)
    if w.shape != (n,) or not np.all(np.isfinite(w)) or not np.all(w > 0):
        raise ValueError(f"an ensemble of {n} needs {n} positive, finite member weights, got {list(weights)}")
    return w / w.sum()


def combine(member_probs: Sequence[np.ndarray], weights: Sequence[float] | None = None) -> np.ndarray:
    """An ensemble's probabilities (N, K): the mean of its members' probabilities (each (N, K)), weighted by
    ``weights`` (one per member, any positive scale; default equal)."""
    if weights is None:
        return np.mean(np.stack(member_probs), axis=0).astype(np.float32)
    w = member_weights(weights, len(member_probs))  # (M,)
    return np.tensordot(w, np.stack(member_probs).astype(np.float64), axes=1).astype(np.float32)


class PixelsToProbabilities(nn.Module):
    """(B, 1, H, W) uint8 -> ((B, K) logits, (B, K) probabilities) for one model or an ensemble, with a TTA mode.

    members: (model, normaliser) pairs. One member: logits are the mean over the views, probabilities their
    softmax. Several: probabilities are the mean of the members' probabilities (weighted by ``weights``, default
    equal) and logits their log (so that softmax(logits) = probabilities). ``temperature`` (calibration) divides
    those logits before the softmax. The views run as one batch of V x B images per member.
    """

    def __init__(self, members: Sequence[tuple[nn.Module, Normalizer]], tta: str = "none",
                 input_size: tuple[int, int] = (48, 48), temperature: float = 1.0,
                 weights: Sequence[float] | None = None) -> None:
        super().__init__()
        if not members:
            raise ValueError("no model to run")
        if not temperature > 0:
            raise ValueError(f"a temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.weights = None if weights is None else [float(w) for w in member_weights(weights, len(members))]
        self.models = nn.ModuleList([m.eval() for m, _ in members])
        self.normalizers = [n for _, n in members]
        self.views = TTAViews(tta_mode(tta), input_size)
        self.n_views = tta_view_count(tta_mode(tta), (1, *input_size))

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = pixels.shape[0]
        views = self.views(pixels.float() / 255.0)  # (V * B, 1, H, W), view-major
        member_logits = []
        for model, norm in zip(self.models, self.normalizers, strict=True):
            z = model(norm(views))  # (V * B, K)
            # the mean over the views by slices, not a reshape to (V, B, K): an ONNX Reshape reads a batch of 0
            # as "keep this dimension", and an empty batch then gave a (K, K) answer
            member_logits.append(sum(z[v * b : (v + 1) * b] for v in range(self.n_views)) / self.n_views)  # (B, K)
        if len(member_logits) == 1:
            z = member_logits[0] / self.temperature if self.temperature != 1.0 else member_logits[0]
            return z, z.softmax(-1)
        probs = torch.stack([z.softmax(-1) for z in member_logits])  # (M, B, K)
        if self.weights is None:
            probs = probs.mean(0)  # (B, K)
        else:
            probs = (probs * torch.tensor(self.weights, dtype=probs.dtype).view(-1, 1, 1)).sum(0)  # (B, K)
        if self.temperature == 1.0:
            return probs.clamp_min(1e-12).log(), probs
        z = probs.clamp_min(1e-12).log() / self.temperature  # (B, K)
        return z, z.softmax(-1)
