"""The study's own figures (matplotlib, Agg, PNG): curves side by side, the Q3 bars, ensembles, faithfulness,
right/wrong example maps."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def _figure(w: float, h: float):
    from matplotlib.figure import Figure  # a bare Figure needs no pyplot state (Agg canvas on save)

    return Figure(figsize=(w, h), dpi=100)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    return path


def curves_side_by_side(histories: dict[str, list[dict[str, float]]], path: Path, title: str = "") -> Path:
    """Accuracy and loss per epoch (train dashed, val solid), one column per model, shared y axes per row."""
    from matplotlib.ticker import MaxNLocator

    fig = _figure(4.6 * len(histories), 6.4)
    axes = fig.subplots(2, len(histories), squeeze=False, sharey="row")
    for j, (name, hist) in enumerate(histories.items()):
        ep = [h["epoch"] for h in hist]
        for i, key in enumerate(("acc", "loss")):
            ax = axes[i, j]
            ax.plot(ep, [h[f"train_{key}"] for h in hist], "o--", ms=3, label="train")
            ax.plot(ep, [h[f"val_{key}"] for h in hist], "o-", ms=3, label="val")
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylabel("accuracy" if key == "acc" else "cross-entropy loss")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        axes[0, j].set_title(name, fontsize=10)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def grouped_bars(rows: Sequence[str], cols: Sequence[str], mean: np.ndarray, std: np.ndarray, path: Path,
                 ylabel: str, title: str = "") -> Path:
    """Bars of ``mean`` (R, C) with ``std`` error bars, grouped by row."""
    fig = _figure(7.5, 3.8)
    ax = fig.subplots()
    width = 0.8 / len(cols)
    x = np.arange(len(rows))
    for j, c in enumerate(cols):
        ax.bar(x + (j - (len(cols) - 1) / 2) * width, mean[:, j], width, yerr=std[:, j], capsize=3, label=c)
    ax.set_xticks(x, rows)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, path)


def lines(x: Sequence[float], series: dict[str, Sequence[float]], path: Path, xlabel: str, ylabel: str,
          title: str = "", styles: dict[str, str] | None = None) -> Path:
    """One line per series over ``x``."""
    fig = _figure(6.4, 3.8)
    ax = fig.subplots()
    for name, y in series.items():
        ax.plot(x, y, (styles or {}).get(name, "o-"), ms=3, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, path)


def faithfulness_curves(fractions: np.ndarray, curves: dict[str, dict[str, np.ndarray]], path: Path,
                        title: str = "") -> Path:
    """Mean deletion (left) and insertion (right) curves per method, each with its random-order reference."""
    fig = _figure(10, 3.8)
    axes = fig.subplots(1, 2, sharey=True)
    for ax, kind in zip(axes, ("deletion", "insertion"), strict=True):
        for k, (method, c) in enumerate(curves.items()):
            colour = f"C{k}"
            ax.plot(fractions, c[kind].mean(0), "-", color=colour, label=method)
            ax.plot(fractions, c[f"{kind}_random"].mean(0), ":", color=colour, label=f"{method}: random order")
        ax.set_xlabel(f"fraction of pixels {'removed' if kind == 'deletion' else 'inserted'}")
        ax.set_title(kind, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("probability of the explained class")
    axes[1].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def example_maps(rows: list[dict], path: Path, title: str = "", threshold: float = 0.7) -> Path:
    """One row per class: for its right and its wrong example, the face, saliency and Grad-CAM overlays and the
    Grad-CAM mask (heat >= ``threshold``). ``rows``: dicts with ``class`` and ``right``/``wrong`` (None or a dict
    with ``face`` (H, W) in [0, 1], ``saliency``, ``gradcam`` (H, W) heat, ``caption``)."""
    from ferlab.explain.figures import overlay_rgb, threshold_mask

    heads = ("saliency", "Grad-CAM", f"Grad-CAM >= {threshold:g}")
    fig = _figure(12.5, 1.75 * len(rows) + 0.5)
    axes = fig.subplots(len(rows), 8, squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    for i, row in enumerate(rows):
        for half, key in enumerate(("right", "wrong")):
            ex = row[key]
            cells = axes[i, 4 * half:4 * half + 4]
            if ex is None:
                for ax in cells:
                    ax.axis("off")
                cells[0].text(0.0, 0.5, f"no {key} {row['class']} example", fontsize=8, transform=cells[0].transAxes)
                continue
            cells[0].imshow(ex["face"], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            cells[1].imshow(overlay_rgb(ex["face"], ex["saliency"]), interpolation="nearest")
            cells[2].imshow(overlay_rgb(ex["face"], ex["gradcam"]), interpolation="nearest")
            cells[3].imshow(threshold_mask(ex["face"], ex["gradcam"], threshold), cmap="gray", vmin=0, vmax=1,
                            interpolation="nearest")
            cells[0].set_title(f"{key}: {ex['caption']}", fontsize=6.5, color="darkgreen" if key == "right" else
                               "firebrick")
            for ax, head in zip(cells[1:], heads, strict=True):
                ax.set_title(head, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)
