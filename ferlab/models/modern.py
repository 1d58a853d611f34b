"""ferlab's own nets, sized for a 2-core CPU: residual CNNs and a depthwise-separable student."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ferlab.models.base import FerModel
from ferlab.models.registry import register_model


def conv_bn_act(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    """Conv (no bias) + BatchNorm (+ ReLU), 'same' padding."""
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, k, stride, padding=k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs and an identity (or 1x1 projection) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv_bn_act(cin, cout, 3, stride)
        self.conv2 = conv_bn_act(cout, cout, 3, 1, act=False)
        self.short = nn.Identity() if stride == 1 and cin == cout else conv_bn_act(cin, cout, 1, stride, act=False)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv2(self.conv1(x)) + self.short(x))


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation (Hu et al. 2018): channel weights from the global average, through a bottleneck."""

    def __init__(self, channels: int, reduction: int = 16, min_hidden: int = 8) -> None:
        super().__init__()
        hidden = max(min_hidden, channels // reduction)
        self.reduce = nn.Conv2d(channels, hidden, 1)
        self.expand = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, C, H, W) -> (B, C, 1, 1) weights in (0, 1) -> (B, C, H, W)
        w = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.expand(F.relu(self.reduce(w), inplace=True)))


class SEBasicBlock(BasicBlock):
    """:class:`BasicBlock` with squeeze-and-excitation on the residual branch, before the addition."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__(cin, cout, stride)
        self.se = SqueezeExcite(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.se(self.conv2(self.conv1(x))) + self.short(x))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 project; residual when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int = 1, expand: int = 4) -> None:
        super().__init__()
        mid = cin * expand
        self.block = nn.Sequential(
            conv_bn_act(cin, mid, 1),
            conv_bn_act(mid, mid, 3, stride, groups=mid),
            conv_bn_act(mid, cout, 1, act=False),
        )
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.residual else y


class StagedNet(FerModel):
    """Stem (stride ``stem_stride``), stages of blocks (the first of each stage but the first downsamples by 2),
    GAP, dropout, linear. ``input_scale`` > 1 upsamples the input (bilinear) before the stem: every stage then works
    at that many times the resolution, for the same parameters and the square of ``input_scale`` times the FLOPs."""

    def __init__(
        self,
        block: type[nn.Module],
        widths: Sequence[int],
        depths: Sequence[int],
        num_classes: int = 7,
        in_chans: int = 1,
        drop: float = 0.3,
        stem_width: int | None = None,
        stem_stride: int = 1,
        input_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if not input_scale >= 1.0:
            raise ValueError(f"input_scale must be >= 1 (an upsampling factor), got {input_scale}")
        self.input_scale = float(input_scale)
        stem = stem_width or widths[0]
        self.stem = conv_bn_act(in_chans, stem, 3, stem_stride)
        stages: list[nn.Module] = []
        cin = stem
        for i, (w, d) in enumerate(zip(widths, depths, strict=True)):
            blocks = [block(cin if j == 0 else w, w, 2 if (j == 0 and i > 0) else 1) for j in range(d)]
            stages.append(nn.Sequential(*blocks))
            cin = w
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(drop)
        self.fc = nn.Linear(cin, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        # (B, 1, 48, 48) -> (B, C_last, 6, 6) for four stages (3 x 3 with a stride-2 stem; 6s x 6s with input_scale s)
        if self.input_scale != 1.0:
            x = F.interpolate(x, scale_factor=self.input_scale, mode="bilinear", align_corners=False)
        return self.stages(self.stem(x))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        # (B, C, H, W) -> (B, num_classes)
        return self.fc(self.drop(self.pool(x).flatten(1)))


@register_model("fer-resnet-s", source="ferlab", description="ResNet, 4 stages 32-64-128-256, one block each")
def fer_resnet_s(num_classes: int = 7, in_chans: int = 1, drop: float = 0.3, input_scale: float = 1.0) -> StagedNet:
    return StagedNet(BasicBlock, (32, 64, 128, 256), (1, 1, 1, 1), num_classes, in_chans, drop, input_scale=input_scale)


@register_model("fer-resnet-s16", source="ferlab",
                description="fer-resnet-s with a 16-wide stem and first stage (16-64-128-256)")
def fer_resnet_s16(num_classes: int = 7, in_chans: int = 1, drop: float = 0.3, input_scale: float = 1.0) -> StagedNet:
    # Halving the 48 x 48 stage (stem and first block) keeps the depth and cuts 27% of fer-resnet-s's FLOPs.
    return StagedNet(BasicBlock, (16, 64, 128, 256), (1, 1, 1, 1), num_classes, in_chans, drop, stem_width=16,
                     input_scale=input_scale)


def _s16_wide(block: type[nn.Module], depths: Sequence[int], num_classes: int, in_chans: int, drop: float,
              input_scale: float) -> StagedNet:
    """The fer-resnet-s16w family: a 16-wide stem and first stage, then 64-192-384, with the given blocks."""
    return StagedNet(block, (16, 64, 192, 384), depths, num_classes, in_chans, drop, stem_width=16,
                     input_scale=input_scale)


@register_model("fer-resnet-s16w", source="ferlab",
                description="fer-resnet-s16 with its last two stages 1.5x wider (16-64-192-384)")
def fer_resnet_s16w(num_classes: int = 7, in_chans: int = 1, drop: float = 0.3, input_scale: float = 1.0) -> StagedNet:
    # Width where the maps are small: the 12 x 12 and 6 x 6 stages at 1.5x fer-resnet-s16's width give 2.1x its
    # parameters for 1.7x its FLOPs (fer-resnet-m, wider at every stage and twice as deep in the middle: 4.9x).
    return _s16_wide(BasicBlock, (1, 1, 1, 1), num_classes, in_chans, drop, input_scale)


@register_model("fer-resnet-s16wd", source="ferlab",
                description="fer-resnet-s16w with fer-resnet-m's depths: blocks 1-2-2-1 (16-64-192-384)")
def fer_resnet_s16wd(num_classes: int = 7, in_chans: int = 1, drop: float = 0.3, input_scale: float = 1.0) -> StagedNet:
    # A second block in the 24 x 24 and 12 x 12 stages, where fer-resnet-m is deeper: 1.3x fer-resnet-s16w's
    # parameters for 1.8x its FLOPs (fer-resnet-m: 1.4x and 2.9x), the 48 x 48 stage kept at 16 channels.
    return _s16_wide(BasicBlock, (1, 2, 2, 1), num_classes, in_chans, drop, input_scale)


@register_model("fer-resnet-s16wdd", source="ferlab",
                description="fer-resnet-s16wd with a third block in the 12 x 12 stage: blocks 1-2-3-1 (16-64-192-384)")
def fer_resnet_s16wdd(num_classes: int = 7, in_chans: int = 1, drop: float = 0.3,
                      input_scale: float = 1.0) -> StagedNet:
    # The middle stages' depth paid on FER+ (fer-resnet-s16wd over fer-resnet-s16w); one more 12 x 12 block asks
    # whether it pays again: +20% parameters, +30% FLOPs.
    return _s16_wide(BasicBlock, (1, 2, 3, 1), num_classes, in_chans, drop, input_scale)


@register_model("fer-resnet-s16wd-se", source="ferlab",
                description="fer-resnet-s16wd with squeeze-and-excitation in every block")
def fer_resnet_s16wd_se(num_classes: int = 7, in_chans: int = 1, drop: float = 0.3,
                        input_scale: float = 1.0) -> StagedNet:
    # Channel attention costs under 1% more parameters and FLOPs than fer-resnet-s16wd (two 1x1 convs per block).
    return _s16_wide(SEBasicBlock, (1, 2, 2, 1), num_classes, in_chans, drop, input_scale)


@register_model("fer-resnet-xs", source="ferlab",
                description="fer-resnet-s16 at 3/4 width after the first stage (16-48-96-192)")
def fer_resnet_xs(num_classes: int = 7, in_chans: int = 1, drop: float = 0.3, input_scale: float = 1.0) -> StagedNet:
    # Every stage of fer-resnet-s16 costs about the same FLOPs (channels double as the side halves), so 3/4 width
    # in the last three stages cuts ~44% of their FLOPs and 43% of the parameters: more epochs in a fixed budget.
    return StagedNet(BasicBlock, (16, 48, 96, 192), (1, 1, 1, 1), num_classes, in_chans, drop, stem_width=16,
                     input_scale=input_scale)


@register_model("fer-resnet-m", source="ferlab", description="ResNet, 4 stages 48-96-192-384, blocks 1-2-2-1")
def fer_resnet_m(num_classes: int = 7, in_chans: int = 1, drop: float = 0.3, input_scale: float = 1.0) -> StagedNet:
    return StagedNet(BasicBlock, (48, 96, 192, 384), (1, 2, 2, 1), num_classes, in_chans, drop, input_scale=input_scale)


@register_model("fer-resnet-l", source="ferlab", description="ResNet, 4 stages 64-128-256-512, blocks 2-2-2-2")
def fer_resnet_l(num_classes: int = 7, in_chans: int = 1, drop: float = 0.4, input_scale: float = 1.0) -> StagedNet:
    return StagedNet(BasicBlock, (64, 128, 256, 512), (2, 2, 2, 2), num_classes, in_chans, drop,
                     input_scale=input_scale)


@register_model("fer-mobile", source="ferlab", description="MobileNetV2-style student, 4 stages 16-32-64-128")
def fer_mobile(num_classes: int = 7, in_chans: int = 1, drop: float = 0.2, input_scale: float = 1.0) -> StagedNet:
    return StagedNet(InvertedResidual, (16, 32, 64, 128), (1, 2, 2, 2), num_classes, in_chans, drop, stem_width=16,
                     input_scale=input_scale)


@register_model("fer-mobile-fast", source="ferlab",
                description="MobileNetV2-style student for speed: stride-2 stem, 4 stages 24-48-96-192")
def fer_mobile_fast(num_classes: int = 7, in_chans: int = 1, drop: float = 0.2, input_scale: float = 1.0) -> StagedNet:
    return StagedNet(InvertedResidual, (24, 48, 96, 192), (1, 2, 2, 2), num_classes, in_chans, drop, stem_width=16,
                     stem_stride=2, input_scale=input_scale)
