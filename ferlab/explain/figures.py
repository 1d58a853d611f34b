"""Figures of explanations: per-image rows (face, heat map, overlay, thresholded mask) and grids of many faces.

The array helpers (:func:`heat_rgb`, :func:`overlay_rgb`, :func:`threshold_mask`) return plain uint8/float
arrays, so a web page can use them without matplotlib figures.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

CMAP = "jet"


def _as_np(a) -> np.ndarray:
    return a.detach().cpu().numpy() if hasattr(a, "detach") else np.asarray(a)


def heat_rgb(heat, cmap: str = CMAP) -> np.ndarray:
    """(H, W) heat in [0, 1] -> (H, W, 3) uint8 colour-mapped."""
    from matplotlib import colormaps

    rgba = colormaps[cmap](np.clip(_as_np(heat), 0.0, 1.0))  # (H, W, 4) float
    return (rgba[..., :3] * 255).round().astype(np.uint8)


def overlay_rgb(face, heat, alpha: float = 0.6, cmap: str = CMAP) -> np.ndarray:
    """(H, W) face in [0, 1] (or uint8) and (H, W) heat in [0, 1] -> (H, W, 3) uint8 blend.

    The colour's opacity grows with the heat (``alpha`` at heat 1), so the face stays visible where the map is cold.
    """
    f = _as_np(face).astype(np.float32)
    f = f / 255.0 if f.max() > 1.0 else f
    grey = np.repeat(f[..., None], 3, axis=2)  # (H, W, 3)
    hm = np.clip(_as_np(heat).astype(np.float32), 0.0, 1.0)
    a = (alpha * np.sqrt(hm))[..., None]  # (H, W, 1) per-pixel opacity
    h = heat_rgb(hm, cmap).astype(np.float32) / 255.0
    blend = ((1 - a) * grey + a * h).clip(0, 1)  # (H, W, 3)
    return (blend * 255).round().astype(np.uint8)


def threshold_mask(face, heat, threshold: float = 0.7) -> np.ndarray:
    """The reports' mask view: keep the pixels whose heat is >= ``threshold``, grey the others to the image mean.

    face (H, W) in [0, 1] (or uint8), heat (H, W) in [0, 1] -> (H, W) float in [0, 1].
    """
    f = _as_np(face).astype(np.float32)
    f = f / 255.0 if f.max() > 1.0 else f
    return np.where(_as_np(heat) >= threshold, f, f.mean()).astype(np.float32)


def _title(pred: str | None, prob: float | None, true: str | None, target: str | None) -> str:
    parts = []
    if pred is not None:
        parts.append(f"pred {pred}" + (f" ({prob:.2f})" if prob is not None else ""))
    if true is not None:
        parts.append(f"true {true}")
    if target is not None and target != pred:
        parts.append(f"map for {target}")
    return " | ".join(parts)


def explanation_figure(
    faces: Sequence,
    heats: Sequence,
    *,
    titles: Sequence[str] | None = None,
    threshold: float = 0.7,
    method: str = "",
):
    """One row per image: face, heat map, overlay, thresholded mask. Returns a matplotlib Figure."""
    from matplotlib.figure import Figure

    n = len(faces)
    fig = Figure(figsize=(8.4, 2.35 * n + 0.2), dpi=100)
    axes = fig.subplots(n, 4, squeeze=False)
    heads = ("face", f"{method} map" if method else "heat map", "overlay", f"mask (heat >= {threshold:g})")
    for i in range(n):
        face, heat = _as_np(faces[i]), _as_np(heats[i])
        panels = [(face, "gray", (0, 1)), (heat, CMAP, (0, 1)), (overlay_rgb(face, heat), None, None),
                  (threshold_mask(face, heat, threshold), "gray", (0, 1))]
        for j, (img, cmap, lim) in enumerate(panels):
            ax = axes[i, j]
            ax.imshow(img, cmap=cmap, vmin=lim[0] if lim else None, vmax=lim[1] if lim else None,
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0 or n == 1:
                ax.set_xlabel(heads[j], fontsize=8)
        if titles is not None:
            axes[i, 0].set_title(titles[i], fontsize=9, loc="left", x=0.0)
    fig.tight_layout()
    return fig


def _tile_axes(n: int, cols: int, size: Callable[[int, int], tuple[float, float]]) -> tuple[Any, list[tuple[int, Any]]]:
    """A figure with a grid of tick-less axes for ``n`` tiles (unused cells hidden): (figure, [(k, axes)])."""
    from matplotlib.figure import Figure

    cols = max(1, min(cols, n))
    rows = (n + cols - 1) // cols
    fig = Figure(figsize=size(cols, rows), dpi=100)
    cells = []
    for k, ax in enumerate(fig.subplots(rows, cols, squeeze=False).flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if k < n:
            cells.append((k, ax))
        else:
            ax.axis("off")
    return fig, cells


def grid_figure(
    faces: Sequence,
    heats: Sequence,
    *,
    titles: Sequence[str] | None = None,
    correct: Sequence[bool | None] | None = None,
    cols: int = 8,
    suptitle: str = "",
):
    """Overlays of many faces in a grid; titles green (right) or red (wrong) when ``correct`` is given."""
    n = len(faces)
    fig, cells = _tile_axes(n, cols, lambda c, r: (1.45 * c, 1.95 * r + (0.4 if suptitle else 0)))
    for k, ax in cells:
        ax.imshow(overlay_rgb(faces[k], heats[k]), interpolation="nearest")
        if titles is not None:
            ok = None if correct is None else correct[k]
            ax.set_title(titles[k], fontsize=6.5, color={True: "darkgreen", False: "firebrick", None: "black"}[ok])
    if suptitle:
        fig.suptitle(suptitle, fontsize=9)
    fig.tight_layout()
    return fig


def image_grid_figure(
    tiles: Sequence,
    *,
    titles: Sequence[str] | None = None,
    cols: int = 8,
    cmap: str | Sequence[str] = "gray",
    suptitle: str = "",
    scale: float = 1.2,
):
    """A grid of single-channel tiles (filters, feature maps), each shown with its own colour range.

    ``cmap``: one colour map, or one per tile.
    """
    n = len(tiles)
    fig, cells = _tile_axes(n, cols, lambda c, r: (scale * c, scale * r + 0.15 * r * (titles is not None)
                                                   + (0.45 if suptitle else 0)))
    for k, ax in cells:
        ax.imshow(_as_np(tiles[k]), cmap=cmap if isinstance(cmap, str) else cmap[k], interpolation="nearest")
        if titles is not None:
            ax.set_title(titles[k], fontsize=6.5)
    if suptitle:
        fig.suptitle(suptitle, fontsize=9)
    fig.tight_layout()
    return fig


def figure_path(path: str | Path) -> Path:
    """The file a figure named ``path`` is written to (no suffix: ``.png`` added); ValueError, before any work,
    for a folder, a format matplotlib cannot write, or a parent that is a file."""
    from matplotlib.backend_bases import FigureCanvasBase

    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{p} is a folder: name the image file to write, e.g. {p / 'figure.png'}")
    if not p.suffix:
        p = p.with_suffix(".png")
    formats = FigureCanvasBase.get_supported_filetypes()
    if p.suffix.lower().lstrip(".") not in formats:
        raise ValueError(f"{p}: cannot write a figure as {p.suffix!r}; use one of "
                         f"{', '.join('.' + f for f in sorted(formats))}")
    blocking = next((q for q in p.parents if q.exists() and not q.is_dir()), None)
    if blocking is not None:
        raise ValueError(f"{p}: {blocking} is a file, not a folder")
    return p


def save_figure(fig, path: str | Path) -> Path:
    """Write a figure to ``path`` (see :func:`figure_path`), creating the folder; returns the path written."""
    p = figure_path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p)
    return p


def caption(pred: str | None = None, prob: float | None = None, true: str | None = None,
            target: str | None = None) -> str:
    """'pred Happy (0.93) | true Sad' (and '| map for X' when the map is for another class than predicted)."""
    return _title(pred, prob, true, target)
