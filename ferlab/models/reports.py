"""The assignment reports' CNNs (``/shared/reports``), rebuilt in PyTorch with Keras-exact parameter counts.

Conventions carried over from Keras: Conv2D and Dense have biases; 'valid'
padding unless the report says 'same' (or zero-pads); BatchNormalization uses
Keras' epsilon and momentum; weights start Glorot-uniform with zero biases;
the softmax is left to the loss, so every model returns logits. Keras flattens
NHWC and PyTorch NCHW: the Dense weights are permuted, the function class and
parameter counts are the same.

The reports' DNNs (r001-dnn, r003-dnn, r004-dnn) live in :mod:`ferlab.models.mlp`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from ferlab.models.base import FerModel
from ferlab.models.mlp import ActSpec, dense_stack, keras_bn, keras_init_, make_act
from ferlab.models.registry import register_model

Padding = Literal["same", "valid"] | int


# ----------------------------------------------------------------------------- shared building blocks


def conv_block(
    in_ch: int,
    out_ch: int,
    kernel: int = 3,
    *,
    padding: Padding = "valid",
    bn: bool = False,
    act: ActSpec = "relu",
    bn_after_act: bool = False,
) -> nn.Sequential:
    """Keras ``Conv2D`` (stride 1, with bias) [+ ``BatchNormalization``] + activation.

    ``padding``: 'valid' (Keras' default), 'same' (odd kernels) or an int (a
    ``ZeroPadding2D`` before a 'valid' conv). The default order is
    conv -> BN -> act; ``bn_after_act`` gives conv -> act -> BN (report 003).
    """
    pad = {"valid": 0, "same": kernel // 2}[padding] if isinstance(padding, str) else padding
    conv = nn.Conv2d(in_ch, out_ch, kernel, padding=pad)  # (B, in_ch, H, W) -> (B, out_ch, H', W')
    if not bn:
        return nn.Sequential(conv, make_act(act))
    norm = keras_bn(out_ch, 2)
    return nn.Sequential(conv, make_act(act), norm) if bn_after_act else nn.Sequential(conv, norm, make_act(act))


def _output_shape(module: nn.Module, in_chans: int, input_size: tuple[int, int]) -> tuple[int, ...]:
    """Shape (without batch) of ``module``'s output on one input, found by a dry run in eval mode."""
    was_training = module.training
    module.eval()
    with torch.no_grad():
        out = module(torch.zeros(1, in_chans, *input_size))  # (1, C, H, W) -> (1, *shape)
    module.train(was_training)
    return tuple(out.shape[1:])


class ConvNet(FerModel):
    """A CNN as ``features`` (conv trunk, up to the map Keras flattens) and ``head``.

    ``head`` = Flatten -> :func:`dense_stack` (``head_widths``, ``**dense_kw``) ->
    Linear(num_classes). The flattened size is found by a dry run of ``features``.
    """

    def __init__(
        self,
        features: nn.Module,
        head_widths: Sequence[int],
        num_classes: int = 7,
        in_chans: int = 1,
        input_size: tuple[int, int] = (48, 48),
        **dense_kw,
    ) -> None:
        super().__init__()
        self.num_classes, self.in_chans, self.input_size = num_classes, in_chans, tuple(input_size)
        self.features = features
        c, h, w = _output_shape(features, in_chans, self.input_size)
        self.head = nn.Sequential(
            nn.Flatten(),  # (B, C, H, W) -> (B, C*H*W)
            dense_stack(c * h * w, head_widths, **dense_kw),  # -> (B, head_widths[-1])
            nn.Linear(head_widths[-1] if head_widths else c * h * w, num_classes),  # -> (B, num_classes)
        )
        keras_init_(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, in_chans, 48, 48) -> (B, C, H, W), the last feature map
        return self.features(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C, H, W) -> (B, num_classes)
        return self.head(x)


# ----------------------------------------------------------------------------- report 000: 7-model ensemble


def _r000_plain(head_widths: Sequence[int], drop_after: Sequence[bool], dropout: float, nc: int, ic: int) -> ConvNet:
    """Report 000's three plain CNNs share the conv trunk; they differ in the dense layers."""
    features = nn.Sequential(
        conv_block(ic, 60, 5), nn.Dropout(dropout), nn.MaxPool2d(2),  # (B, ic, 48, 48) -> (B, 60, 22, 22)
        conv_block(60, 120, 3), nn.Dropout(dropout), nn.MaxPool2d(2),  # -> (B, 120, 10, 10)
        conv_block(120, 240, 3), nn.MaxPool2d(2),  # -> (B, 240, 4, 4)
    )  # fmt: skip
    # Keras: Flatten -> Dropout -> Dense ..., with a Dropout after the hidden layers flagged in drop_after
    drops = [dropout if d else 0.0 for d in drop_after]
    return ConvNet(features, head_widths, nc, ic, in_dropout=dropout, dropout=drops)


@register_model("r000-cnn1", source="report 000", description="3-conv CNN 60-120-240, dense 400-200 (1.94 M)")
def r000_cnn1(num_classes: int = 7, in_chans: int = 1, dropout: float = 0.2) -> ConvNet:
    """Report 000, ensemble member 1: conv 5x5/60, 3x3/120, 3x3/240 ('valid', pool after each), dense 400-200."""
    return _r000_plain([400, 200], [True, False], dropout, num_classes, in_chans)


@register_model("r000-cnn2", source="report 000", description="3-conv CNN 60-120-240, dense 400-200-100 (1.96 M)")
def r000_cnn2(num_classes: int = 7, in_chans: int = 1, dropout: float = 0.2) -> ConvNet:
    """Report 000, ensemble member 2: member 1's trunk, dense 400-200-100."""
    return _r000_plain([400, 200, 100], [True, False, False], dropout, num_classes, in_chans)


@register_model("r000-cnn3", source="report 000", description="3-conv CNN 60-120-240, dense 5x300 (1.84 M)")
def r000_cnn3(num_classes: int = 7, in_chans: int = 1, dropout: float = 0.2) -> ConvNet:
    """Report 000, ensemble member 3: member 1's trunk, five dense 300 layers (dropout after the 1st and 3rd)."""
    return _r000_plain([300] * 5, [True, False, True, False, False], dropout, num_classes, in_chans)


class TwoBranchNet(FerModel):
    """Report 000's "inception" nets: two conv branches on the input, flattened and concatenated, then dense layers.

    The branches can end at different resolutions (member 4: 8x8 and 4x4). To give
    one (B, C, H, W) map, ``forward_features`` upsamples the coarser branch by
    nearest-neighbour to the finer one's size and stacks the channels
    (branch 1 first); ``forward_head`` average-pools those channels back (an exact
    inverse), flattens both parts and concatenates them as Keras does.
    """

    def __init__(
        self,
        branch1: nn.Module,
        branch2: nn.Module,
        head_widths: Sequence[int],
        num_classes: int = 7,
        in_chans: int = 1,
        input_size: tuple[int, int] = (48, 48),
        **dense_kw,
    ) -> None:
        super().__init__()
        self.num_classes, self.in_chans, self.input_size = num_classes, in_chans, tuple(input_size)
        self.branch1, self.branch2 = branch1, branch2
        c1, h1, w1 = _output_shape(branch1, in_chans, self.input_size)
        c2, h2, w2 = _output_shape(branch2, in_chans, self.input_size)
        scale = h1 // h2
        if h1 != h2 * scale or w1 != w2 * scale:
            raise ValueError(f"branch maps {h1}x{w1} and {h2}x{w2} are not an integer rescale of each other")
        self.split = c1
        self.upsample = nn.Upsample(scale_factor=scale, mode="nearest") if scale > 1 else nn.Identity()
        self.downsample = nn.AvgPool2d(scale) if scale > 1 else nn.Identity()
        self.dense = nn.Sequential(
            dense_stack(c1 * h1 * w1 + c2 * h2 * w2, head_widths, **dense_kw),  # (B, F1+F2) -> (B, head_widths[-1])
            nn.Linear(head_widths[-1], num_classes),  # -> (B, num_classes)
        )
        keras_init_(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch1(x)  # (B, in_chans, 48, 48) -> (B, C1, H1, W1)
        b = self.upsample(self.branch2(x))  # -> (B, C2, H2, W2) -> (B, C2, H1, W1)
        return torch.cat([a, b], dim=1)  # (B, C1 + C2, H1, W1)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        a = x[:, : self.split].flatten(1)  # (B, C1*H1*W1)
        b = self.downsample(x[:, self.split :]).flatten(1)  # (B, C2, H1, W1) -> (B, C2*H2*W2)
        return self.dense(torch.cat([a, b], dim=1))  # (B, F1 + F2) -> (B, num_classes)


@register_model(
    "r000-inception1", source="report 000", description="two-branch conv net 60-60-120-240 | 60-120 (5.70 M)"
)
def r000_inception1(num_classes: int = 7, in_chans: int = 1, dropout: float = 0.2) -> TwoBranchNet:
    """Report 000, member 4: branch 1 conv 60-60-pool-120-pool-240 (8x8), branch 2 pool-60-pool-120-pool (4x4)."""
    branch1 = nn.Sequential(
        conv_block(in_chans, 60), conv_block(60, 60), nn.MaxPool2d(2),  # (B, ic, 48, 48) -> (B, 60, 22, 22)
        conv_block(60, 120), nn.MaxPool2d(2),  # -> (B, 120, 10, 10)
        conv_block(120, 240),  # -> (B, 240, 8, 8)
    )  # fmt: skip
    branch2 = nn.Sequential(
        nn.MaxPool2d(2), conv_block(in_chans, 60), nn.MaxPool2d(2),  # (B, ic, 48, 48) -> (B, 60, 11, 11)
        conv_block(60, 120), nn.MaxPool2d(2),  # -> (B, 120, 4, 4)
    )  # fmt: skip
    return TwoBranchNet(branch1, branch2, [300, 300], num_classes, in_chans, dropout=[dropout, 0.0])


@register_model(
    "r000-inception2", source="report 000", description="two-branch conv net 60-60-120-240 | 80-160 (2.49 M)"
)
def r000_inception2(num_classes: int = 7, in_chans: int = 1, dropout: float = 0.25) -> TwoBranchNet:
    """Report 000, member 5: member 4 with a pool after branch 1 (4x4) and branch 2 widened to 80-160."""
    branch1 = nn.Sequential(
        conv_block(in_chans, 60), conv_block(60, 60), nn.MaxPool2d(2),  # (B, ic, 48, 48) -> (B, 60, 22, 22)
        conv_block(60, 120), nn.MaxPool2d(2),  # -> (B, 120, 10, 10)
        conv_block(120, 240), nn.MaxPool2d(2),  # -> (B, 240, 4, 4)
    )  # fmt: skip
    branch2 = nn.Sequential(
        nn.MaxPool2d(2), conv_block(in_chans, 80), nn.MaxPool2d(2),  # (B, ic, 48, 48) -> (B, 80, 11, 11)
        conv_block(80, 160), nn.MaxPool2d(2),  # -> (B, 160, 4, 4)
    )  # fmt: skip
    return TwoBranchNet(branch1, branch2, [300, 300], num_classes, in_chans, dropout=[dropout, 0.0])


class Bottleneck(nn.Module):
    """Report 000's ``stack(x, h)``: relu(x + relu(1x1 h) . relu(3x3 h/4) . relu(1x1 h/4) x), 'same' padding."""

    def __init__(self, h: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            conv_block(h, h // 4, 1, padding="same"),  # (B, h, H, W) -> (B, h/4, H, W)
            conv_block(h // 4, h // 4, 3, padding="same"),  # -> (B, h/4, H, W)
            conv_block(h // 4, h, 1, padding="same"),  # -> (B, h, H, W)
        )
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, h, H, W) -> (B, h, H, W)
        return self.act(x + self.body(x))


def _r000_resnet(stacks: Sequence[int], head_widths: Sequence[int], dropout: float, nc: int, ic: int) -> ConvNet:
    """Stages of 64, 128, 256: 'same' 3x3 conv, ``stacks[i]`` bottlenecks, pool, dropout; then conv 512, avg-pool."""
    layers: list[nn.Module] = []
    c_in = ic
    for width, n in zip((64, 128, 256), stacks, strict=True):  # 48 -> 24 -> 12 -> 6
        layers += [conv_block(c_in, width, 3, padding="same")]  # (B, c_in, S, S) -> (B, width, S, S)
        layers += [Bottleneck(width) for _ in range(n)]  # -> (B, width, S, S)
        layers += [nn.MaxPool2d(2, ceil_mode=True), nn.Dropout(dropout)]  # Keras padding='same' -> (B, width, S/2, S/2)
        c_in = width
    layers += [
        conv_block(256, 512, 3, padding="same"),  # (B, 256, 6, 6) -> (B, 512, 6, 6)
        nn.AvgPool2d(2, ceil_mode=True),  # Keras padding='same' -> (B, 512, 3, 3)
        nn.Dropout(dropout),
    ]
    return ConvNet(nn.Sequential(*layers), head_widths, nc, ic)


@register_model(
    "r000-resnet1", source="report 000", description="bottleneck ResNet 64-128-256-512, 1 block/stage (3.49 M)"
)
def r000_resnet1(num_classes: int = 7, in_chans: int = 1, dropout: float = 0.15) -> ConvNet:
    """Report 000, member 6: one bottleneck per stage, dense 400."""
    return _r000_resnet((1, 1, 1), [400], dropout, num_classes, in_chans)


@register_model(
    "r000-resnet2", source="report 000", description="bottleneck ResNet 64-128-256-512, 1-2-3 blocks (4.32 M)"
)
def r000_resnet2(num_classes: int = 7, in_chans: int = 1, dropout: float = 0.15) -> ConvNet:
    """Report 000, member 7: 1, 2, 3 bottlenecks per stage, dense 512-256-128."""
    return _r000_resnet((1, 2, 3), [512, 256, 128], dropout, num_classes, in_chans)


# ----------------------------------------------------------------------------- report 001


def _r001_cnn(widths: Sequence[int], dropout: float, nc: int, ic: int) -> ConvNet:
    """Seven ZeroPadding2D(1)+3x3 convs with BN before ReLU; max-pool + dropout after convs 2, 4 and 7."""
    if len(widths) != 7:
        raise ValueError(f"report 001's net has 7 convs, got {len(widths)} widths")
    layers: list[nn.Module] = []
    c_in = ic
    for i, w in enumerate(widths):
        layers.append(conv_block(c_in, w, 3, padding=1, bn=True))  # (B, c_in, S, S) -> (B, w, S, S)
        if i in (1, 3, 6):
            layers += [nn.MaxPool2d(2), nn.Dropout(dropout)]  # -> (B, w, S/2, S/2); 48 -> 24 -> 12 -> 6
        c_in = w
    return ConvNet(nn.Sequential(*layers), [1024, 512, 256, 128], nc, ic, bn=True, dropout=dropout)


@register_model(
    "r001-cnn3m", source="report 001", description="7-conv BN net 32-32-64x5, dense 1024-512-256-128 (3.2 M)"
)
def r001_cnn3m(num_classes: int = 7, in_chans: int = 1, dropout: float = 0.3) -> ConvNet:
    """Report 001's first ("3 million") net: 3,235,239 params (3,230,631 trainable).

    Seven zero-padded 3x3 convs of 32, 32 | 64, 64 | 64, 64, 64 filters, each
    conv -> BN -> ReLU, max-pool + Dropout(0.3) after each group; dense
    1024-512-256-128, each Dense -> BN -> ReLU -> Dropout(0.3). The report gives
    no widths; they are those of the author's published hw3_train.py, which match
    the report's description and its "3 million" exactly.
    """
    return _r001_cnn((32, 32, 64, 64, 64, 64, 64), dropout, num_classes, in_chans)


@register_model("r001-cnn23m", source="report 001", description="7-conv BN net 32-32-64-64-256-512-512 (23.3 M)")
def r001_cnn23m(
    num_classes: int = 7,
    in_chans: int = 1,
    dropout: float = 0.3,
    widths: Sequence[int] = (32, 32, 64, 64, 256, 512, 512),
) -> ConvNet:
    """Report 001's scaled-up ("23 million", submitted) net: 23,331,559 params (23,324,775 trainable).

    The report says it is the same architecture as the 3 M net with more
    parameters, i.e. wider convs, but gives no widths. We widen only the last conv
    group (64-64-64 -> 256-512-512): it feeds the first Dense, whose 6*6*C x 1024
    weights dominate, and these are the closest power-of-two widths to 23 M that
    leave the first two groups as published. Pass ``widths`` to try others.
    """
    return _r001_cnn(tuple(widths), dropout, num_classes, in_chans)


# ----------------------------------------------------------------------------- report 002


@register_model(
    "r002-vgg", source="report 002", description="VGG-like 64-64-128-128-128-128 BN net, dense 512-512 (1.88 M)"
)
def r002_vgg(num_classes: int = 7, in_chans: int = 1, drop_conv: float = 0.25, drop_fc: float = 0.333) -> ConvNet:
    """Report 002's net, following its model summary: 1,875,143 params (1,872,327 trainable).

    Three blocks of a 'same' then a 'valid' 3x3 conv (64, 128, 128 filters), BN
    before ReLU except in block 2, max-pool + Dropout(0.25); dense 512-512 with BN
    and Dropout(0.333).
    """

    def block(c_in: int, c: int, bn: bool) -> list[nn.Module]:
        return [
            conv_block(c_in, c, 3, padding="same", bn=bn),  # (B, c_in, S, S) -> (B, c, S, S)
            conv_block(c, c, 3, padding="valid", bn=bn),  # -> (B, c, S-2, S-2)
            nn.MaxPool2d(2),  # -> (B, c, (S-2)/2, (S-2)/2)
            nn.Dropout(drop_conv),
        ]

    features = nn.Sequential(
        *block(in_chans, 64, True),  # (B, ic, 48, 48) -> (B, 64, 23, 23)
        *block(64, 128, False),  # -> (B, 128, 10, 10)
        *block(128, 128, True),  # -> (B, 128, 4, 4)
    )
    return ConvNet(features, [512, 512], num_classes, in_chans, bn=True, dropout=drop_fc)


# ----------------------------------------------------------------------------- report 003


@register_model(
    "r003-vgg16bn", source="report 003", description="VGG16 with BN and LeakyReLU, fc 4096-4096-1000 (37.7 M)"
)
def r003_vgg16bn(num_classes: int = 7, in_chans: int = 1, dropout: float = 0.5, act: ActSpec = "leaky_relu") -> ConvNet:
    """Report 003's VGG16 on 48x48: 37,716,999 params (37,708,551 trainable).

    Thirteen 'same' 3x3 convs (64x2, 128x2, 256x3, 512x3, 512x3), each conv ->
    LeakyReLU(0.3, Keras' default) -> BN as in its summary, max-pool after each
    block (48 -> 1); fc 4096-4096-1000 with LeakyReLU and Dropout. The summary
    does not show the dropout rate; 0.5 (VGG's) is assumed.
    """
    layers: list[nn.Module] = []
    c_in = in_chans
    for c, n in ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3)):  # 48 -> 24 -> 12 -> 6 -> 3 -> 1
        for _ in range(n):
            layers.append(conv_block(c_in, c, 3, padding="same", bn=True, act=act, bn_after_act=True))
            c_in = c  # (B, c_in, S, S) -> (B, c, S, S)
        layers.append(nn.MaxPool2d(2))  # -> (B, c, S/2, S/2)
    return ConvNet(nn.Sequential(*layers), [4096, 4096, 1000], num_classes, in_chans, act=act, dropout=dropout)


# ----------------------------------------------------------------------------- report 004


@register_model("r004-cnn9", source="report 004", description="9-conv BN net 32x3-64x3-128x3, dense 256-128 (1.70 M)")
def r004_cnn9(num_classes: int = 7, in_chans: int = 1, drop_conv: float = 0.25, drop_fc: float = 0.5) -> ConvNet:
    """Report 004's net: 1,696,583 params (1,695,239 trainable).

    Three groups of three 'same' 3x3 convs (32, 64, 128 filters), each conv -> BN
    -> ReLU, max-pool + dropout after each group (48 -> 6); dense 256-128 with
    dropout. The widths and 'same' padding are what the report's counts imply
    (6*6*128 flattened); the dropout rates are not given and are assumptions.
    """
    layers: list[nn.Module] = []
    c_in = in_chans
    for c in (32, 64, 128):  # 48 -> 24 -> 12 -> 6
        for _ in range(3):
            layers.append(conv_block(c_in, c, 3, padding="same", bn=True))  # (B, c_in, S, S) -> (B, c, S, S)
            c_in = c
        layers += [nn.MaxPool2d(2), nn.Dropout(drop_conv)]  # -> (B, c, S/2, S/2)
    return ConvNet(nn.Sequential(*layers), [256, 128], num_classes, in_chans, dropout=drop_fc)
