"""The corruption benchmark: a model's accuracy on clean faces and on every corruption x severity of them.

Built from a split's faces (PrivateTest to report, PublicTest to choose on) by :mod:`ferlab.corruptions` with a
seed, so one seed always gives the same benchmark. By default a seeded sample of 1,000 faces per split keeps
one model's run to about a minute on two CPU cores (13 corruptions x 5 severities = 65,000 predictions);
``faces=None`` takes them all. Reported as in ImageNet-C: clean accuracy, mean corruption accuracy (the mean over
all 65 cells) and the relative drop, (clean - mean) / clean.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ferlab.corruptions import CORRUPTIONS, DEFAULT_FACES, DEFAULT_SEED, SEVERITIES, corrupt
from ferlab.data.source import data_for, shared_classes, split_rows
from ferlab.inference.loader import Ensemble, LoadedModel, load_members
from ferlab.transforms import tta_mode


def sample_rows(rows: np.ndarray, faces: int | None, seed: int = DEFAULT_SEED) -> np.ndarray:
    """A seeded sample of ``faces`` of ``rows`` (all of them when None or more than there are), in row order."""
    rows = np.asarray(rows)
    if faces is None or faces >= len(rows):
        return rows
    if faces < 1:
        raise ValueError(f"faces must be >= 1, got {faces}")
    return np.sort(np.random.default_rng(seed).choice(rows, faces, replace=False))


def corrupted_sets(images: np.ndarray, seed: int = DEFAULT_SEED, corruptions: Sequence[str] | None = None
                   ) -> Iterator[tuple[str, int, np.ndarray]]:
    """(corruption, severity, faces (N, H, W) uint8) for every corruption and severity, built one at a time."""
    for name in corruptions or CORRUPTIONS:
        for severity in SEVERITIES:
            yield name, severity, corrupt(images, name, severity, seed)


@dataclass
class RobustnessResult:
    """Accuracy on the clean faces and per corruption and severity (``cells[name]`` has 5 accuracies)."""

    model: str
    n: int
    clean: float
    cells: dict[str, list[float]] = field(default_factory=dict)

    @property
    def mean_corruption(self) -> float:
        """The mean accuracy over every corruption and severity."""
        return float(np.mean([a for accs in self.cells.values() for a in accs]))

    @property
    def relative_drop(self) -> float:
        """(clean - mean corruption accuracy) / clean."""
        return (self.clean - self.mean_corruption) / self.clean if self.clean else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "n": self.n, "clean": self.clean, "mean_corruption": self.mean_corruption,
                "relative_drop": self.relative_drop, "per_corruption": {k: float(np.mean(v)) for k, v in
                                                                         self.cells.items()},
                "cells": self.cells}


def corruption_probabilities(model: LoadedModel | Ensemble, images: np.ndarray, *, seed: int = DEFAULT_SEED,
                             corruptions: Sequence[str] | None = None, tta: str = "none", batch_size: int = 512,
                             progress: bool = True, calibrated: bool = True) -> dict[tuple[str, int], np.ndarray]:
    """Probabilities (N, K) of ``model`` on the clean faces (key ``("clean", 0)``) and on every corrupted set;
    ``calibrated=False``: before the model's temperature (what an ensemble averages over its members)."""
    names = list(corruptions or CORRUPTIONS)
    out = {}

    def all_sets() -> Iterator[tuple[str, int, np.ndarray]]:
        yield "clean", 0, images
        yield from corrupted_sets(images, seed, names)

    total = 1 + len(names) * len(SEVERITIES)
    for name, severity, faces in tqdm(all_sets(), total=total, desc=f"{getattr(model, 'source', 'model')} corrupted",
                                      disable=not progress, leave=False):
        x = torch.from_numpy(np.ascontiguousarray(faces)).unsqueeze(1)  # (N, 1, H, W) uint8
        out[name, severity] = model.probabilities(x, tta=tta, batch_size=batch_size, calibrated=calibrated)
    return out


def score(probs: dict[tuple[str, int], np.ndarray], labels: np.ndarray, model: str, keep: int | None = None
          ) -> RobustnessResult:
    """Accuracies from :func:`corruption_probabilities`' output; ``keep``: score only the first ``keep`` outputs
    (an 8-class FER+ model against FER2013's 7 classes)."""

    def acc(p: np.ndarray) -> float:
        return float((p[:, :keep].argmax(1) == labels).mean())

    result = RobustnessResult(model, len(labels), acc(probs["clean", 0]))
    for (name, severity), p in probs.items():
        if name != "clean":
            result.cells.setdefault(name, [0.0] * len(SEVERITIES))[severity - 1] = acc(p)
    return result


def robustness(specs: Sequence[str], *, split: str = "test", data_path: str | None = None,
               faces: int | None = DEFAULT_FACES, seed: int = DEFAULT_SEED, corruptions: Sequence[str] | None = None,
               tta: bool | str = "none", labels: str | None = None, progress: bool = True) -> dict[str, Any]:
    """The corruption benchmark of one model or the ensemble of several on ``split`` (see the module docstring).

    ``labels``: the label source to score against (default: the first model's); a 7-class model against FER+
    leaves out the Contempt faces, an 8-class model against FER2013 has its Contempt output dropped.
    """
    unknown = [c for c in corruptions or [] if c not in CORRUPTIONS]
    if unknown:
        raise ValueError(f"unknown corruption(s) {', '.join(unknown)}; known: {', '.join(CORRUPTIONS)}")
    model = load_members(list(specs))
    data = data_for(model.meta, data_path, progress, labels=labels)
    rows = split_rows(data, model.meta, split)
    rows, keep, note = shared_classes(data, rows, model.class_names)
    rows = sample_rows(rows, faces, seed)
    probs = corruption_probabilities(model, data.images[rows], seed=seed, corruptions=corruptions, tta=tta_mode(tta),
                                     progress=progress)
    result = score(probs, data.labels[rows], " + ".join(map(str, specs)), keep)
    return {"split": split, "data": data.source, "seed": seed, "faces": len(rows), "tta": tta_mode(tta),
            "label_note": note,
            "labels": "ferplus" if data.targets is not None else "source",
            "protocol": model.meta["split"]["text"], **result.to_dict()}


def format_robustness(report: dict[str, Any]) -> str:
    """A plain-text table of :func:`robustness`' report: accuracy per corruption and severity."""
    lines = [f"{report['model']}: corruption benchmark on {report['split']} of {report['data']} "
             f"({report['faces']:,} faces, seed {report['seed']}); protocol: {report['protocol']}"]
    if report.get("label_note"):
        lines.append(f"labels: {report['label_note']}")
    lines.append(f"  {'corruption':<16} " + " ".join(f"{'sev ' + str(s):>7}" for s in SEVERITIES) + f" {'mean':>7}")
    for name, accs in report["cells"].items():
        lines.append(f"  {name:<16} " + " ".join(f"{a:>7.2%}" for a in accs) + f" {np.mean(accs):>7.2%}")
    lines.append(f"clean {report['clean']:.2%}   mean corruption accuracy {report['mean_corruption']:.2%}   "
                 f"relative drop {report['relative_drop']:.1%}")
    return "\n".join(lines)
