"""Attribution methods: one small :class:`Explainer` subclass per method, registered by name (Captum underneath).

Every explainer maps normalised model inputs ``x`` (B, 1, 48, 48) and target classes
(B,) to a raw attribution (B, 48, 48) (``__call__``); :meth:`Explainer.normalise`
turns that into a non-negative heat map scaled per image to [0, 1]. Signed methods
(integrated gradients, occlusion, Grad-CAM) keep the positive part, the evidence *for*
the target class; gradient methods (saliency, SmoothGrad, guided Grad-CAM) take the
magnitude.

The baseline of integrated gradients and occlusion (and of the faithfulness curves) is
a value in model-input space; the default 0.0 is the normalised value of the training
mean grey for ``dataset`` (and ``image``) normalisation. Use :func:`baseline_value` to
get the mean-grey value for any normaliser.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ferlab.transforms import Normalizer

# Images per forward pass when a method evaluates many perturbed copies (noise samples, path steps, patches):
# on CPU, batches of about 64 48x48 faces ran fastest (larger ones fall out of cache).
CHUNK = 64


# ----------------------------------------------------------------------------- helpers
class FeaturesModule(nn.Module):
    """``model.forward_features`` as a module, so a layer hook can sit on the model's stable hook point."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)  # (B, 1, 48, 48) -> (B, C, h, w)


class SplitModel(nn.Module):
    """``forward_head(features(x))`` with ``features`` a :class:`FeaturesModule` (Captum's layer for Grad-CAM)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.features = FeaturesModule(model)

    @property
    def model(self) -> nn.Module:
        return self.features.model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.features(x))  # (B, 1, 48, 48) -> (B, K)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode (BatchNorm statistics, no dropout) and restore its mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            yield model
    finally:
        model.train(was_training)


def baseline_value(normalizer: Normalizer) -> float:
    """The model-input value of a uniform grey image: the training mean (``dataset``) or 0.5 (other modes)."""
    grey = normalizer.mean if normalizer.mode == "dataset" else 0.5
    return float(normalizer(torch.full((1, 1, 2, 2), grey)).flatten()[0])


def has_spatial_features(model: nn.Module, x: torch.Tensor) -> tuple[bool, tuple[int, ...]]:
    """Whether ``model.forward_features`` gives a (B, C, h, w) map, and the shape it gives (one-image dry run)."""
    with torch.no_grad():
        f = model.forward_features(x[:1].detach())
    return f.dim() == 4, tuple(f.shape)


def resolve_target(model: nn.Module, x: torch.Tensor, target: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Target classes (B,) long and the model's probabilities (B, K) on ``x``.

    ``target``: None (the predicted class), an int (the same class for all), or a (B,) sequence/tensor.
    """
    with torch.no_grad():
        probs = model(x).float().softmax(1)  # (B, K)
    b, k = probs.shape
    if target is None:
        t = probs.argmax(1)
    elif isinstance(target, int):
        t = torch.full((b,), target, dtype=torch.long, device=x.device)
    else:
        t = torch.as_tensor(target, dtype=torch.long, device=x.device).flatten()
        if t.numel() == 1:
            t = t.expand(b).clone()
        if t.numel() != b:
            raise ValueError(f"target has {t.numel()} entries for a batch of {b} images")
    if int(t.min()) < 0 or int(t.max()) >= k:
        raise ValueError(f"target classes must be in 0..{k - 1}, got {t.tolist()}")
    return t, probs


def _check_input(x: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 1:
        raise ValueError(f"expected a (B, 1, H, W) float tensor, got {getattr(x, 'shape', type(x))}")
    return x.detach().float()


# ----------------------------------------------------------------------------- base class and registry
class Explainer:
    """Holds a model; ``explainer(x, target)`` -> raw attribution (B, H, W); ``normalise`` -> [0, 1] heat map."""

    name: ClassVar[str] = ""
    # How the raw (signed) attribution becomes a heat map: "abs" (magnitude) or "positive" (evidence for the target).
    reduce: ClassVar[str] = "abs"
    needs_spatial: ClassVar[bool] = False

    def __init__(self, model: nn.Module, baseline: float = 0.0, clip_percent: float = 1.0) -> None:
        """baseline: the model-input value of "no signal" (integrated gradients, occlusion; see
        :func:`baseline_value`); clip_percent: the top percent of a map clipped by :meth:`normalise`."""
        self.model = model
        self.baseline = float(baseline)
        self.clip_percent = float(clip_percent)

    def __call__(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """x: (B, 1, H, W) normalised input, target: (B,) long -> (B, H, W) raw attribution."""
        x = _check_input(x).clone().requires_grad_(True)
        target = torch.as_tensor(target, dtype=torch.long).flatten().to(x.device)
        with eval_mode(self.model):
            if self.needs_spatial:
                spatial, shape = has_spatial_features(self.model, x)
                if not spatial:
                    raise ValueError(f"{self.name} needs a CNN feature map, but {type(self.model).__name__}."
                                     f"forward_features gives shape {shape} (no spatial map, e.g. an MLP); "
                                     "use saliency, smoothgrad, integrated-gradients or occlusion")
            a = self.attribute(x, target)  # (B, 1, H, W)
        return a.detach().float().sum(1).cpu()  # (B, H, W)

    def attribute(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """x: (B, 1, H, W), target: (B,) -> (B, 1, H, W) attribution (subclasses)."""
        raise NotImplementedError

    def normalise(self, raw: torch.Tensor) -> torch.Tensor:
        """(B, H, W) raw attribution -> (B, H, W) non-negative heat map in [0, 1], per image.

        Divides by the image's (100 - ``clip_percent``)-th percentile and clips at 1, as Captum's visualisation
        does (``outlier_perc``): a few extreme gradient pixels would otherwise leave the rest of the map near 0
        (and the thresholded mask empty). ``clip_percent=0`` divides by the maximum.
        """
        heat = raw.abs() if self.reduce == "abs" else raw.clamp_min(0)
        flat = heat.flatten(1)  # (B, P)
        clip = self.clip_percent
        peak = flat.amax(1) if clip <= 0 else torch.quantile(flat, 1 - clip / 100, dim=1)  # (B,)
        peak = torch.where(peak > 0, peak, flat.amax(1)).clamp_min(1e-12)[:, None, None]  # (B, 1, 1)
        return (heat / peak).clamp(0, 1)

    def explain(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Heat maps (B, H, W) in [0, 1] for ``target`` (B,) classes."""
        return self.normalise(self(x, target))


EXPLAINERS: dict[str, type[Explainer]] = {}


def register(cls: type[Explainer]) -> type[Explainer]:
    EXPLAINERS[cls.name] = cls
    return cls


def explainer_parameters(method: str) -> dict[str, Any]:
    """The settings ``method``'s explainer takes, with their defaults (from its constructor's signature)."""
    import inspect

    params = inspect.signature(EXPLAINERS[method].__init__).parameters
    return {n: p.default for n, p in params.items() if n not in ("self", "model")}


def get_explainer(method: str, model: nn.Module, **options: Any) -> Explainer:
    """The explainer registered as ``method`` for ``model`` with ``options`` (its constructor's parameters);
    ValueError naming the known methods, or the parameters the method takes."""
    try:
        cls = EXPLAINERS[method]
    except KeyError:
        raise ValueError(f"unknown explanation method {method!r}; choose one of {', '.join(EXPLAINERS)}") from None
    unknown = sorted(set(options) - set(explainer_parameters(method)))
    if unknown:
        takes = ", ".join(f"{k}={v!r}" for k, v in explainer_parameters(method).items())
        raise ValueError(f"{method} takes no {', '.join(unknown)}; its settings: {takes}")
    return cls(model, **options)


# ----------------------------------------------------------------------------- methods
@register
class SaliencyExplainer(Explainer):
    """Vanilla gradient |d logit_c / d x| (Simonyan et al. 2014)."""

    name = "saliency"

    def attribute(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        from captum.attr import Saliency

        return Saliency(self.model).attribute(x, target=target, abs=True)


@register
class SmoothGradExplainer(Explainer):
    """SmoothGrad: |gradient| averaged over ``samples`` noisy copies (noise std = ``noise`` x the input range)."""

    name = "smoothgrad"

    def __init__(self, model: nn.Module, baseline: float = 0.0, clip_percent: float = 1.0, *, samples: int = 16,
                 noise: float = 0.15, seed: int = 0) -> None:
        super().__init__(model, baseline, clip_percent)
        if samples < 1 or noise < 0:
            raise ValueError(f"smoothgrad needs samples >= 1 and noise >= 0, got {samples} and {noise}")
        self.samples, self.noise, self.seed = int(samples), float(noise), int(seed)

    def attribute(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        from captum.attr import NoiseTunnel, Saliency

        samples = self.samples
        std = self.noise * float(x.max() - x.min())
        gen = torch.Generator().manual_seed(self.seed)
        # NoiseTunnel draws with torch.normal: fix the global seed for the call and restore the RNG state after it
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(2**31 - 1, (1,), generator=gen)))
            return NoiseTunnel(Saliency(self.model)).attribute(
                x, nt_type="smoothgrad", nt_samples=samples, nt_samples_batch_size=max(1, CHUNK // len(x)),
                stdevs=std, target=target, abs=True)


@register
class IntegratedGradientsExplainer(Explainer):
    """Integrated gradients from a uniform baseline (``baseline``, model-input units) in ``steps``
    Gauss-Legendre steps (default 16)."""

    name = "integrated-gradients"
    reduce = "positive"

    def __init__(self, model: nn.Module, baseline: float = 0.0, clip_percent: float = 1.0, *,
                 steps: int = 16) -> None:
        super().__init__(model, baseline, clip_percent)
        if steps < 1:
            raise ValueError(f"integrated-gradients needs steps >= 1, got {steps}")
        self.steps = int(steps)

    def attribute(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        from captum.attr import IntegratedGradients

        steps = self.steps
        return IntegratedGradients(self.model).attribute(
            x, baselines=self.baseline, target=target, n_steps=steps, method="gausslegendre",
            internal_batch_size=CHUNK)


@register
class GradCamExplainer(Explainer):
    """Grad-CAM on the output of ``forward_features`` (the last conv map), upsampled bilinearly to the input."""

    name = "gradcam"
    reduce = "positive"
    needs_spatial = True

    def attribute(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        from captum.attr import LayerGradCam

        split = SplitModel(self.model)
        cam = LayerGradCam(split, split.features).attribute(x, target=target, relu_attributions=True)  # (B, 1, h, w)
        return F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)  # (B, 1, H, W)


@register
class GuidedGradCamExplainer(Explainer):
    """Guided backpropagation x Grad-CAM (Selvaraju et al. 2017), via Captum's GuidedGradCam."""

    name = "guided-gradcam"
    needs_spatial = True

    def attribute(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        from captum.attr import GuidedGradCam

        # Guided backprop hooks every nn.ReLU; in-place ReLUs break backward hooks, so work on a private copy
        # without in-place activations (the caller's model is never modified).
        model = copy.deepcopy(self.model)
        for m in model.modules():
            if isinstance(m, nn.ReLU):
                m.inplace = False
        split = SplitModel(model)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Setting backward hooks on ReLU")
            return GuidedGradCam(split, split.features).attribute(x, target=target, interpolate_mode="bilinear")


@register
class OcclusionExplainer(Explainer):
    """Occlusion: the drop of the target logit when a ``window`` x ``window`` patch (moved by ``stride``)
    is replaced by the baseline, averaged over the patches covering each pixel."""

    name = "occlusion"
    reduce = "positive"

    def __init__(self, model: nn.Module, baseline: float = 0.0, clip_percent: float = 1.0, *, window: int = 6,
                 stride: int = 3) -> None:
        super().__init__(model, baseline, clip_percent)
        if window < 1 or stride < 1:
            raise ValueError(f"occlusion needs window >= 1 and stride >= 1, got {window} and {stride}")
        self.window, self.stride = int(window), int(stride)

    def attribute(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        from captum.attr import Occlusion

        w, s = self.window, self.stride
        return Occlusion(self.model).attribute(
            x, sliding_window_shapes=(1, w, w), strides=(1, s, s), baselines=self.baseline, target=target,
            perturbations_per_eval=max(1, CHUNK // len(x)))


METHODS: tuple[str, ...] = tuple(EXPLAINERS)


def attribute(
    model: nn.Module, x: torch.Tensor, method: str = "gradcam", target: Any = None, **options: Any
) -> torch.Tensor:
    """Heat maps (B, H, W) in [0, 1] (non-negative, detached, CPU) of ``method`` for inputs ``x`` (B, 1, H, W).

    ``x`` is the normalised model input; ``target`` None (the predicted class), an int, or (B,) classes.
    ``options``: ``baseline`` (model-input value; see :func:`baseline_value`) and per-method settings
    (smoothgrad ``samples``/``noise``, integrated-gradients ``steps``, occlusion ``window``/``stride``).
    """
    explainer = get_explainer(method, model, **options)
    x = _check_input(x)
    with eval_mode(model):
        t, _ = resolve_target(model, x, target)
    return explainer.explain(x, t)

