"""Honest evaluation of checkpoints and their ensembles on a chosen split."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from ferlab.data.source import data_for, same_pixels, shared_classes, split_rows  # noqa: F401 (part of this module's API)
from ferlab.inference import loader
from ferlab.inference.calibration import ece, log_probabilities, scaled_probabilities
from ferlab.inference.loader import load_members
from ferlab.inference.predict import combine, member_weights
from ferlab.transforms import tta_mode


def classification_metrics(labels: np.ndarray, probs: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """Accuracy, per-class precision/recall/F1, the confusion matrix (counts and row-normalised), top confusions."""
    k = len(class_names)
    pred = probs.argmax(1)
    p, r, f1, support = precision_recall_fscore_support(labels, pred, labels=range(k), zero_division=0)
    cm = confusion_matrix(labels, pred, labels=range(k))
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    off = [(norm[i, j], i, j) for i in range(k) for j in range(k) if i != j and cm[i, j] > 0]
    off.sort(reverse=True)
    return {
        "n": int(len(labels)),
        "accuracy": float((pred == labels).mean()) if len(labels) else float("nan"),
        "per_class": {
            name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f1[i]), "support": int(support[i])}
            for i, name in enumerate(class_names)
        },
        "macro_f1": float(f1.mean()),
        "confusion": cm.tolist(),
        "confusion_normalized": norm.round(4).tolist(),
        "most_confused": [
            {"true": class_names[i], "predicted": class_names[j], "rate": float(v), "count": int(cm[i, j])}
            for v, i, j in off[:5]
        ],
    }


def checkpoint_precision(meta: dict[str, Any], requested: str = "auto") -> str:
    """The precision to run a checkpoint (its metadata ``meta``) in; see
    :func:`ferlab.inference.loader.checkpoint_precision`."""
    return loader.checkpoint_precision(str(meta.get("train", {}).get("precision", "fp32")), requested)


def evaluate_checkpoints(
    paths: Sequence[str | Path],
    *,
    split: str = "test",
    data_path: str | None = None,
    tta: bool | str = False,
    batch_size: int = 512,
    out_dir: str | Path | None = None,
    progress: bool = True,
    precision: str = "auto",
    labels: str | None = None,
    skip_bad: bool | None = None,
) -> dict[str, Any]:
    """Evaluate each checkpoint on ``split`` and, given several, the ensemble of their averaged probabilities;
    ``tta``: a test-time augmentation of :data:`ferlab.transforms.TTA_MODES` (True: "flip"); ``precision``: see
    :func:`checkpoint_precision`.

    ``labels``: the label source to score against (see :func:`ferlab.data.source.label_source`; default: the one
    the first checkpoint was trained on). Scoring 7-class FER2013 models against 8-class FER+ labels leaves out the
    faces FER+ calls Contempt; an 8-class FER+ model scored against FER2013 labels has its Contempt output dropped.

    ``skip_bad``: skip the data's malformed rows (None: as the first checkpoint's training run did).

    Writes metrics.json and confusion.png (counts and row-normalised) to ``out_dir``.
    """
    tta = tta_mode(tta)
    model = load_members(list(paths))
    loaded = model.members  # an ensemble's name contributes its members
    first_meta = loaded[0].meta
    data = data_for(first_meta, data_path, progress, labels=labels, skip_bad=skip_bad)
    idx = split_rows(data, first_meta, split)
    class_names = loaded[0].class_names
    idx, keep_outputs, label_note = shared_classes(data, idx, class_names)
    x = torch.from_numpy(data.images[idx]).unsqueeze(1)  # (N, 1, 48, 48) uint8
    y = data.labels[idx]
    class_names = class_names[:keep_outputs]

    members, probs_all = [], []
    weights = member_weights(model.weights, len(loaded))  # (M,) summing to 1: equal unless the ensemble weighs them
    for m, weight in zip(loaded, weights, strict=True):
        # an ensemble averages its members' uncalibrated probabilities, then applies its own temperature (below)
        probs = m.probabilities(x, tta=tta, batch_size=batch_size, progress=progress, desc=Path(m.source).name,
                                precision=precision, calibrated=len(loaded) == 1)
        if keep_outputs < probs.shape[1]:  # members share their classes (load_members checks)
            probs = probs[:, :keep_outputs] / probs[:, :keep_outputs].sum(1, keepdims=True)
        probs_all.append(probs)
        fp_ok = same_pixels(m.meta, data)  # also without --data: the file may have changed
        result = m.meta.get("result", {})
        members.append({
            "checkpoint": m.source, "model": m.architecture, "accuracy": float((probs.argmax(1) == y).mean()),
            "best_epoch": result.get("epoch"), "val_acc_at_selection": result.get("val_acc"),
            "same_data_as_training": fp_ok, "precision": m.run_precision(precision), "weight": float(weight),
        })
    probs = combine(probs_all, model.weights)
    t = model.temperature(tta) if len(loaded) > 1 else 1.0  # a shipped ensemble's calibration
    if t != 1.0:
        probs = scaled_probabilities(log_probabilities(probs), t)
    metrics = classification_metrics(y, probs, class_names)
    metrics["ece"] = ece(probs, y) if len(y) else float("nan")  # calibration of the probabilities scored
    report = {
        "split": split, "data": data.source, "data_fingerprint": data.fingerprint, "tta": tta,
        "labels": "ferplus" if data.targets is not None else "source", "label_note": label_note,
        "protocol": first_meta["split"]["text"], "members": members,
        "ensemble": len(loaded) > 1, **metrics,
    }
    if out_dir is not None:
        from ferlab.plots import plot_confusion

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(report, indent=2))
        name = "ensemble of " + ", ".join(m["model"] for m in members) if len(members) > 1 else members[0]["model"]
        plot_confusion(np.array(metrics["confusion"]), class_names, out / "confusion.png",
                       title=f"{name} on {split} ({data.source}); accuracy {metrics['accuracy']:.4f}")
        report["outputs"] = {"metrics": str(out / "metrics.json"), "confusion": str(out / "confusion.png")}
    return report


def format_report(report: dict[str, Any]) -> str:
    """A plain-text rendering of :func:`evaluate_checkpoints`' result."""
    lines = [f"split {report['split']} of {report['data']} ({report['n']:,} images); protocol: {report['protocol']}"]
    if report.get("labels") == "ferplus":
        lines.append("labels: FER+ majority votes" + (f"; {report['label_note']}" if report["label_note"] else ""))
    elif report.get("label_note"):
        lines.append(f"labels: {report['label_note']}")
    for m in report["members"]:
        warn = "" if m["same_data_as_training"] else "  (data differs from training data)"
        weight = f"  weight {m['weight']:.3f}" if len({x.get("weight") for x in report["members"]}) > 1 else ""
        lines.append(f"  {m['model']:<18} acc {m['accuracy']:.4f}  [{m['checkpoint']}]{weight}{warn}")
    label = f"ensemble of {len(report['members'])}" if report["ensemble"] else "accuracy"
    lines.append(f"{label}: {report['accuracy']:.4f}   macro-F1 {report['macro_f1']:.4f}   "
                 f"ECE {report.get('ece', float('nan')):.4f}"
                 + (f"   ({report['tta']} TTA)" if report["tta"] not in (False, "none") else ""))
    lines.append(f"  {'class':<10} {'precision':>9} {'recall':>7} {'f1':>6} {'support':>8}")
    for name, c in report["per_class"].items():
        lines.append(f"  {name:<10} {c['precision']:9.3f} {c['recall']:7.3f} {c['f1']:6.3f} {c['support']:8d}")
    if report["most_confused"]:
        lines.append("most confused: " + "; ".join(
            f"{c['true']} -> {c['predicted']} {c['rate']:.0%}" for c in report["most_confused"][:3]))
    if "outputs" in report:
        lines.append(f"wrote {report['outputs']['metrics']} and {report['outputs']['confusion']}")
    return "\n".join(lines)
