"""Speed of ferlab.explain: seconds for a batch of faces per attribution method, faithfulness and figures.

    OMP_NUM_THREADS=1 python bench/explain_speed.py                       # fer-resnet-s, random weights, 64 faces
    OMP_NUM_THREADS=1 python bench/explain_speed.py --model runs/fer-resnet-s --faces 64 --threads 1
    python bench/explain_speed.py --methods saliency gradcam --repeats 3

MODEL is a run directory, checkpoint, shipped name, or a registered model name (random weights: the speed does
not depend on them). Inputs are random 48x48 faces; the figures print the median of ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from pathlib import Path


def load(spec: str):
    from ferlab import pretrained
    from ferlab.inference.loader import load_model
    from ferlab.models import create_model, list_models
    from ferlab.transforms import Normalizer

    if not Path(spec).exists() and not pretrained.is_pretrained(spec) and spec in list_models():
        return create_model(spec).eval(), Normalizer("dataset", 0.5, 0.25)
    m = load_model(spec).members[0]
    return m.module.float().eval(), m.normalizer


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    import tempfile

    import torch

    from ferlab.explain import METHODS, attribute
    from ferlab.explain.faithfulness import deletion_insertion
    from ferlab.explain.figures import explanation_figure, grid_figure, save_figure

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="fer-resnet-s")
    p.add_argument("--faces", type=int, default=64)
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--faith-steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    model, norm = load(args.model)
    gen = torch.Generator().manual_seed(0)
    x01 = torch.rand(args.faces, 1, 48, 48, generator=gen)
    x = norm(x01)
    attribute(model, x[:2], "saliency")  # warm-up (imports, allocator)
    print(f"model {args.model}, {args.faces} faces, torch threads {torch.get_num_threads()}")
    heat = None
    for method in args.methods:
        secs = timed(lambda m=method: attribute(model, x, m), args.repeats)
        print(f"  {method:<22} {secs:8.2f} s   ({1000 * secs / args.faces:.1f} ms/face)")
        if method == "gradcam" or heat is None:
            heat = attribute(model, x, method)
    target = model(x).argmax(1)
    secs = timed(lambda: deletion_insertion(model, x, heat, target, steps=args.faith_steps), args.repeats)
    print(f"  {'faithfulness':<22} {secs:8.2f} s   (deletion+insertion, map and random, {args.faith_steps} steps)")
    faces = x01[:, 0].numpy()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        for i in range(args.faces):
            save_figure(explanation_figure([faces[i]], [heat[i]], titles=["face"]), Path(tmp) / f"{i}.png")
        per_image = time.perf_counter() - t0
        t0 = time.perf_counter()
        save_figure(grid_figure(faces, heat, titles=[str(i) for i in range(args.faces)]), Path(tmp) / "grid.png")
        grid = time.perf_counter() - t0
    print(f"  {'figures':<22} {per_image:8.2f} s   per-face PNGs; grid PNG {grid:.2f} s")


if __name__ == "__main__":
    main()
