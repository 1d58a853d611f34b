"""Explaining ferlab models: attribution maps, faithfulness, filter visualisation, feature maps.

Stable API::

    from ferlab.explain import attribute, METHODS
    heat = attribute(model, x, method="gradcam")  # x (B, 1, 48, 48) normalised input -> (B, 48, 48) in [0, 1]

Importing this package does not import torch or Captum; they load on first use.
"""

from __future__ import annotations

from typing import Any

METHODS: tuple[str, ...] = ("saliency", "smoothgrad", "integrated-gradients", "gradcam", "guided-gradcam", "occlusion")


def attribute(model: Any, x: Any, method: str = "gradcam", target: Any = None, **options: Any) -> Any:
    """Heat maps (B, H, W) float in [0, 1] (non-negative, detached, CPU) of ``method`` for ``x`` (B, 1, H, W).

    ``x`` is the normalised model input (apply the checkpoint's normaliser first); ``target`` is None (the
    predicted class), an int, or a (B,) tensor of classes. ``options``: ``baseline`` (model-input value of the
    reference image for integrated-gradients/occlusion; default 0.0, the training mean grey under ``dataset``
    normalisation; see :func:`ferlab.explain.methods.baseline_value`) and per-method settings.
    Raises ValueError for an unknown method, or for gradcam/guided-gradcam on a model without a spatial map (MLP).
    """
    from ferlab.explain.methods import attribute as _attribute

    return _attribute(model, x, method, target, **options)


__all__ = ["METHODS", "attribute"]
