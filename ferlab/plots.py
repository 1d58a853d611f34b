"""Figures: training curves and confusion matrices (matplotlib Figures rendered with Agg, PNG files)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def _figure(width: float, height: float):
    """A bare matplotlib Figure: no pyplot state, so no backend switch in the caller's process (a notebook's
    plots keep showing); it renders with Agg when saved."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def plot_history(history: Sequence[dict[str, float]], path: str | Path, title: str = "") -> None:
    """Accuracy and loss per epoch, train vs val, side by side; epochs trained on smaller images (progressive
    resizing) shaded."""
    ep = [h["epoch"] for h in history]
    sizes = {h["epoch"]: h["size"] for h in history if h.get("size") and not math.isnan(h["size"])}
    full = max(sizes.values(), default=0)
    small = [e for e, side in sizes.items() if side < full]
    fig = _figure(10, 4)
    axes = fig.subplots(1, 2)
    for ax, key in zip(axes, ("acc", "loss"), strict=True):
        if small:
            ax.axvspan(min(small) - 0.5, max(small) + 0.5, color="0.92", label=f"trained below {full:.0f}x{full:.0f}")
        ax.plot(ep, [h[f"train_{key}"] for h in history], "o-", ms=3, label="train")
        ax.plot(ep, [h[f"val_{key}"] for h in history], "o-", ms=3, label="val")
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy" if key == "acc" else "cross-entropy loss")
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_confusion(cm: np.ndarray, class_names: Sequence[str], path: str | Path, title: str = "") -> None:
    """Confusion matrix as counts and row-normalised (recall per true class), side by side."""
    cm = np.asarray(cm)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig = _figure(13, 5.5)
    axes = fig.subplots(1, 2)
    for ax, mat, fmt, name in ((axes[0], cm, "d", "counts"), (axes[1], norm, ".2f", "row-normalised")):
        im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        k = len(class_names)
        ax.set_xticks(range(k), class_names, rotation=45, ha="right")
        ax.set_yticks(range(k), class_names)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(name)
        for i in range(k):
            for j in range(k):
                ax.text(j, i, format(mat[i, j], fmt), ha="center", va="center", fontsize=8,
                        color="white" if norm[i, j] > 0.5 else "black")
        fig.colorbar(im, ax=ax, fraction=0.046)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_reliability(panels: Sequence[tuple[str, object, object]], path: str | Path, title: str = "") -> None:
    """Reliability diagrams, one panel per model: accuracy against mean confidence per confidence bin, before
    and after calibration. panels: (name, before, after), each a :class:`ferlab.inference.calibration.Reliability`.
    """
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = _figure(4.2 * cols, 4.2 * rows + 0.4)
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax in axes[len(panels):]:
        ax.axis("off")
    for ax, (name, before, after) in zip(axes, panels, strict=False):
        ax.plot([0, 1], [0, 1], ":", color="0.5", label="perfect calibration")
        for rel, label, style in ((before, "uncalibrated", "o--"), (after, "temperature-scaled", "s-")):
            keep = rel.count > 0
            ax.plot(rel.confidence[keep], rel.accuracy[keep], style, ms=4,
                    label=f"{label} (ECE {rel.ece:.1%})")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence (top probability)")
        ax.set_ylabel("accuracy")
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
