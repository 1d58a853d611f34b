"""One loader for every way of naming a model: a run directory, a checkpoint file, a shipped name or a shipped
ensemble's name. It returns a typed :class:`LoadedModel` (or an :class:`Ensemble` of them) that carries what
inference needs, read once from the checkpoint's metadata: the module, its normaliser, class names, input size,
the precision it was trained in and where it came from. ONNX files load through
:func:`ferlab.inference.backends.open_backend`, which takes all of these too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ferlab import pretrained
from ferlab.checkpoint import load_checkpoint, normalizer_from_meta
from ferlab.hardware import resolve_precision
from ferlab.inference.calibration import log_probabilities, scaled_probabilities, temperature_for
from ferlab.inference.predict import combine, member_weights, predict_view_logits
from ferlab.transforms import Normalizer, tta_mode

ModelSpec = str | Path


def checkpoint_precision(trained: str, requested: str = "auto") -> str:
    """The precision to run a model in: ``auto`` is the one it was trained in (``trained``) where this CPU
    computes it natively, else fp32 (bf16 emulated on a CPU without bf16 instructions is several times slower)."""
    if requested != "auto":
        return resolve_precision(requested)[0]
    return "bf16" if trained == "bf16" and resolve_precision("auto")[0] == "bf16" else "fp32"


@dataclass
class LoadedModel:
    """A model ready for inference. ``module`` is in eval mode and owned by this object."""

    module: nn.Module
    normalizer: Normalizer
    class_names: list[str]
    input_size: tuple[int, int]
    trained_precision: str  # "bf16" or "fp32": what training ran in
    meta: dict[str, Any]  # the checkpoint's full metadata (training config, data, split protocol, result)
    source: str  # what was asked for: a shipped name, a run directory or a file
    path: Path | None = None  # the weights file read
    calibration: dict[str, Any] = field(default_factory=dict)  # a shipped model's fitted temperatures, by TTA mode

    @classmethod
    def from_checkpoint(cls, module: nn.Module, meta: dict[str, Any], source: str,
                        path: Path | None = None) -> LoadedModel:
        """Wrap a module and its checkpoint metadata (e.g. a model just trained, or a ``load_checkpoint`` pair)."""
        size = meta.get("preprocess", {}).get("input_size") or getattr(module, "input_size", (48, 48))
        return cls(module.eval(), normalizer_from_meta(meta), list(meta["class_names"]),
                   (int(size[0]), int(size[1])), str(meta.get("train", {}).get("precision", "fp32")), meta, source,
                   path)

    @property
    def architecture(self) -> str:
        """The registry name of the architecture (e.g. ``fer-resnet-s``)."""
        return str(self.meta["model"]["name"])

    @property
    def members(self) -> list[LoadedModel]:
        return [self]

    @property
    def weights(self) -> None:
        """Member weights: a single model has none (see :attr:`Ensemble.weights`)."""
        return None

    def run_precision(self, requested: str = "auto") -> str:
        """The precision this model runs in for ``requested`` (see :func:`checkpoint_precision`)."""
        return checkpoint_precision(self.trained_precision, requested)

    def view_logits(self, images: torch.Tensor, *, tta: bool | str = False, batch_size: int = 512,
                    precision: str = "auto", channels_last: bool = True, progress: bool = False,
                    desc: str | None = None) -> torch.Tensor:
        """Logits (V, N, K) for each test-time view of ``tta`` on images (N, 1, H, W) uint8, normalised as in
        training. ``channels_last`` (the trainer's fast path, about twice the images/s on a CPU) puts the module
        in that layout."""
        if channels_last:
            self.module.to(memory_format=torch.channels_last)
        return predict_view_logits(self.module, images, self.normalizer, batch_size=batch_size,
                                   precision=self.run_precision(precision), channels_last=channels_last, tta=tta,
                                   progress=progress, desc=desc or self.source)

    def temperature(self, tta: bool | str | None = "none") -> float:
        """The calibration temperature for TTA mode ``tta`` (1.0 for a model that has none)."""
        return temperature_for(self.calibration, tta_mode(tta))

    def probabilities(self, images: torch.Tensor, calibrated: bool = True, **kw: Any) -> np.ndarray:
        """Softmax probabilities (N, K) of the mean logits over the test-time views, divided by the model's
        temperature for that mode when ``calibrated`` (the argmax is the same either way). Keywords as
        :meth:`view_logits`."""
        z = self.view_logits(images, **kw).mean(0).numpy()  # (N, K)
        return scaled_probabilities(z, self.temperature(kw.get("tta", False)) if calibrated else 1.0)


@dataclass
class Ensemble:
    """Several loaded models whose probabilities are averaged (a shipped ensemble, or checkpoints named together).

    The members must share the class names and, when they carved their validation part out of the training
    split, the same carving (else one member's validation rows are another's training rows). ``weights``, one
    positive number per member (how often selection with replacement picked it), weights the mean; None: equal."""

    members: list[LoadedModel]
    source: str
    entry: dict[str, Any] = field(default_factory=dict)  # the shelf's entry for a shipped ensemble
    weights: list[float] | None = None

    def __post_init__(self) -> None:
        if not self.members:
            raise ValueError(f"{self.source}: an ensemble needs at least one member")
        if self.weights is not None:
            try:
                member_weights(self.weights, len(self.members))
            except ValueError as e:
                raise ValueError(f"{self.source}: {e}") from None
            self.weights = [float(w) for w in self.weights]
        check_compatible(self.members)

    @property
    def class_names(self) -> list[str]:
        return self.members[0].class_names

    @property
    def input_size(self) -> tuple[int, int]:
        return self.members[0].input_size

    @property
    def meta(self) -> dict[str, Any]:
        return self.members[0].meta

    @property
    def architecture(self) -> str:
        return "ensemble of " + ", ".join(m.architecture for m in self.members)

    def temperature(self, tta: bool | str | None = "none") -> float:
        """The ensemble's own calibration temperature for TTA mode ``tta`` (1.0 when it has none)."""
        return temperature_for(self.entry.get("calibration"), tta_mode(tta))

    def probabilities(self, images: torch.Tensor, calibrated: bool = True, **kw: Any) -> np.ndarray:
        """The mean of the members' uncalibrated probabilities (N, K), then, when ``calibrated``, the ensemble's
        own temperature applied to its log (so the argmax, and every stated accuracy, is the mean's); keywords as
        :meth:`LoadedModel.view_logits`."""
        p = combine([m.probabilities(images, calibrated=False, **kw) for m in self.members], self.weights)  # (N, K)
        t = self.temperature(kw.get("tta", False)) if calibrated else 1.0
        return p if t == 1.0 else scaled_probabilities(log_probabilities(p), t)


def check_compatible(members: list[LoadedModel]) -> None:
    """ValueError unless ``members`` can be averaged: same class names, same input size, same carved split."""
    first = members[0]
    for m in members[1:]:
        if m.class_names != first.class_names:
            raise ValueError(f"{m.source}: class names {m.class_names} differ from {first.class_names}")
        if m.input_size != first.input_size:
            raise ValueError(f"{m.source}: input size {m.input_size} differs from {first.input_size}")
        s, f = m.meta.get("split", {}), first.meta.get("split", {})
        if f.get("val_carved") and (s.get("val_fraction"), s.get("split_seed")) != (f.get("val_fraction"),
                                                                                    f.get("split_seed")):
            raise ValueError(f"{m.source}: its val part was carved with fraction {s.get('val_fraction')} and seed "
                             f"{s.get('split_seed')}, {first.source}'s with fraction {f.get('val_fraction')} and "
                             f"seed {f.get('split_seed')}: an ensemble needs members trained on the same split")


def load_model(spec: ModelSpec | LoadedModel | Ensemble) -> LoadedModel | Ensemble:
    """Load a run directory, checkpoint file, shipped name or shipped ensemble name (ready objects pass through).

    Raises :class:`~ferlab.checkpoint.CheckpointError`, FileNotFoundError or KeyError naming the problem.
    """
    if isinstance(spec, LoadedModel | Ensemble):
        return spec
    text = str(spec)
    if text.lower().endswith(".onnx"):
        raise ValueError(f"{spec}: an exported .onnx graph only predicts (`ferlab predict` and `ferlab serve` run it; "
                         "in Python, backend='onnx'); here, name the checkpoint or shipped model it was exported from")
    if not Path(text).exists() and pretrained.is_pretrained(text):
        entry = pretrained.pretrained_entry(text)  # warns for a renamed model; refuses a removed one
        if entry.get("kind") == "ensemble":
            # members are averaged uncalibrated: no calibration to look up for them
            return Ensemble([_load_single(m, {}) for m in entry["members"]], entry["name"], entry,
                            entry.get("weights"))
        return _load_single(entry["name"], entry.get("calibration"))
    return _load_single(text)


def _load_single(spec: str, calibration: dict[str, Any] | None = None) -> LoadedModel:
    """``spec`` loaded with ``calibration``; without one, a shipped file named by its path (or a copy of it) gets
    its manifest entry's, as by its name."""
    from ferlab.checkpoint import resolve

    path = resolve(spec)
    module, meta = load_checkpoint(path)
    loaded = LoadedModel.from_checkpoint(module, meta, source=spec, path=path)
    if calibration is None and (entry := pretrained.entry_for_file(path)) is not None:
        calibration = entry.get("calibration")
    loaded.calibration = dict(calibration or {})
    return loaded


def load_members(specs: list[ModelSpec] | tuple[ModelSpec, ...]) -> Ensemble | LoadedModel:
    """One model, or the ensemble of several specs (a shipped ensemble among them contributes its members with
    their weights). A model named twice, directly or through an ensemble, is loaded once and weighs twice, as in
    greedy selection with replacement."""
    loaded: dict[str, LoadedModel | Ensemble] = {}
    for s in specs:
        if str(s) not in loaded:
            loaded[str(s)] = load_model(s)
    if len(specs) == 1:
        return loaded[str(specs[0])]
    members: dict[str, LoadedModel] = {}  # by source, in order of first mention
    weight: dict[str, float] = {}
    for s in specs:
        x = loaded[str(s)]
        for m, w in zip(x.members, member_weights(x.weights, len(x.members)) * len(x.members), strict=True):
            members.setdefault(m.source, m)
            weight[m.source] = weight.get(m.source, 0.0) + float(w)
    w = [weight[k] for k in members]
    equal = all(abs(v - w[0]) < 1e-9 for v in w)
    return Ensemble(list(members.values()), " + ".join(str(s) for s in specs), weights=None if equal else w)
