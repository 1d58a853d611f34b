"""Sub-commands of ferlab.explain (registered through ferlab.cli.COMMAND_MODULES): explain, filters, feature-maps,
layers. Heavy libraries (torch, Captum, matplotlib) are imported inside the command functions."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ferlab.explain import METHODS
from ferlab.inference.options import positive_int

MODEL_HELP = "run directory, .safetensors checkpoint or shipped model name"


def _load(spec: str):  # -> LoadedModel
    from ferlab.inference.loader import LoadedModel, load_model

    if str(spec).lower().endswith(".onnx"):
        raise ValueError(f"{spec}: explanations need the model's gradients, which an .onnx file does not give: "
                         "name the run directory or .safetensors checkpoint it was exported from")
    m = load_model(spec)
    if not isinstance(m, LoadedModel):
        raise ValueError(f"{spec} is an ensemble of {len(m.members)}; explanations run on one net: name one of its "
                         f"members ({', '.join(x.source for x in m.members)})")
    m.module.float().eval()
    return m


def _default_out(spec: str, name: str) -> Path:
    """RUN_DIR/NAME for a run directory, else NAME next to the checkpoint (or in the working directory)."""
    p = Path(spec)
    if p.is_dir():
        return p / name
    return (p.parent if p.is_file() else Path(".")) / f"{p.stem}-{name}"


def parse_channels(text: str | None, n: int, default_max: int) -> list[int]:
    """``all``, ``0-31``, ``0,4,9`` or None (the first ``default_max``) -> channel indices."""
    if text is None:
        return list(range(min(n, default_max)))
    if text == "all":
        return list(range(n))
    out: list[int] = []
    for part in text.split(","):
        a, _, b = part.strip().partition("-")
        if not a.isdigit() or (b and not b.isdigit()):
            raise ValueError(f"--channels expects all, A-B or A,B,C (whole numbers), got {text!r}")
        out += list(range(int(a), int(b) + 1)) if b else [int(a)]
    return out


# --------------------------------------------------------------------------- explain
def cmd_explain(args: argparse.Namespace) -> int:
    from ferlab.explain.inputs import load_faces
    from ferlab.explain.pipeline import explain_images, parse_target, write_explanations

    if args.method not in METHODS:
        raise ValueError(f"unknown explanation method {args.method!r}; choose one of {', '.join(METHODS)}")
    if not 0.0 <= args.threshold <= 1.0:
        raise ValueError(f"--threshold must be in [0, 1], got {args.threshold}")
    if not args.no_faithfulness and args.faith_steps < 2:  # checked now, not after every map is computed
        raise ValueError(f"--faith-steps must be at least 2, got {args.faith_steps}")
    if args.count < 1:
        raise ValueError(f"--count must be at least 1, got {args.count}")
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"--out {args.out} is a file; name a folder for the figures and the report")
    m = _load(args.model)
    model, meta, norm, names = m.module, m.meta, m.normalizer, m.class_names
    faces = load_faces(args.images, meta, default_count=args.count, data_path=args.data)
    target = parse_target(args.target, names, faces.labels)
    t0 = time.perf_counter()
    exp = explain_images(model, norm, faces.images, args.method, target=target, faithfulness=not args.no_faithfulness,
                         faith_steps=args.faith_steps, temperature=m.temperature())
    out = Path(args.out) if args.out else _default_out(args.model, f"explain-{args.method}")
    report = write_explanations(exp, faces, names, out, threshold=args.threshold, model_name=m.architecture,
                                per_image=not args.no_per_image,
                                extra={"checkpoint": str(args.model), "target_mode": args.target,
                                       "inputs": list(args.images)})
    total = time.perf_counter() - t0
    acc = f", accuracy {report['accuracy']:.3f}" if report["accuracy"] is not None else ""
    print(f"{m.architecture} {args.method}: {len(faces)} faces{acc}; maps in {exp.seconds['attribution']:.2f} s")
    if report["faithfulness"]:
        f = report["faithfulness"]
        print(f"faithfulness: deletion AUC {f['deletion_auc']:.3f} (random {f['deletion_random_auc']:.3f}, "
              f"gain {f['deletion_gain']:+.3f}); insertion AUC {f['insertion_auc']:.3f} "
              f"(random {f['insertion_random_auc']:.3f}, gain {f['insertion_gain']:+.3f}); "
              f"{exp.seconds['faithfulness']:.2f} s")
    print(f"wrote {out}/grid-{args.method}.png, explain-{args.method}.json"
          + (f" and {len(faces)} per-face figures" if not args.no_per_image else "") + f" ({total:.1f} s)")
    return 0


# --------------------------------------------------------------------------- filters, feature maps, layers
def cmd_filters(args: argparse.Namespace) -> int:
    from ferlab.explain.figures import figure_path, image_grid_figure, save_figure
    from ferlab.explain.filters import AscentConfig, check_layer, stretch, visualize_filters

    out = figure_path(args.out) if args.out else None  # checked before the work, not after it
    m = _load(args.model)
    model, norm = m.module, m.normalizer
    info = check_layer(model, args.layer)
    chans = parse_channels(args.channels, info.channels, args.max_filters)
    t0 = time.perf_counter()
    res = visualize_filters(model, args.layer, norm, chans, AscentConfig(steps=args.steps, seed=args.seed))
    secs = time.perf_counter() - t0
    out = out or _default_out(args.model, f"filters-{args.layer}.png")
    fig = image_grid_figure([stretch(im) for im in res.images], titles=[str(c) for c in res.channels],
                            suptitle=f"{m.architecture} {args.layer}: inputs maximising each filter's mean "
                                     f"activation ({args.steps} steps from grey noise)")
    out = save_figure(fig, out)
    up = int((res.final_activation > res.start_activation).sum())
    print(f"{m.architecture} {args.layer}: {len(chans)} of {info.channels} filters, {args.steps} steps in "
          f"{secs:.1f} s; mean activation {float(res.start_activation.mean()):.4f} -> "
          f"{float(res.final_activation.mean()):.4f} (raised for {up}/{len(chans)} filters)")
    print(f"wrote {out}")
    return 0


def cmd_feature_maps(args: argparse.Namespace) -> int:
    import torch

    from ferlab.explain.figures import figure_path, image_grid_figure, save_figure
    from ferlab.explain.filters import check_layer, feature_maps
    from ferlab.explain.inputs import load_one_face

    out = figure_path(args.out) if args.out else None  # checked before the work, not after it
    m = _load(args.model)
    model, meta, norm = m.module, m.meta, m.normalizer
    info = check_layer(model, args.layer)
    face = load_one_face(args.image, meta, data_path=args.data)
    x = norm(torch.as_tensor(face.images).float()[:, None] / 255.0)  # (1, 1, 48, 48)
    maps = feature_maps(model, args.layer, x)  # (C, h, w)
    chans = parse_channels(args.channels, info.channels, args.max_channels)
    bad = [c for c in chans if c >= info.channels]
    if bad:
        raise ValueError(f"layer {args.layer!r} has channels 0..{info.channels - 1}; got {bad}")
    with torch.no_grad():
        probs = (model(x).float() / m.temperature()).softmax(1)[0]  # calibrated, as predict reports them
    names = m.class_names
    k = int(probs.argmax())
    true = f", true {names[int(face.labels[0])]}" if face.labels[0] >= 0 else ""
    tiles = [face.images[0] / 255.0] + [maps[c] for c in chans]
    fig = image_grid_figure(tiles, titles=["input"] + [str(c) for c in chans],
                            cmap=["gray"] + ["viridis"] * len(chans),
                            suptitle=f"{m.architecture} {args.layer} {tuple(maps.shape)} on {face.names[0]} "
                                     f"(pred {names[k]} {float(probs[k]):.2f}{true})")
    out = save_figure(fig, out or _default_out(args.model, f"feature-maps-{args.layer}.png"))
    print(f"{args.layer}: {len(chans)} of {maps.shape[0]} maps of {maps.shape[1]}x{maps.shape[2]}; wrote {out}")
    return 0


def cmd_layers(args: argparse.Namespace) -> int:
    from ferlab.explain.filters import list_layers

    m = _load(args.model)
    model = m.module
    layers = list_layers(model)
    if args.json:
        print(json.dumps([info.to_dict() for info in layers], indent=2))
        return 0
    if not layers:
        print(f"{m.architecture} has no layer with a 2D feature map (an MLP): filters and feature-maps "
              "need a CNN")
        return 0
    width = max(len(i.name) for i in layers)
    print(f"{'layer':<{width}}  {'type':<18} {'output (C, H, W)':<18} channels")
    for info in layers:
        print(f"{info.name:<{width}}  {info.type:<18} {str(info.shape):<18} {info.channels}")
    print(f"\n{len(layers)} layers with 4D outputs; use a name with `ferlab filters` / `ferlab feature-maps --layer`")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add this package's sub-commands to the ferlab parser."""
    e = sub.add_parser("explain", help="saliency / Grad-CAM / ... maps of faces, with faithfulness scores")
    e.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    e.add_argument("--images", nargs="+", required=True, metavar="IMG",
                   help="image files (any size; converted to 48x48 grey, no face detection) or data:SPLIT[:N] "
                        "(the first N faces of that split of the model's own data, with true labels)")
    e.add_argument("--method", default="gradcam", metavar="M", help=f"one of {', '.join(METHODS)} (default gradcam)")
    e.add_argument("--target", default="predicted",
                   help="class to explain: predicted (default), true (needs data:...), or a class name/index")
    e.add_argument("--threshold", type=float, default=0.7, help="mask view keeps pixels with heat >= this")
    e.add_argument("--data", help="data path for data:SPLIT faces (default: the data the model was trained on; "
                                   "needed for shipped models)")
    e.add_argument("--count", type=int, default=16, help="faces taken by data:SPLIT without :N")
    e.add_argument("--faith-steps", type=int, default=10, help="pixel fractions of the deletion/insertion curves")
    e.add_argument("--no-faithfulness", action="store_true", help="skip the deletion/insertion scores")
    e.add_argument("--no-per-image", action="store_true", help="write only the grid and the JSON")
    e.add_argument("--out", help="output folder (default RUN_DIR/explain-METHOD)")
    e.set_defaults(func=cmd_explain)

    f = sub.add_parser("filters", help="gradient-ascent images maximising each filter of a layer (grid PNG)")
    f.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    f.add_argument("--layer", required=True, help="layer name (see `ferlab layers MODEL`)")
    f.add_argument("--steps", type=positive_int, default=96, help="gradient-ascent steps")
    f.add_argument("--channels", help="all, A-B or A,B,C (default: the first --max-filters)")
    f.add_argument("--max-filters", type=positive_int, default=32,
                   help="most filters drawn without --channels (default 32)")
    f.add_argument("--seed", type=int, default=0, help="seed of the starting noise images (default 0)")
    f.add_argument("--out", help="PNG path (default RUN_DIR/filters-LAYER.png)")
    f.set_defaults(func=cmd_filters)

    m = sub.add_parser("feature-maps", help="a layer's outputs on one face, as a grid PNG")
    m.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    m.add_argument("--layer", required=True, help="layer name (see `ferlab layers MODEL`)")
    m.add_argument("--image", required=True, help="an image file or data:SPLIT:I (face I of that split)")
    m.add_argument("--data", help="data path for data:SPLIT faces (default: the data the model was trained on; "
                                   "needed for shipped models)")
    m.add_argument("--channels", help="all, A-B or A,B,C (default: the first --max-channels)")
    m.add_argument("--max-channels", type=positive_int, default=64,
                   help="most channels drawn without --channels (default 64)")
    m.add_argument("--out", help="PNG path (default RUN_DIR/feature-maps-LAYER.png)")
    m.set_defaults(func=cmd_feature_maps)

    ly = sub.add_parser("layers", help="list a model's layers with 4D outputs: names, types, output shapes")
    ly.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    ly.add_argument("--json", action="store_true", help="print JSON")
    ly.set_defaults(func=cmd_layers)
