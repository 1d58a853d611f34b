"""Inside a CNN: its layers, a layer's feature maps on a face, and the input each filter responds to most.

All forward hooks are registered through :func:`capture`, a context manager that removes them even
when the forward pass raises. :func:`layer_output` stops the forward pass right after the layer
(nothing later runs, so in-place activations downstream cannot overwrite the captured map).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ferlab.explain.methods import eval_mode
from ferlab.transforms import Normalizer


# ----------------------------------------------------------------------------- hooks
class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the wanted layer has run."""


@contextmanager
def capture(model: nn.Module, names: Sequence[str], *, stop_after: str | None = None,
            clone: bool = True) -> Iterator[dict[str, torch.Tensor]]:
    """Record the outputs of the named sub-modules during forward passes inside the block.

    ``stop_after``: a name whose hook ends the forward pass (caught here). ``clone`` copies each output
    (keeping its graph) so later in-place operations cannot change it. The hooks are always removed.
    """
    modules = dict(model.named_modules())
    outputs: dict[str, torch.Tensor] = {}
    handles = []

    def make_hook(name: str):
        def hook(_module: nn.Module, _inputs, output) -> None:
            if isinstance(output, torch.Tensor):
                outputs[name] = output.clone() if clone else output
            if name == stop_after:
                raise _StopForward

        return hook

    try:
        for name in names:
            handles.append(modules[name].register_forward_hook(make_hook(name)))
        try:
            yield outputs
        except _StopForward:
            pass
    finally:
        for h in handles:
            h.remove()


# ----------------------------------------------------------------------------- layers
@dataclass
class LayerInfo:
    """A named sub-module whose output is a 4D map: name, type, output shape (without batch), channels."""

    name: str
    type: str
    shape: tuple[int, ...]
    channels: int

    def to_dict(self) -> dict:
        return asdict(self)


def list_layers(model: nn.Module, input_size: tuple[int, int] | None = None, in_chans: int | None = None
                ) -> list[LayerInfo]:
    """The named modules that output (B, C, H, W) maps, in execution order (one dry forward pass, hooked)."""
    size = tuple(input_size or getattr(model, "input_size", (48, 48)))
    chans = in_chans or getattr(model, "in_chans", 1)
    names = [n for n, _ in model.named_modules() if n]
    types = {n: type(m).__name__ for n, m in model.named_modules()}
    order: list[str] = []
    with eval_mode(model), torch.no_grad(), capture(model, names, clone=False) as outs:
        # dict insertion order is the order the hooks fired (a module's output comes after its children's)
        model(torch.zeros(1, chans, *size))
        order = list(outs)
        shapes = {n: tuple(outs[n].shape[1:]) for n in order}
    return [LayerInfo(n, types[n], shapes[n], shapes[n][0]) for n in order if len(shapes[n]) == 3]


def check_layer(model: nn.Module, name: str, layers: list[LayerInfo] | None = None) -> LayerInfo:
    """The :class:`LayerInfo` of ``name``; ValueError listing some valid names when it is not a 4D-output layer."""
    layers = layers if layers is not None else list_layers(model)
    for info in layers:
        if info.name == name:
            return info
    valid = [i.name for i in layers]
    shown = ", ".join(valid[:6] + (["...", *valid[-3:]] if len(valid) > 9 else valid[6:]))
    what = "has no 4D feature map output" if name in dict(model.named_modules()) else "is not a layer of this model"
    close = difflib.get_close_matches(name, valid, n=3)
    hint = f" (did you mean {' or '.join(close)}?)" if close else ""
    raise ValueError(f"layer {name!r} {what}{hint}; valid layers ({len(valid)}): {shown} (see `ferlab layers MODEL`)")


def layer_output(model: nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    """Output (B, C, h, w) of ``layer`` for model inputs ``x`` (B, 1, H, W); the forward pass stops after it."""
    with capture(model, [layer], stop_after=layer) as outs:
        model(x)
    if layer not in outs:
        raise ValueError(f"layer {layer!r} did not run in the forward pass")
    return outs[layer]


def layer_input(model: nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    """Input (B, C, h, w) of ``layer`` for model inputs ``x`` (B, 1, H, W); the forward pass stops before it runs
    (so an in-place layer cannot change it)."""
    got: dict[str, torch.Tensor] = {}

    def pre_hook(_module: nn.Module, inputs) -> None:
        got["x"] = inputs[0].clone()
        raise _StopForward

    handle = dict(model.named_modules())[layer].register_forward_pre_hook(pre_hook)
    try:
        model(x)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if "x" not in got:
        raise ValueError(f"layer {layer!r} did not run in the forward pass")
    return got["x"]


@torch.no_grad()
def feature_maps(model: nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    """A layer's outputs (C, h, w) on one normalised face ``x`` (1, 1, H, W)."""
    check_layer(model, layer)
    with eval_mode(model), torch.no_grad():
        return layer_output(model, layer, x[:1].float())[0].detach().cpu()


# ----------------------------------------------------------------------------- gradient ascent
def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Periodic (circular-padded) Gaussian blur of (B, 1, H, W) images."""
    r = max(1, math.ceil(2.5 * sigma))
    t = torch.arange(-r, r + 1, dtype=x.dtype)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    x = F.pad(x, (r, r, 0, 0), mode="circular")
    x = F.conv2d(x, k.view(1, 1, 1, -1))  # blur rows
    x = F.pad(x, (0, 0, r, r), mode="circular")
    return F.conv2d(x, k.view(1, 1, -1, 1))  # then columns


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Sum over the batch of each image's mean absolute difference of neighbouring pixels (a frequency penalty)."""
    dh = (x[..., 1:, :] - x[..., :-1, :]).abs().mean(dim=(1, 2, 3))
    dw = (x[..., :, 1:] - x[..., :, :-1]).abs().mean(dim=(1, 2, 3))
    return (dh + dw).sum()


LEAK = 0.05


@dataclass
class AscentConfig:
    """Gradient ascent settings. Pixels live in [0, 1]; ``lr`` is the step per pixel for a unit-RMS gradient."""

    steps: int = 96
    lr: float = 0.05
    # start: grey 128/255 plus uniform noise U(0, start_noise). The reports used U(0, 20/255); a little more
    # noise wakes filters that are silent on an almost flat image (which would get no gradient at all)
    start_noise: float = 0.15
    jitter: int = 2  # random roll of up to this many pixels each step
    blur_every: int = 4  # periodic Gaussian blur every N steps (0: never)
    blur_sigma: float = 0.5
    tv: float = 0.3  # weight of the total-variation gradient relative to the activation gradient
    decay: float = 0.002  # pull towards grey each step
    seed: int = 0


@dataclass
class FilterImages:
    """Gradient-ascent results: images (F, H, W) in [0, 1] and each filter's mean activation before/after."""

    channels: list[int]
    images: torch.Tensor
    start_activation: torch.Tensor
    final_activation: torch.Tensor


def _channel_means(model: nn.Module, layer: str, x: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    """Mean rectified activation (F,) of filter ``channels[f]`` of ``layer`` on image f of inputs ``x`` (F, 1, H, W).

    Rectified as Keras' ``Conv2D(activation="relu")`` outputs are: the same for ReLU and block outputs, and
    for pre-activation conv/BatchNorm outputs it avoids the trivial optimum of a linear map (a uniformly black
    or white image). The rectifier leaks (slope ``LEAK``) so that a filter silent on the start image still
    gets a gradient; on a ReLU layer, whose output has no gradient where it is 0, it rectifies the layer's input
    (where positive, the ReLU's output itself).
    """
    if isinstance(dict(model.named_modules())[layer], nn.ReLU | nn.ReLU6):
        out = layer_input(model, layer, x)  # (F, C, h, w) pre-activation
    else:
        out = layer_output(model, layer, x)  # (F, C, h, w)
    return F.leaky_relu(out[torch.arange(len(channels)), channels], LEAK).mean(dim=(1, 2))  # (F,)


def visualize_filters(
    model: nn.Module,
    layer: str,
    normalizer: Normalizer,
    channels: Sequence[int] | None = None,
    config: AscentConfig | None = None,
) -> FilterImages:
    """For each filter of ``layer`` the input (48x48 grey, [0, 1] pixels) maximising its mean activation.

    All filters are optimised at once as one batch: image f, (F, 1, 48, 48), maximises filter f.
    Each step: jitter (random roll), normalised-gradient ascent on the activation minus a total-variation
    term, a small pull to grey, clipping to [0, 1], and every few steps a periodic Gaussian blur.
    """
    cfg = config or AscentConfig()
    info = check_layer(model, layer)
    chans = list(range(info.channels)) if channels is None else [int(c) for c in channels]
    bad = [c for c in chans if not 0 <= c < info.channels]
    if bad or not chans:
        raise ValueError(f"layer {layer!r} has channels 0..{info.channels - 1}; got {bad or 'none'}")
    idx = torch.tensor(chans)
    gen = torch.Generator().manual_seed(cfg.seed)
    h, w = info_input_size(model)
    x = 128 / 255 + cfg.start_noise * torch.rand(len(chans), 1, h, w, generator=gen)  # (F, 1, H, W) grey noise
    with eval_mode(model):
        with torch.no_grad():
            start = _channel_means(model, layer, normalizer(x), idx)
        for step in range(cfg.steps):
            dy, dx = (torch.randint(-cfg.jitter, cfg.jitter + 1, (2,), generator=gen).tolist()
                      if cfg.jitter else (0, 0))
            xv = x.clone().requires_grad_(True)
            act = _channel_means(model, layer, normalizer(torch.roll(xv, (dy, dx), dims=(2, 3))), idx)  # (F,)
            (g_act,) = torch.autograd.grad(act.sum(), xv)
            (g_tv,) = torch.autograd.grad(total_variation(xv), xv) if cfg.tv else (torch.zeros_like(xv),)
            with torch.no_grad():
                g = _unit_rms(g_act) - cfg.tv * _unit_rms(g_tv)  # (F, 1, H, W)
                x = (x + cfg.lr * g).clamp(0, 1)
                x = 0.5 + (x - 0.5) * (1 - cfg.decay)
                if cfg.blur_every and (step + 1) % cfg.blur_every == 0:
                    x = gaussian_blur(x, cfg.blur_sigma)
        with torch.no_grad():
            final = _channel_means(model, layer, normalizer(x), idx)
    return FilterImages(chans, x[:, 0].detach(), start.detach(), final.detach())


def _unit_rms(g: torch.Tensor) -> torch.Tensor:
    """Scale each image's gradient (B, 1, H, W) to unit root-mean-square."""
    return g / g.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt().clamp_min(1e-12)


def info_input_size(model: nn.Module) -> tuple[int, int]:
    """(H, W) the model expects (48x48 by default)."""
    return tuple(getattr(model, "input_size", (48, 48)))  # type: ignore[return-value]


def stretch(img: torch.Tensor, low: float = 1.0, high: float = 99.0) -> torch.Tensor:
    """Percentile contrast stretch of one (H, W) image to [0, 1], for display."""
    lo, hi = torch.quantile(img.flatten().float(), torch.tensor([low / 100, high / 100]))
    return ((img - lo) / (hi - lo).clamp_min(1e-8)).clamp(0, 1)
