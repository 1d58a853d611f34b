"""Model registry: ``register_model``, ``create_model``, ``list_models`` (as in timm)."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from ferlab.models.base import FerModel


@dataclass(frozen=True)
class ModelEntry:
    """What the registry knows about one architecture."""

    name: str
    factory: Callable[..., FerModel]
    source: str  # where the architecture comes from, e.g. "report 002" or "ferlab"
    description: str


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, *, source: str, description: str = "") -> Callable:
    """Decorator registering a factory ``fn(num_classes=7, in_chans=1, **kw) -> FerModel``."""

    def deco(fn: Callable[..., FerModel]) -> Callable[..., FerModel]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        doc = description or (fn.__doc__ or "").strip().split("\n")[0]
        _REGISTRY[name] = ModelEntry(name, fn, source, doc)
        return fn

    return deco


def _ensure_loaded() -> None:
    # Importing the zoo modules registers their models (no other side effect).
    import ferlab.models.zoo  # noqa: F401


def list_models(pattern: str = "*") -> list[str]:
    """Sorted names of the registered models matching a shell-style ``pattern``."""
    _ensure_loaded()
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def get_entry(name: str) -> ModelEntry:
    """The registry entry for ``name``; a clear error lists the known names."""
    _ensure_loaded()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(sorted(_REGISTRY))}") from None


def create_model(name: str, num_classes: int = 7, in_chans: int = 1, **kwargs) -> FerModel:
    """Build the registered model ``name``; ValueError for an option its factory does not take."""
    import inspect

    factory = get_entry(name).factory
    params = inspect.signature(factory).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(kwargs) - set(params))
        if unknown:
            options = [p for p in params if p not in ("num_classes", "in_chans")]
            raise ValueError(f"model {name} takes no option(s) {', '.join(unknown)}; its options: "
                             f"{', '.join(options) or 'none'}")
    model = factory(num_classes=num_classes, in_chans=in_chans, **kwargs)
    model.num_classes = num_classes
    model.in_chans = in_chans
    return model


def count_params(model: nn.Module) -> dict[str, int]:
    """Parameter counts: PyTorch ``trainable`` and the ``keras_total`` Keras would print.

    Keras counts 4 numbers per BatchNorm channel (gamma, beta, moving mean and
    variance); PyTorch's parameters hold 2, its buffers the other 2.
    """
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    bn_stats = sum(
        m.running_mean.numel() + m.running_var.numel()
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None
    )
    return {"trainable": trainable, "keras_total": trainable + frozen + bn_stats}
