"""Explain a batch of faces end to end: predictions, heat maps, faithfulness, and the files `ferlab explain` writes."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ferlab.explain.faithfulness import Faithfulness, deletion_insertion
from ferlab.explain.inputs import Faces
from ferlab.explain.methods import baseline_value, eval_mode, get_explainer
from ferlab.transforms import Normalizer


@dataclass
class Explanation:
    """Heat maps (N, H, W) in [0, 1] for classes ``targets`` (N,), the model's ``probs`` (N, K), and the
    faithfulness curves (None when skipped)."""

    method: str
    heat: torch.Tensor
    targets: torch.Tensor
    probs: torch.Tensor
    baseline: float
    faithfulness: Faithfulness | None
    seconds: dict[str, float]


def parse_target(target: str | int | None, class_names: list[str], labels: np.ndarray | None) -> Any:
    """``predicted`` / None -> None; ``true`` -> the labels (N,); a class name or index -> int."""
    if target is None or target == "predicted":
        return None
    if target == "true":
        if labels is None or not len(labels) or (np.asarray(labels) < 0).any():
            raise ValueError("--target true needs labelled faces: use --images data:SPLIT[:N] "
                             "(image files carry no label)")
        return torch.as_tensor(np.asarray(labels), dtype=torch.long)
    if isinstance(target, int) or str(target).isdigit():
        k = int(target)
        if not 0 <= k < len(class_names):
            raise ValueError(f"target class {k} out of range 0..{len(class_names) - 1}")
        return k
    lower = [c.lower() for c in class_names]
    if str(target).lower() in lower:
        return lower.index(str(target).lower())
    raise ValueError(f"unknown target {target!r}: use predicted, true, a class index or one of "
                     f"{', '.join(class_names)}")


def explain_images(
    model: nn.Module,
    normalizer: Normalizer,
    images: np.ndarray | torch.Tensor,
    method: str = "gradcam",
    *,
    target: Any = None,
    faithfulness: bool = True,
    faith_steps: int = 10,
    batch_size: int = 64,
    temperature: float = 1.0,
    **options: Any,
) -> Explanation:
    """Explain uint8 faces ``images`` (N, 48, 48) or (N, 1, 48, 48): predictions, heat maps and faithfulness.

    ``target``: None (predicted class), an int, or (N,) classes. The baseline (integrated gradients,
    occlusion, deletion/insertion) defaults to the normalised mean grey (:func:`baseline_value`).
    ``temperature``: the model's calibration (a shipped model's), applied to the probabilities reported, as
    ``predict`` and ``serve`` report them (the predicted class is the same either way).
    """
    from ferlab.explain.methods import resolve_target

    x01 = torch.as_tensor(np.asarray(images)).float().div(255.0)
    x01 = x01[:, None] if x01.dim() == 3 else x01  # (N, 1, H, W)
    x = normalizer(x01)  # (N, 1, H, W) model input
    baseline = float(options.pop("baseline", baseline_value(normalizer)))
    explainer = get_explainer(method, model, baseline=baseline, **options)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    with eval_mode(model):
        targets, probs = [], []
        for i in range(0, len(x), batch_size):
            tg = target[i:i + batch_size] if isinstance(target, torch.Tensor) else target
            t, p = resolve_target(model, x[i:i + batch_size], tg)
            targets.append(t)
            probs.append(p)
    t_all, p_all = torch.cat(targets), torch.cat(probs)
    if temperature != 1.0:  # softmax(z / T) from softmax(z): the log-sum-exp constant cancels
        p_all = (p_all.clamp_min(1e-30).log() / temperature).softmax(1)
    heat = torch.cat([explainer.explain(x[i:i + batch_size], t_all[i:i + batch_size])
                      for i in range(0, len(x), batch_size)])  # (N, H, W)
    seconds["attribution"] = time.perf_counter() - t0
    faith = None
    if faithfulness:
        t0 = time.perf_counter()
        faith = deletion_insertion(model, x, heat, t_all, baseline=baseline, steps=faith_steps)
        seconds["faithfulness"] = time.perf_counter() - t0
    return Explanation(method, heat, t_all, p_all, baseline, faith, seconds)


def _label(names: list[str], k: int) -> str | None:
    return names[k] if 0 <= k < len(names) else None


def write_explanations(
    exp: Explanation,
    faces: Faces,
    class_names: list[str],
    out_dir: str | Path,
    *,
    threshold: float = 0.7,
    model_name: str = "",
    per_image: bool = True,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write one PNG per face (face, map, overlay, mask), ``grid-METHOD.png`` and ``explain-METHOD.json``."""
    from ferlab.explain.figures import caption, explanation_figure, grid_figure, save_figure

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pred = exp.probs.argmax(1)
    faith = exp.faithfulness.per_image() if exp.faithfulness is not None else [None] * len(faces)
    rows, titles, correct = [], [], []
    for i in range(len(faces)):
        p, t, y = int(pred[i]), int(exp.targets[i]), int(faces.labels[i])
        title = caption(class_names[p], float(exp.probs[i, p]), _label(class_names, y), class_names[t])
        titles.append(title)
        correct.append(None if y < 0 else p == y)
        row = {"name": faces.names[i], "predicted": class_names[p], "probability": round(float(exp.probs[i, p]), 4),
               "true": _label(class_names, y), "target": class_names[t],
               "target_probability": round(float(exp.probs[i, t]), 4), "faithfulness": faith[i]}
        if per_image:
            fname = f"{i:03d}-{_safe(faces.names[i])}-{exp.method}.png"
            fig = explanation_figure([faces.images[i] / 255.0], [exp.heat[i]], titles=[f"{faces.names[i]}: {title}"],
                                     threshold=threshold, method=exp.method)
            save_figure(fig, out / fname)
            row["figure"] = fname
        rows.append(row)
    head = f"{model_name} | {exp.method}" + (f" | {len(faces)} faces" if len(faces) > 1 else "")
    grid = save_figure(grid_figure(faces.images / 255.0, exp.heat, titles=[_short(t) for t in titles],
                                   correct=correct if faces.labelled else None, suptitle=head),
                       out / f"grid-{exp.method}.png")
    labelled = faces.labels >= 0
    report = {
        "model": model_name, "method": exp.method, "threshold": threshold, "baseline": exp.baseline,
        "n_images": len(faces),
        "accuracy": float((pred.numpy()[labelled] == faces.labels[labelled]).mean()) if labelled.any() else None,
        "faithfulness": exp.faithfulness.summary() if exp.faithfulness is not None else None,
        "seconds": {k: round(v, 3) for k, v in exp.seconds.items()},
        "grid": grid.name, "images": rows, **(extra or {}),
    }
    (out / f"explain-{exp.method}.json").write_text(json.dumps(report, indent=2))
    return report


def _short(title: str) -> str:
    """Grid caption: 'Happy .93 / Sad'."""
    return title.replace("pred ", "").replace(" | true ", "\ntrue ").replace(" | map for ", "\nmap ")


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:40]
