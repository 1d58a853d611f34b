"""Fully connected models: the generic :class:`MLP`, the reports' DNNs, and parameter-matched MLPs.

Also home of the dense building blocks shared with :mod:`ferlab.models.reports`
(:func:`make_act`, :func:`keras_bn`, :func:`dense_stack`, :func:`keras_init_`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import nn

from ferlab.models.base import FerModel
from ferlab.models.registry import count_params, create_model, register_model

ActSpec = str | Callable[[], nn.Module]

# Keras' LeakyReLU() defaults to alpha=0.3 (PyTorch's to 0.01); the reports use Keras' default.
KERAS_LEAKY_ALPHA = 0.3

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": lambda: nn.LeakyReLU(KERAS_LEAKY_ALPHA),
    "elu": nn.ELU,
    "selu": nn.SELU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}


def make_act(act: ActSpec) -> nn.Module:
    """A fresh activation module from a name (``"relu"``, ``"leaky_relu"``, ...) or a module factory."""
    if callable(act):
        return act()
    try:
        return _ACTIVATIONS[act]()
    except KeyError:
        raise ValueError(f"unknown activation {act!r}; known: {', '.join(_ACTIVATIONS)}") from None


def keras_bn(num_features: int, dims: Literal[1, 2] = 1) -> nn.Module:
    """BatchNorm with Keras' defaults (epsilon 1e-3, moving-average momentum 0.99 = PyTorch 0.01)."""
    cls = nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d
    return cls(num_features, eps=1e-3, momentum=0.01)


def keras_init_(module: nn.Module) -> nn.Module:
    """Keras' default initialisation in place: Glorot-uniform kernels, zero biases (BatchNorm: 1 and 0)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return module


def _per_layer(value: float | Sequence[float], n: int, what: str) -> list[float]:
    if isinstance(value, (int, float)):
        return [float(value)] * n
    values = [float(v) for v in value]
    if len(values) != n:
        raise ValueError(f"{what}: expected {n} values (one per hidden layer), got {len(values)}")
    return values


def dense_stack(
    in_features: int,
    widths: Sequence[int],
    *,
    act: ActSpec = "relu",
    bn: bool = False,
    dropout: float | Sequence[float] = 0.0,
    in_dropout: float = 0.0,
) -> nn.Sequential:
    """Hidden dense layers, Keras order: [Dropout(in_dropout)] then, per width, Linear [-> BN] -> act [-> Dropout].

    ``dropout`` is one rate for every layer or one rate per layer (0 = no Dropout
    module). The output Linear to the classes is not included.
    """
    drops = _per_layer(dropout, len(widths), "dropout")
    layers: list[nn.Module] = []
    if in_dropout > 0:
        layers.append(nn.Dropout(in_dropout))
    d = in_features
    for w, p in zip(widths, drops, strict=True):
        layers.append(nn.Linear(d, w))  # (B, d) -> (B, w)
        if bn:
            layers.append(keras_bn(w, 1))
        layers.append(make_act(act))
        if p > 0:
            layers.append(nn.Dropout(p))
        d = w
    return nn.Sequential(*layers)


class MLP(FerModel):
    """Flatten -> hidden dense layers (``features``) -> Linear to the classes (``head``).

    ``forward_features`` returns the last hidden activation (B, D) (the flattened
    input if there is no hidden layer); ``forward_head`` is the last Linear.
    """

    def __init__(
        self,
        hidden: Sequence[int],
        num_classes: int = 7,
        in_chans: int = 1,
        input_size: tuple[int, int] = (48, 48),
        *,
        act: ActSpec = "relu",
        bn: bool = False,
        dropout: float | Sequence[float] = 0.0,
        in_dropout: float = 0.0,
        init: Literal["torch", "keras"] = "torch",
    ) -> None:
        super().__init__()
        self.num_classes, self.in_chans, self.input_size = num_classes, in_chans, tuple(input_size)
        self.hidden = [int(w) for w in hidden]
        in_features = in_chans * input_size[0] * input_size[1]
        self.flatten = nn.Flatten()
        self.features = dense_stack(in_features, self.hidden, act=act, bn=bn, dropout=dropout, in_dropout=in_dropout)
        self.head = nn.Linear(self.hidden[-1] if self.hidden else in_features, num_classes)
        if init == "keras":
            keras_init_(self)
        elif init != "torch":
            raise ValueError(f"init must be 'torch' or 'keras', got {init!r}")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C, H, W) -> (B, C*H*W) -> (B, hidden[-1])
        return self.features(self.flatten(x))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, hidden[-1]) -> (B, num_classes)
        return self.head(x)


def mlp_param_count(in_features: int, hidden: Sequence[int], num_classes: int = 7, bn: bool = False) -> int:
    """Trainable parameters of an :class:`MLP` (weights + biases, + 2 per BatchNorm unit)."""
    total, d = 0, in_features
    for w in list(hidden) + [num_classes]:
        total += d * w + w
        d = w
    return total + (2 * sum(hidden) if bn else 0)


def matched_mlp(
    target_params: int,
    depth: int = 3,
    num_classes: int = 7,
    in_chans: int = 1,
    input_size: tuple[int, int] = (48, 48),
    tol: float = 0.01,
    **kw,
) -> MLP:
    """A plain MLP of ``depth`` equal-width hidden layers with ``target_params`` trainable parameters (within ``tol``).

    The count is ``(depth-1) w^2 + (D + depth + K [+ 2 depth if bn]) w + K - target`` for
    input size D and K classes; the width is the rounded root of that quadratic,
    refined over its neighbours. ``kw`` goes to :class:`MLP` (act, bn, dropout, init).
    Raises ValueError when no width gets within ``tol`` (e.g. a target below the
    1-unit net, or a small target whose width steps are coarser than ``tol``).
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    target = int(target_params)
    d_in = in_chans * input_size[0] * input_size[1]
    bn = bool(kw.get("bn", False))

    def count(w: int) -> int:
        return mlp_param_count(d_in, [w] * depth, num_classes, bn)

    smallest = count(1)
    if target < smallest * (1 - tol):
        raise ValueError(
            f"target of {target:,} parameters is below the smallest {depth}-hidden-layer MLP "
            f"({smallest:,} parameters with width 1) for {d_in} inputs and {num_classes} classes"
        )
    a = depth - 1
    b = d_in + depth + num_classes + (2 * depth if bn else 0)
    c = num_classes - target
    w_real = -c / b if a == 0 else (-b + math.sqrt(b * b - 4 * a * c)) / (2 * a)
    best = min(range(max(1, math.floor(w_real) - 1), math.ceil(w_real) + 2), key=lambda w: abs(count(w) - target))
    if abs(count(best) - target) > tol * target:
        raise ValueError(
            f"no width of a {depth}-hidden-layer MLP is within {tol:.1%} of {target:,} parameters "
            f"(closest: width {best} with {count(best):,}); try another depth"
        )
    model = MLP([best] * depth, num_classes, in_chans, input_size, **kw)
    assert count_params(model)["trainable"] == count(best)
    return model


@register_model("mlp-matched", source="ferlab", description="equal-width MLP matched to a model's parameter count")
def mlp_matched(num_classes: int = 7, in_chans: int = 1, target: str | int = "r002-vgg", depth: int = 3, **kw) -> MLP:
    """Equal-width MLP with as many trainable parameters (within 1%) as ``target``.

    ``target`` is a registered model name (built once to count its trainable
    parameters) or a number of parameters (int or digit string), as the reports'
    "DNN with about the CNN's parameter count" question asks.
    """
    if isinstance(target, str) and not target.replace(",", "").replace("_", "").isdigit():
        if target == "mlp-matched":
            raise ValueError("mlp-matched cannot target itself")
        n = count_params(create_model(target, num_classes=num_classes, in_chans=in_chans))["trainable"]
    else:
        n = int(str(target).replace(",", "").replace("_", ""))
    return matched_mlp(n, depth, num_classes, in_chans, **kw)


# ----------------------------------------------------------------------------- the reports' DNNs


@register_model(
    "r001-dnn", source="report 001", description="16-layer DNN 4096-2048x3-1024x4-512x3-256x2-128x2 (32.8 M)"
)
def r001_dnn(num_classes: int = 7, in_chans: int = 1, act: ActSpec = "relu", dropout: float = 0.0) -> MLP:
    """Report 001's DNN: 15 hidden layers (4096, 3x2048, 4x1024, 3x512, 2x256, 2x128) + output = 32,769,159 params.

    The report lists only the widths; ReLU and no dropout are assumptions.
    """
    hidden = [4096] + [2048] * 3 + [1024] * 4 + [512] * 3 + [256] * 2 + [128] * 2
    return MLP(hidden, num_classes, in_chans, act=act, dropout=dropout, init="keras")


@register_model("r003-dnn", source="report 003", description="21-layer DNN 2000x6-1000x12-512-128 (38.2 M)")
def r003_dnn(num_classes: int = 7, in_chans: int = 1, act: ActSpec = "relu", dropout: float = 0.0) -> MLP:
    """Report 003's DNN (its summary): 6x2000, 12x1000, 512, 128 hidden + output = 38,211,079 params.

    No dropout (the report names adding dropout as future work); ReLU is assumed.
    """
    hidden = [2000] * 6 + [1000] * 12 + [512, 128]
    return MLP(hidden, num_classes, in_chans, act=act, dropout=dropout, init="keras")


@register_model("r004-dnn", source="report 004", description="DNN 650-256-128 matched to the 9-conv CNN (1.70 M)")
def r004_dnn(num_classes: int = 7, in_chans: int = 1, act: ActSpec = "relu", dropout: float = 0.5) -> MLP:
    """Report 004's DNN, reconstructed: hidden 650-256-128 (ReLU, dropout 0.5) = 1,698,705 params.

    The report gives only the total (1,698,183) and says it matches its CNN
    (1,696,583). We reuse the CNN's dense head 256-128 (and its dropout) and size
    the first layer to hit the total: 650 is the closest width (+0.03%). The
    dropout rate is an assumption.
    """
    return MLP([650, 256, 128], num_classes, in_chans, act=act, dropout=dropout, init="keras")
