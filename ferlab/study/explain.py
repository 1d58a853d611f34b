"""The study's use of :mod:`ferlab.explain`: example maps, faithfulness scores, filters and feature maps (Q5, Q6).

Everything here works on the selected checkpoint of a run and on the test split under the study's protocol.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ferlab.study.runner import RunResult, StudyRuns

Q6_MAX_MAPS = 32  # feature-map tiles shown


def _load(r: RunResult):
    from ferlab.inference.loader import load_model

    m = load_model(r.run_dir)
    return m.module.float().eval(), m.normalizer


def _inputs(study: StudyRuns, rows: np.ndarray, normalizer) -> tuple[Any, Any]:
    """Faces (B, 1, 48, 48) in [0, 1] and the normalised model inputs for data rows ``rows``."""
    import torch

    x01 = torch.from_numpy(study.data.images[rows]).float().unsqueeze(1) / 255.0  # (B, 1, 48, 48)
    return x01, normalizer(x01)


def explain_examples(r: RunResult, study: StudyRuns) -> list[dict[str, Any]]:
    """Per class, the first right and the first wrong test face, with saliency and Grad-CAM for the predicted class.

    Returns rows for :func:`ferlab.study.plots.example_maps` (a missing example is None).
    """
    from ferlab.explain import attribute

    names = list(study.data.class_names)
    test = study.splits["test"]
    probs = r.probs("test")  # (N, K)
    pred = probs.argmax(1)
    y = study.labels("test")
    chosen: list[tuple[int, str, int]] = []  # (class, right/wrong, position in test)
    for c in range(len(names)):
        for key, ok in (("right", True), ("wrong", False)):
            hits = np.flatnonzero((y == c) & ((pred == y) == ok))
            if len(hits):
                chosen.append((c, key, int(hits[0])))
    model, norm = _load(r)
    pos = np.array([p for _, _, p in chosen], dtype=np.int64)
    out = [{"class": n, "right": None, "wrong": None} for n in names]
    if not len(pos):
        return out
    x01, x = _inputs(study, test[pos], norm)
    target = pred[pos].tolist()  # the class the checkpoint predicted (as evaluated)
    heats = {m: attribute(model, x, method=m, target=target).numpy() for m in ("saliency", "gradcam")}  # (B, 48, 48)
    for k, (c, key, p) in enumerate(chosen):
        out[c][key] = {"face": x01[k, 0].numpy(), "saliency": heats["saliency"][k], "gradcam": heats["gradcam"][k],
                       "caption": f"{names[c]}\n-> {names[pred[p]]} {probs[p, pred[p]]:.2f}"}
    return out


def faithfulness_scores(r: RunResult, study: StudyRuns, methods: tuple[str, ...], n_images: int, steps: int
                        ) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, np.ndarray]], np.ndarray, int]:
    """Deletion/insertion summaries and mean curves of each method on the first ``n_images`` test faces.

    Returns (scores per method, curves per method, pixel fractions, number of images). The maps explain the
    predicted class; the baseline is the uniform mean grey in model-input units.
    """
    import torch

    from ferlab.explain import attribute
    from ferlab.explain.faithfulness import deletion_insertion
    from ferlab.explain.methods import baseline_value

    model, norm = _load(r)
    rows = study.splits["test"][:n_images]
    _, x = _inputs(study, rows, norm)
    target = torch.from_numpy(r.probs("test")[:len(rows)].argmax(1)).long()  # (B,)
    scores, curves, fractions = {}, {}, np.zeros(0)
    for m in methods:
        heat = attribute(model, x, method=m, target=target)  # (B, 48, 48)
        f = deletion_insertion(model, x, heat, target, baseline=baseline_value(norm), steps=steps)
        scores[m] = f.summary()
        per = f.aucs()  # per-image areas and gains (B,)
        for k in ("deletion_gain", "insertion_gain"):  # standard error of the mean gain over the images
            scores[m][f"{k}_se"] = float(per[k].std(ddof=1) / np.sqrt(len(per[k]))) if len(per[k]) > 1 else 0.0
        curves[m] = {k: getattr(f, k) for k in ("deletion", "insertion", "deletion_random", "insertion_random")}
        fractions = f.fractions
    return scores, curves, fractions, len(rows)


def q6_layer(model) -> str:
    """The layer Q6 shows: the activation after the second convolution (the first if there is one only)."""
    from ferlab.explain.filters import list_layers

    layers = list_layers(model)
    convs = [i for i, info in enumerate(layers) if info.type == "Conv2d"]
    if not convs:
        raise ValueError("the model has no Conv2d layer to visualise")
    i = convs[min(1, len(convs) - 1)]
    after = [info for info in layers[i + 1:] if info.type in ("ReLU", "LeakyReLU", "ELU", "GELU", "SiLU")
             and info.shape == layers[i].shape]
    return after[0].name if after else layers[i].name


def filter_figure(r: RunResult, study: StudyRuns, path: Path, count: int, steps: int
                  ) -> tuple[Path, str, str]:
    """Gradient-ascent images of the ``count`` filters of :func:`q6_layer` most active on test faces.

    Returns (path, layer, a sentence with the numbers).
    """
    import torch

    from ferlab.explain.figures import image_grid_figure, save_figure
    from ferlab.explain.filters import AscentConfig, layer_output, stretch, visualize_filters

    model, norm = _load(r)
    layer = q6_layer(model)
    _, x = _inputs(study, study.splits["test"][:64], norm)
    with torch.no_grad():
        act = layer_output(model, layer, x).relu().mean(dim=(0, 2, 3))  # (C,) mean activation on test faces
    chans = sorted(torch.argsort(act, descending=True)[:count].tolist())
    res = visualize_filters(model, layer, norm, chans, AscentConfig(steps=steps))
    tiles = [stretch(img).numpy() for img in res.images]
    titles = [f"filter {c}" for c in res.channels]
    save_figure(image_grid_figure(tiles, titles=titles, cols=8, suptitle=f"{layer}: inputs maximising each filter"),
                path)
    start, final = res.start_activation.numpy(), res.final_activation.numpy()
    face = act[chans].numpy()
    rose = int((final > start).sum())
    above = int((final > face).sum())
    text = (f"The {len(chans)} filters shown are those of {layer} ({act.numel()} channels) with the highest mean "
            f"activation on test faces. Gradient ascent raised the mean activation of {rose} of them above its value "
            f"on the grey-noise start (median {float(np.median(start)):.3g} -> {float(np.median(final)):.3g}); "
            f"{above} end above their mean activation on real test faces (median {float(np.median(face)):.3g}).")
    return path, layer, text


def feature_map_figure(r: RunResult, study: StudyRuns, path: Path) -> tuple[Path, str, str]:
    """The outputs of :func:`q6_layer` on one correctly classified test face; (path, layer, what the face is)."""
    import torch

    from ferlab.explain.figures import image_grid_figure, save_figure
    from ferlab.explain.filters import feature_maps, stretch

    names = list(study.data.class_names)
    pred = r.probs("test").argmax(1)
    y = study.labels("test")
    ok = np.flatnonzero(pred == y)
    pos = int(ok[0]) if len(ok) else 0
    model, norm = _load(r)
    layer = q6_layer(model)
    x01, x = _inputs(study, study.splits["test"][pos:pos + 1], norm)
    maps = feature_maps(model, layer, x)  # (C, h, w)
    mean = maps.relu().mean(dim=(1, 2))  # (C,)
    live = int((mean > 0).sum())
    top = sorted(torch.argsort(mean, descending=True)[:min(Q6_MAX_MAPS, max(live, 1))].tolist())
    tiles = [x01[0, 0].numpy()] + [stretch(maps[c]).numpy() for c in top]
    titles = ["input face"] + [f"channel {c}" for c in top]
    save_figure(image_grid_figure(tiles, titles=titles, cols=11, suptitle=f"{layer} on a test face"), path)
    what = (f"test face {pos} (true {names[y[pos]]}, predicted {names[pred[pos]]}); the {len(top)} channels most "
            f"active on this face ({live} of the {maps.shape[0]} channels have any positive output on it)")
    return path, layer, what
