"""Normalisation and batched augmentation of (B, 1, 48, 48) face tensors.

Everything here works on whole batches with tensor operations (no per-image
Python loop). Augmentation runs on images scaled to [0, 1]; normalisation comes
after it. Randomness comes only from an explicit ``torch.Generator`` so that a
resumed run draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F

NORMALIZE_MODES: tuple[str, ...] = ("none", "unit", "image", "dataset")


@dataclass
class Normalizer:
    """Maps uint8-range pixels to model inputs.

    mode: ``none`` (raw 0..255), ``unit`` ([0, 1]), ``image`` (per-image zero mean, unit std),
    ``dataset`` (mean/std of the training split, stored here and saved with the model).
    """

    mode: str = "dataset"
    mean: float = 0.0  # of [0, 1]-scaled training pixels (mode "dataset")
    std: float = 1.0

    def __post_init__(self) -> None:
        if self.mode not in NORMALIZE_MODES:
            raise ValueError(f"unknown normalisation {self.mode!r}; choose one of {', '.join(NORMALIZE_MODES)}")

    @classmethod
    def fit(cls, mode: str, images: np.ndarray | torch.Tensor) -> Normalizer:
        """A normaliser whose dataset statistics come from ``images`` (uint8, the training split only)."""
        if mode != "dataset":
            return cls(mode)
        x = torch.as_tensor(images).double() / 255.0
        return cls(mode, float(x.mean()), float(x.std()))

    def __call__(self, x01: torch.Tensor) -> torch.Tensor:
        """x01: (B, C, H, W) float in [0, 1] -> (B, C, H, W) model input."""
        if self.mode == "none":
            return x01 * 255.0
        if self.mode == "unit":
            return x01
        if self.mode == "image":
            mean = x01.mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
            std = x01.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-3)
            return (x01 - mean) / std
        return (x01 - self.mean) / self.std

    def state(self) -> dict:
        return asdict(self)


@dataclass
class AugmentConfig:
    """Online augmentation, with the options of Keras' ImageDataGenerator plus crop and erasing.

    rotation: max degrees; shift: max fraction of width/height; shear: max degrees;
    zoom: max relative zoom (0.1 -> scale in [0.9, 1.1]); hflip: flip half the images;
    crop_pad: random crop of the image padded by this many pixels; erase_p: probability
    of random erasing (area 2-20%); fill: ``nearest`` (Keras' default) or ``zeros``.

    Photometric and camera changes, for faces from other cameras (each 0 = off): brightness: max shift of the
    level (fraction of white); contrast: max relative change of the contrast; gamma: max tone-curve exponent
    (x^g with log g uniform in [-log gamma, log gamma]); blur_p: probability of a Gaussian blur of random
    strength (sigma up to 1.5 pixels); noise: max standard deviation of added Gaussian noise; motion_blur_p:
    probability of a line blur 2-9 pixels long at a random angle (movement); lowres_p: probability of the face
    reduced to 12-40 pixels a side and enlarged back (a small face upscaled); jpeg_p: probability of JPEG
    compression at a quality of 10-90 (the 8x8 block DCT quantised with the standard luminance table).
    """

    rotation: float = 0.0
    shift: float = 0.0
    shear: float = 0.0
    zoom: float = 0.0
    hflip: bool = False
    crop_pad: int = 0
    erase_p: float = 0.0
    fill: str = "nearest"
    brightness: float = 0.0
    contrast: float = 0.0
    gamma: float = 0.0
    blur_p: float = 0.0
    noise: float = 0.0
    motion_blur_p: float = 0.0
    lowres_p: float = 0.0
    jpeg_p: float = 0.0

    def __post_init__(self) -> None:
        def number(name: str) -> float:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise ValueError(f"augmentation option {name} must be a number, got {v!r}")
            if v < 0:
                raise ValueError(f"augmentation option {name} must be >= 0 (0: off), got {v}")
            return v

        for name in ("rotation", "shear", "brightness", "contrast", "gamma", "noise"):
            number(name)
        for name in ("shift", "zoom"):
            if number(name) >= 1:
                raise ValueError(f"augmentation option {name} is a fraction of the image: it must be < 1, got "
                                 f"{getattr(self, name)}")
        for name in ("erase_p", "blur_p", "motion_blur_p", "lowres_p", "jpeg_p"):
            if number(name) > 1:
                raise ValueError(f"augmentation option {name} is a probability: it must be in [0, 1], got "
                                 f"{getattr(self, name)}")
        if isinstance(self.crop_pad, bool) or not isinstance(self.crop_pad, int) or self.crop_pad < 0:
            raise ValueError(f"augmentation option crop_pad must be a whole number of pixels >= 0, got "
                             f"{self.crop_pad!r}")
        if not isinstance(self.hflip, bool):
            raise ValueError(f"augmentation option hflip must be true or false, got {self.hflip!r}")
        if self.fill not in ("nearest", "zeros"):
            raise ValueError(f"augmentation option fill must be 'nearest' or 'zeros', got {self.fill!r}")

    @property
    def has_affine(self) -> bool:
        return any(v != 0 for v in (self.rotation, self.shift, self.shear, self.zoom))

    @property
    def has_photometric(self) -> bool:
        return any(v != 0 for v in (self.brightness, self.contrast, self.gamma, self.blur_p, self.noise,
                                    self.motion_blur_p, self.lowres_p, self.jpeg_p))

    @property
    def is_identity(self) -> bool:
        return not (self.has_affine or self.hflip or self.crop_pad or self.erase_p or self.has_photometric)

    @classmethod
    def from_dict(cls, d: dict | None) -> AugmentConfig:
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown augmentation option(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


# Presets, as in torchvision's references: small named train/eval recipes.
AUGMENT_PRESETS: dict[str, AugmentConfig] = {
    "none": AugmentConfig(),
    "flip": AugmentConfig(hflip=True),
    # Keras ImageDataGenerator settings typical of the reports.
    "keras": AugmentConfig(rotation=10, shift=0.1, shear=10, zoom=0.1, hflip=True),
    # ferlab's default: crop + flip + small rotation + erasing.
    "standard": AugmentConfig(rotation=10, shift=0.0, zoom=0.1, hflip=True, crop_pad=4, erase_p=0.25),
}


def hflip(x: torch.Tensor) -> torch.Tensor:
    """Mirror (B, C, H, W) images left-right."""
    return x.flip(-1)


def shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Move (B, C, H, W) images down ``dy`` and right ``dx`` pixels, filling with zeros as the training crop pads."""
    h, w = x.shape[-2:]
    p = max(abs(dy), abs(dx))
    xp = F.pad(x, (p, p, p, p))  # (B, C, H+2p, W+2p)
    return xp[..., p - dy : p - dy + h, p - dx : p - dx + w]


def zoom_rotate_grid(height: int, width: int, scale: float = 1.0, degrees: float = 0.0,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The sampling grid (1, H, W, 2) of :func:`zoom_rotate` for images of ``height`` x ``width``."""
    r = math.radians(degrees)
    c, s = math.cos(r) * scale, math.sin(r) * scale
    theta = torch.tensor([[[c, -s, 0.0], [s, c, 0.0]]], dtype=dtype)  # (1, 2, 3)
    return F.affine_grid(theta, [1, 1, height, width], align_corners=False)  # (1, H, W, 2)


def zoom_rotate(x: torch.Tensor, scale: float = 1.0, degrees: float = 0.0,
                grid: torch.Tensor | None = None) -> torch.Tensor:
    """Resample (B, C, H, W) images about their centre: ``scale`` < 1 zooms in, ``degrees`` rotates; the border
    pixels fill what comes in from outside (the training augmentation's "nearest" fill). ``grid``: the ready
    :func:`zoom_rotate_grid` of these parameters (then ``scale`` and ``degrees`` are not read)."""
    if grid is None:
        grid = zoom_rotate_grid(x.shape[-2], x.shape[-1], scale, degrees, x.dtype)
    grid = grid.expand(x.shape[0], -1, -1, -1)  # (B, H, W, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


# Test-time augmentation: the views of a batch whose logits are averaged. "shift" is the flip pair at the
# centre and moved 2 pixels up, down, left and right (10 views), within the training crop's +-4 pixels;
# "affine" adds the flip pair zoomed in and out 8% and rotated +-6 degrees (18 views), within the training
# augmentation's +-10% zoom and +-10 degrees. Each mode's views start with those of the mode before it.
TTA_SHIFTS = ((0, 0), (-2, 0), (2, 0), (0, -2), (0, 2))
TTA_ZOOMS = (0.92, 1.08)
TTA_DEGREES = (-6.0, 6.0)


def _pairs(views: list[torch.Tensor]) -> list[torch.Tensor]:
    return [v for m in views for v in (m, hflip(m))]


def _shift_views(x: torch.Tensor) -> list[torch.Tensor]:
    return _pairs([shift(x, dy, dx) for dy, dx in TTA_SHIFTS])


def _affine_params() -> list[tuple[float, float]]:
    """(scale, degrees) of the affine mode's warped views, in order."""
    return [(z, 0.0) for z in TTA_ZOOMS] + [(1.0, d) for d in TTA_DEGREES]


def _affine_views(x: torch.Tensor) -> list[torch.Tensor]:
    return _shift_views(x) + _pairs([zoom_rotate(x, scale=z, degrees=d) for z, d in _affine_params()])


TTA_MODES: dict[str, Callable[[torch.Tensor], list[torch.Tensor]]] = {
    "none": lambda x: [x],
    "flip": lambda x: [x, hflip(x)],
    "shift": _shift_views,
    "affine": _affine_views,
}


def tta_mode(tta: bool | str | None) -> str:
    """The TTA mode name of a ``tta`` argument: False/None -> "none", True -> "flip", names pass through."""
    name = tta if isinstance(tta, str) else ("flip" if tta else "none")
    if name not in TTA_MODES:
        raise ValueError(f"unknown test-time augmentation {tta!r}; choose one of {', '.join(TTA_MODES)}")
    return name


def tta_views(x01: torch.Tensor, tta: bool | str | None) -> list[torch.Tensor]:
    """The test-time views of images (B, C, H, W) in [0, 1] (each the same shape), the image itself first."""
    return TTA_MODES[tta_mode(tta)](x01)


class TTAViews(torch.nn.Module):
    """The views of :func:`tta_views` as one batch: (B, C, H, W) in [0, 1] -> (V * B, C, H, W), view-major.

    The affine mode's sampling grids are computed once for ``input_size``, so the module traces to a graph of
    pads, slices, flips and grid samples (the ONNX export); its views equal :func:`tta_views`'.
    """

    def __init__(self, mode: str = "none", input_size: tuple[int, int] = (48, 48)) -> None:
        super().__init__()
        self.mode = tta_mode(mode)
        h, w = input_size
        grids = [zoom_rotate_grid(h, w, z, d) for z, d in _affine_params()] if self.mode == "affine" else []
        self.grid_names = [f"grid{i}" for i in range(len(grids))]  # (1, H, W, 2) each, one per warped view
        for name, grid in zip(self.grid_names, grids, strict=True):
            self.register_buffer(name, grid, persistent=False)

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        if self.mode == "none":
            return x01
        if self.mode == "flip":
            views = [x01, hflip(x01)]
        else:
            views = _shift_views(x01)
            if self.mode == "affine":
                views += _pairs([zoom_rotate(x01, grid=getattr(self, n).to(x01.dtype)) for n in self.grid_names])
        return torch.cat(views)


def tta_view_count(tta: bool | str | None, image_shape: tuple[int, ...]) -> int:
    """How many views :func:`tta_views` makes of images of ``image_shape`` (C, H, W)."""
    return len(tta_views(torch.zeros(1, *image_shape), tta))


def _uniform(n: int, bound: float, g: torch.Generator) -> torch.Tensor:
    return (torch.rand(n, generator=g) * 2 - 1) * bound


def random_affine_matrices(n: int, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """(n, 2, 3) affine matrices in affine_grid's normalised coordinates."""
    rot = torch.deg2rad(_uniform(n, cfg.rotation, g))
    shear = torch.deg2rad(_uniform(n, cfg.shear, g))
    zoom = 1.0 + _uniform(n, cfg.zoom, g)  # >1 zooms out (samples a wider area)
    tx = _uniform(n, 2 * cfg.shift, g)  # normalised coords span 2
    ty = _uniform(n, 2 * cfg.shift, g)
    cos, sin = torch.cos(rot), torch.sin(rot)
    # rotation @ shear @ zoom, as 2x2 blocks: R = [[c, -s], [s, c]], Sh = [[1, -tan(sh)], [0, 1]]
    t = torch.tan(shear)
    a = torch.stack([cos, -cos * t - sin, sin, -sin * t + cos], dim=1).view(n, 2, 2) * zoom.view(n, 1, 1)
    return torch.cat([a, torch.stack([tx, ty], dim=1).view(n, 2, 1)], dim=2)  # (n, 2, 3)


def random_crop(x: torch.Tensor, pad: int, g: torch.Generator) -> torch.Tensor:
    """Pad (B, C, H, W) by ``pad`` zeros and crop a random H x W window per image."""
    b, c, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))  # (B, C, H+2p, W+2p)
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=g).to(x.device)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=g).to(x.device)
    rows = (oy.view(b, 1) + torch.arange(h, device=x.device).view(1, h)).view(b, 1, h, 1).expand(b, c, h, w + 2 * pad)
    xp = xp.gather(2, rows)  # (B, C, H, W+2p)
    cols = (ox.view(b, 1) + torch.arange(w, device=x.device).view(1, w)).view(b, 1, 1, w).expand(b, c, h, w)
    return xp.gather(3, cols)  # (B, C, H, W)


def random_erase(x: torch.Tensor, p: float, g: torch.Generator, area=(0.02, 0.2), ratio=(0.3, 3.3)) -> torch.Tensor:
    """Random erasing (Zhong et al. 2017): with probability p per image, fill a rectangle with uniform noise."""
    b, _, h, w = x.shape
    apply = torch.rand(b, generator=g) < p
    s = torch.empty(b).uniform_(*area, generator=g) * h * w
    log_r = torch.empty(b).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=g)
    r = torch.exp(log_r)
    eh = torch.sqrt(s * r).clamp(1, h).round()
    ew = torch.sqrt(s / r).clamp(1, w).round()
    y0 = (torch.rand(b, generator=g) * (h - eh + 1)).floor()
    x0 = (torch.rand(b, generator=g) * (w - ew + 1)).floor()
    yy = torch.arange(h).view(1, h, 1)
    xx = torch.arange(w).view(1, 1, w)
    mask = (
        (yy >= y0.view(b, 1, 1)) & (yy < (y0 + eh).view(b, 1, 1))
        & (xx >= x0.view(b, 1, 1)) & (xx < (x0 + ew).view(b, 1, 1))
        & apply.view(b, 1, 1)
    ).unsqueeze(1)  # (B, 1, H, W)
    noise = torch.rand(x.shape, generator=g, dtype=x.dtype)
    return torch.where(mask.to(x.device), noise.to(x.device), x)


BLUR_MAX_SIGMA = 1.5  # the strongest training blur (pixels); the kernel below is its Gaussian


def _blur_kernel(sigma: float, dtype: torch.dtype) -> torch.Tensor:
    """A normalised 1-D Gaussian (K,) with radius 3 sigma."""
    r = max(1, math.ceil(3 * sigma))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=dtype) / sigma) ** 2)
    return k / k.sum()


MOTION_LENGTHS = (2.0, 9.0)  # training motion blur: line lengths (pixels), uniform
LOWRES_SIDES = (12, 40)  # training low resolution: the reduced side (pixels), uniform over the integers
JPEG_QUALITIES = (10, 90)  # training JPEG: qualities, uniform over the integers
# the JPEG standard's luminance quantisation table (ITU-T T.81, Annex K, Table K.1), quality 50
JPEG_LUMA = torch.tensor([
    [16, 11, 10, 16, 24, 40, 51, 61], [12, 12, 14, 19, 26, 58, 60, 55], [14, 13, 16, 24, 40, 57, 69, 56],
    [14, 17, 22, 29, 51, 87, 80, 62], [18, 22, 37, 56, 68, 109, 103, 77], [24, 35, 55, 64, 81, 104, 113, 92],
    [49, 64, 78, 87, 103, 121, 120, 101], [72, 92, 95, 98, 112, 100, 103, 99]], dtype=torch.float32)


def motion_kernels(lengths: torch.Tensor, angles: torch.Tensor, size: int) -> torch.Tensor:
    """Line-blur kernels (B, size, size), each summing to 1: a segment ``lengths`` (B,) pixels long through the
    centre at ``angles`` (B,) radians, anti-aliased over one pixel at its ends and across it."""
    r = (size - 1) / 2
    ys, xs = torch.meshgrid(torch.arange(size) - r, torch.arange(size) - r, indexing="ij")  # (K, K)
    cos, sin = angles.cos().view(-1, 1, 1), angles.sin().view(-1, 1, 1)
    along = xs * cos + ys * sin  # (B, K, K): position along the line
    across = ys * cos - xs * sin  # (B, K, K): distance from it
    half = ((lengths - 1) / 2).view(-1, 1, 1)
    w = (1 - across.abs()).clamp(min=0) * (half + 1 - along.abs()).clamp(0, 1)
    return w / w.sum((1, 2), keepdim=True)


def motion_blur(x: torch.Tensor, lengths: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Each image of x (B, C, H, W) blurred along a line of ``lengths`` (B,) pixels at ``angles`` (B,) radians."""
    b, c, h, w = x.shape
    size = 2 * math.ceil((float(lengths.max()) - 1) / 2 + 1) + 1  # odd, holds the longest segment
    k = motion_kernels(lengths.float(), angles.float(), size).to(x.device, x.dtype)  # (B, K, K)
    r = size // 2
    xp = F.pad(x.reshape(1, b * c, h, w), (r, r, r, r), mode="replicate")
    return F.conv2d(xp, k.repeat_interleave(c, 0).unsqueeze(1), groups=b * c).view(b, c, h, w)


def low_resolution(x: torch.Tensor, sides: torch.Tensor) -> torch.Tensor:
    """Each image of x (B, C, H, W) reduced to ``sides`` (B,) pixels a side (area) and enlarged back (bilinear)."""
    out = x.clone()
    for side in sides.unique().tolist():
        m = (sides == side).to(x.device)
        small = F.interpolate(x[m], size=(side, side), mode="area")
        out[m] = F.interpolate(small, size=x.shape[-2:], mode="bilinear", align_corners=False)
    return out


@functools.cache
def _dct_matrix(n: int = 8) -> torch.Tensor:
    """The orthonormal DCT-II matrix (n, n): JPEG's 8x8 transform is D @ block @ D.T."""
    k, i = torch.meshgrid(torch.arange(n, dtype=torch.float64), torch.arange(n, dtype=torch.float64), indexing="ij")
    d = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2 / n)
    d[0] /= math.sqrt(2)
    return d.float()


def jpeg_tables(qualities: torch.Tensor) -> torch.Tensor:
    """The luminance quantisation tables (B, 8, 8) of JPEG ``qualities`` (B,) 1-100, scaled as libjpeg does."""
    q = qualities.float().clamp(1, 100).view(-1, 1, 1)
    scale = torch.where(q < 50, 5000 / q, 200 - 2 * q)
    return ((JPEG_LUMA * scale + 50) / 100).floor().clamp(1, 255)


def jpeg(x: torch.Tensor, qualities: torch.Tensor) -> torch.Tensor:
    """Each grey image of x (B, 1, H, W) in [0, 1] compressed as a JPEG of ``qualities`` (B,) and decoded: its 8x8
    blocks' DCT coefficients quantised (H and W padded to multiples of 8, as an encoder does); same shape."""
    b, c, h, w = x.shape
    ph, pw = -h % 8, -w % 8
    v = F.pad(x * 255 - 128, (0, pw, 0, ph), mode="replicate")  # (B, C, H', W'), level-shifted as JPEG does
    hb, wb = v.shape[-2] // 8, v.shape[-1] // 8
    blocks = v.reshape(b, c, hb, 8, wb, 8).transpose(3, 4).float()  # (B, C, hb, wb, 8, 8)
    d = _dct_matrix().to(x.device)
    table = jpeg_tables(qualities).to(x.device).view(b, 1, 1, 1, 8, 8)
    coef = torch.round(d @ blocks @ d.T / table) * table
    out = (d.T @ coef @ d).transpose(3, 4).reshape(b, c, hb * 8, wb * 8)[..., :h, :w]
    return ((out + 128).round().clamp(0, 255) / 255).to(x.dtype)


def _where(on: torch.Tensor, x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """x (B, C, H, W) with the images where ``on`` (B,) bool (on the CPU) replaced by ``fn`` of them (only they
    are computed)."""
    if not on.any():
        return x
    idx = on.nonzero().squeeze(1).to(x.device)
    return x.index_copy(0, idx, fn(x[idx]))


def photometric(x: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """Random brightness, contrast, gamma, blur, motion blur, noise, low resolution and JPEG per image of x
    (B, C, H, W) in [0, 1]; same shape."""
    b = x.shape[0]
    if cfg.gamma:
        log_g = _uniform(b, math.log(cfg.gamma), g).to(x.device, x.dtype).view(b, 1, 1, 1)
        x = x.clamp(1e-6, 1.0).pow(torch.exp(log_g))
    if cfg.contrast:
        mean = x.mean((1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
        x = (x - mean) * (1 + _uniform(b, cfg.contrast, g).to(x.device, x.dtype).view(b, 1, 1, 1)) + mean
    if cfg.brightness:
        x = x + _uniform(b, cfg.brightness, g).to(x.device, x.dtype).view(b, 1, 1, 1)
    if cfg.blur_p:
        # a blur of random strength: each image mixes with its sigma-1.5 blur by a random weight (0: sharp)
        k = _blur_kernel(BLUR_MAX_SIGMA, x.dtype).to(x.device)
        c, r = x.shape[1], (len(k) - 1) // 2
        blurred = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
        blurred = F.conv2d(F.pad(blurred, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1).repeat(c, 1, 1, 1),
                           groups=c)  # (B, C, H, W)
        w = (torch.rand(b, generator=g) * (torch.rand(b, generator=g) < cfg.blur_p)).to(x.device, x.dtype)
        x = torch.lerp(x, blurred, w.view(b, 1, 1, 1))
    if cfg.motion_blur_p:
        on = torch.rand(b, generator=g) < cfg.motion_blur_p
        lengths = MOTION_LENGTHS[0] + torch.rand(b, generator=g) * (MOTION_LENGTHS[1] - MOTION_LENGTHS[0])
        angles = torch.rand(b, generator=g) * math.pi
        x = _where(on, x, lambda some: motion_blur(some, lengths[on], angles[on]))
    if cfg.noise:
        sigma = (torch.rand(b, generator=g) * cfg.noise).to(x.device, x.dtype).view(b, 1, 1, 1)
        x = x + sigma * torch.randn(x.shape, generator=g, dtype=x.dtype).to(x.device)
    if cfg.lowres_p:
        on = torch.rand(b, generator=g) < cfg.lowres_p
        sides = torch.randint(LOWRES_SIDES[0], LOWRES_SIDES[1] + 1, (b,), generator=g)
        x = _where(on, x, lambda some: low_resolution(some.clamp(0.0, 1.0), sides[on]))
    if cfg.jpeg_p:
        on = torch.rand(b, generator=g) < cfg.jpeg_p
        qualities = torch.randint(JPEG_QUALITIES[0], JPEG_QUALITIES[1] + 1, (b,), generator=g)
        x = _where(on, x, lambda some: jpeg(some.clamp(0.0, 1.0), qualities[on]))
    return x.clamp(0.0, 1.0)


def augment(x01: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """Apply ``cfg`` to x01 (B, C, H, W) float in [0, 1]; returns the same shape, still in [0, 1].

    The random draws come from ``g`` (a CPU generator) and move to x01's device, so a batch on a GPU is augmented
    there with the same draws as on the CPU."""
    if cfg.is_identity:
        return x01
    b = x01.shape[0]
    x = x01
    if cfg.has_affine:
        theta = random_affine_matrices(b, cfg, g).to(x.device, x.dtype)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # (B, H, W, 2)
        pad_mode = "border" if cfg.fill == "nearest" else "zeros"
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode=pad_mode, align_corners=False)
    if cfg.hflip:
        flip = (torch.rand(b, generator=g) < 0.5).view(b, 1, 1, 1).to(x.device)
        x = torch.where(flip, hflip(x), x)
    if cfg.crop_pad:
        x = random_crop(x, cfg.crop_pad, g)
    if cfg.has_photometric:
        x = photometric(x, cfg, g)
    if cfg.erase_p:
        x = random_erase(x, cfg.erase_p, g)
    return x.clamp_(0.0, 1.0)


# Progressive resizing (as in fast.ai's DAWNBench runs and FFCV): early epochs train on smaller images, which
# cost about (side / full)^2 of the FLOPs, and the last ones at full size so the net ends matched to test images.
PROGRESSIVE_MULTIPLE = 8  # sides are multiples of this, so a 4-stage net's feature maps stay whole longer


def progressive_side(epoch: int, full: int, start: int, ramp_epochs: int) -> int:
    """The training image side of ``epoch`` (0-based): ``start`` at epoch 0, growing linearly to ``full`` at
    epoch ``ramp_epochs`` and full from there on, rounded down to a multiple of :data:`PROGRESSIVE_MULTIPLE`
    (never below ``start``). ``start`` 0 (or >= ``full``) turns it off: always ``full``."""
    if not start or start >= full or epoch >= ramp_epochs:
        return full
    side = start + (full - start) * epoch / ramp_epochs
    return max(start, int(side) // PROGRESSIVE_MULTIPLE * PROGRESSIVE_MULTIPLE)


def resize(x: torch.Tensor, side: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, side, side), bilinear with antialiasing (a no-op at the same size)."""
    if x.shape[-2:] == (side, side):
        return x
    return F.interpolate(x, size=(side, side), mode="bilinear", antialias=True, align_corners=False)


def expand_offline(
    images: np.ndarray, labels: np.ndarray, copies: int, cfg: AugmentConfig, seed: int = 0, batch: int = 4096
) -> tuple[np.ndarray, np.ndarray]:
    """Offline expansion (as report 002 did): the originals plus ``copies`` augmented copies of each.

    images: (N, H, W) uint8 -> ((1 + copies) * N, H, W) uint8; labels likewise repeated.
    """
    if copies <= 0:
        return images, labels
    g = torch.Generator().manual_seed(seed)
    out = [images]
    src = torch.from_numpy(images).unsqueeze(1)  # (N, 1, H, W) uint8
    for _ in range(copies):
        for i in range(0, len(src), batch):
            xb = augment(src[i : i + batch].float() / 255.0, cfg, g)
            out.append((xb * 255.0).round().to(torch.uint8).squeeze(1).numpy())
    return np.concatenate(out), np.tile(labels, copies + 1)


def _beta(alpha: float, g: torch.Generator) -> float:
    """One draw of Beta(alpha, alpha) from ``g`` (as two Gamma draws, via NumPy seeded from ``g``)."""
    rng = np.random.default_rng(int(torch.randint(2**62, (1,), generator=g)))
    return float(rng.beta(alpha, alpha))


def mix_batch(
    x: torch.Tensor, mixup: float, cutmix: float, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """Mixup (Zhang et al. 2018) or CutMix (Yun et al. 2019) of a batch with its own shuffled copy.

    x: (B, C, H, W) float. ``mixup`` / ``cutmix`` are the Beta(alpha, alpha) parameters (0: off); with both on,
    each batch uses one of them with equal chance (as timm does). Returns the mixed batch, the partner of each
    image ``perm`` (B,) (None when off) and the weight ``lam`` of the original images: the loss is
    lam * CE(out, y) + (1 - lam) * CE(out, y[perm]). For CutMix ``lam`` is the exact unpasted area fraction.
    """
    if mixup <= 0 and cutmix <= 0:
        return x, None, 1.0
    b, _, h, w = x.shape
    perm = torch.randperm(b, generator=g)
    use_cutmix = cutmix > 0 and (mixup <= 0 or bool(torch.rand(1, generator=g) < 0.5))
    lam = _beta(cutmix if use_cutmix else mixup, g)
    if not use_cutmix:
        return lam * x + (1.0 - lam) * x[perm], perm, lam
    # a box of area (1 - lam) * H * W at a uniform centre, clipped to the image
    cut_h, cut_w = int(h * math.sqrt(1.0 - lam)), int(w * math.sqrt(1.0 - lam))
    cy, cx = int(torch.randint(h, (1,), generator=g)), int(torch.randint(w, (1,), generator=g))
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
    out = x.clone()
    out[:, :, y0:y1, x0:x1] = x[perm][:, :, y0:y1, x0:x1]
    return out, perm, 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
