"""Warm start: a new run begins from a trained checkpoint's weights (fine-tuning), e.g. a FER2013 net
fine-tuned on FER+ labels.

The checkpoint must be the same architecture with the same model arguments. Every tensor is copied, except that
the tensors whose first dimension is the class count (the classifier's weight and bias) are copied row by row
for the classes both share by name; the rows of new classes (FER+'s Contempt) keep their fresh initialisation.
BatchNorm statistics come with the weights; the run's normaliser is fitted on its own training split as usual.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ferlab.checkpoint import CheckpointError
from ferlab.inference.loader import LoadedModel, load_model
from ferlab.models import create_model


@dataclass
class WarmStart:
    """What :func:`warm_start` did: the checkpoint, and which classes' classifier rows started fresh."""

    spec: str
    meta: dict[str, Any]
    new_classes: list[str] = field(default_factory=list)
    dropped_classes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        text = f"warm start from {self.spec} ({self.meta['model']['name']})"
        if self.new_classes:
            text += f"; classifier rows of {', '.join(self.new_classes)} start fresh"
        if self.dropped_classes:
            text += f"; its {', '.join(self.dropped_classes)} output(s) dropped"
        return text

    def record(self) -> dict[str, Any]:
        """What the run's metadata keeps about it."""
        return {"spec": self.spec, "model": self.meta["model"]["name"],
                "data_fingerprint": self.meta.get("data", {}).get("fingerprint"),
                "class_names": list(self.meta["class_names"]), "result": self.meta.get("result"),
                "new_classes": self.new_classes}


def class_tensors(model: str, model_args: dict[str, Any], num_classes: int) -> set[str]:
    """The names of the tensors of ``model`` whose first dimension is the class count (found by building it
    with one class more and seeing which tensors change shape)."""
    a = create_model(model, num_classes=num_classes, **model_args).state_dict()
    b = create_model(model, num_classes=num_classes + 1, **model_args).state_dict()
    return {name for name, t in a.items() if t.shape != b[name].shape}


def load_source(spec: str) -> LoadedModel:
    """The single checkpoint ``spec`` names (a run directory, file or shipped name); an ensemble is refused."""
    loaded = load_model(spec)
    if not isinstance(loaded, LoadedModel):
        raise CheckpointError(f"init_from {spec}: an ensemble has no single set of weights to start from; name one "
                              f"of its members ({', '.join(m.source for m in loaded.members)})")
    return loaded


def warm_start(net: nn.Module, spec: str, model: str, model_args: dict[str, Any],
               class_names: Sequence[str]) -> WarmStart:
    """Copy the weights of checkpoint ``spec`` into ``net`` (built as ``model`` with ``model_args`` for
    ``class_names``), in place; raise :class:`CheckpointError` when they cannot fit."""
    source = load_source(spec)
    theirs = source.meta["model"]
    if theirs["name"] != model or dict(theirs.get("args") or {}) != dict(model_args):
        raise CheckpointError(f"init_from {spec}: it is {theirs['name']} with arguments {theirs.get('args') or {}}, "
                              f"not this run's {model} with {model_args}")
    src_classes = list(source.class_names)
    shared = [c for c in class_names if c in src_classes]
    if not shared:
        raise CheckpointError(f"init_from {spec}: its classes {src_classes} share none with this run's "
                              f"{list(class_names)}")
    rows_to = torch.tensor([list(class_names).index(c) for c in shared])  # (S,)
    rows_from = torch.tensor([src_classes.index(c) for c in shared])  # (S,)
    target = net.state_dict()
    loaded = source.module.state_dict()
    if set(target) != set(loaded):
        raise CheckpointError(f"init_from {spec}: its tensors {sorted(set(loaded) ^ set(target))[:4]} do not match "
                              "this run's model")
    per_class = class_tensors(model, model_args, len(class_names))
    out: dict[str, torch.Tensor] = {}
    for name, want in target.items():
        have = loaded[name].to(device=want.device, dtype=want.dtype)  # the run's net may be on a GPU
        if name in per_class and have.shape[1:] == want.shape[1:]:  # the classifier: the shared classes' rows
            fresh = want.clone()
            fresh[rows_to] = have[rows_from]
            out[name] = fresh
        elif name not in per_class and have.shape == want.shape:
            out[name] = have
        else:
            raise CheckpointError(f"init_from {spec}: tensor {name} is {tuple(have.shape)} there, "
                                  f"{tuple(want.shape)} here")
    net.load_state_dict(out)
    return WarmStart(spec, source.meta, [c for c in class_names if c not in src_classes],
                     [c for c in src_classes if c not in class_names])
