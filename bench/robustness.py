"""The corruption benchmark of every shipped model and ensemble, and the default model chosen by the written rule.

    python bench/robustness.py --data fer2013.csv.gz [--names NAME ...] [--faces 1000] [--seed 0] [--write]

For each split (PublicTest = val, to choose on; PrivateTest = test, only reported) a seeded sample of ``--faces``
faces is corrupted by every corruption of :mod:`ferlab.corruptions` at 5 severities (``ferlab robustness``
builds the same sets), and every shipped single model predicts the clean and the 65 corrupted sets once, without
TTA. An ensemble's probabilities are the mean of its members'. Every model is scored against two label sources:

- FER2013's labels: clean accuracy, mean corruption accuracy (mCA) and the relative drop, as in ImageNet-C (an
  8-class FER+ model's Contempt output dropped, as ``ferlab evaluate`` does);
- the FER+ majority vote, on the sampled faces whose majority is one of FER2013's 7 classes: the same figures,
  with every output of the model (an 8-class model's Contempt answer counts as a miss, as it would in use).

FER+ agreement on the whole split (every face with a FER+ majority among the 7) is measured too. ``--write``
stores all of it in the manifest (``robustness``), gives the ``default`` role to the model the rule picks
(:func:`ferlab.pretrained.default_rule_score`) and writes ``docs/results/robustness.md`` with its figure.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SPLITS = ("val", "test")
SPLIT_NAMES = {"val": "PublicTest", "test": "PrivateTest"}
TRAINING_SECTION = "## Training for it"  # kept when the page is rewritten
SEVERITY_FIGURE = 3  # the severity shown in the page's picture of the corruptions
FP_HEAD = ("| model | PublicTest agreement | PublicTest clean | PublicTest mCA | PrivateTest agreement | "
           "PrivateTest clean | PrivateTest mCA |\n|---|---:|---:|---:|---:|---:|---:|")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="fer2013.csv[.gz] (fer2013new.csv beside it or in ../ferplus/)")
    ap.add_argument("--names", nargs="*", help="only these entries (default: all); an ensemble measures its members")
    ap.add_argument("--faces", type=int, default=None, help="faces sampled per split (default: ferlab's, 1000)")
    ap.add_argument("--seed", type=int, default=None, help="the benchmark's seed (default: ferlab's, 0)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--write", action="store_true", help="store the figures and the default in the manifest and "
                                                         "write the page")
    ap.add_argument("--page", default="docs/results/robustness.md", help="the page written by --write")
    ap.add_argument("--photo", help="a photo whose face illustrates the corruptions on the page (default: "
                                    "scikit-image's astronaut, a public-domain NASA photo; never a FER2013 face)")
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    from ferlab.checkpoint import atomic_write
    from ferlab.corruptions import DEFAULT_FACES, DEFAULT_SEED
    from ferlab.data.ferplus import apply_labels
    from ferlab.data.source import open_data
    from ferlab.inference.loader import load_model
    from ferlab.inference.predict import combine
    from ferlab.pretrained import apply_default_rule, list_pretrained, manifest_path, shipped_names
    from ferlab.robustness import corruption_probabilities, sample_rows, score

    faces = args.faces or DEFAULT_FACES
    seed = DEFAULT_SEED if args.seed is None else args.seed
    if args.threads:
        torch.set_num_threads(args.threads)
    entries = {e["name"]: e for e in list_pretrained()}
    try:
        wanted = shipped_names(args.names)
    except KeyError as e:
        ap.error(e.args[0])
    singles = sorted({m for n in wanted for m in (entries[n].get("members") or [n])})
    data = open_data(args.data, progress=False)
    if not np.array_equal(data.ids, np.arange(len(data))):
        raise SystemExit(f"{args.data}: expected every FER2013 row (no skipped rows)")
    fp, _ = apply_labels(data, "ferplus", args.data)
    fp_label = np.full(len(data), -1)
    fp_label[fp.ids] = fp.labels  # FER+ majority per FER2013 row; -1 where FER+ drops the face
    fp_label[fp_label >= 7] = -1  # Contempt: not one of FER2013's 7 classes

    rows = {s: sample_rows(data.indices(s), faces, seed) for s in SPLITS}
    probs: dict[tuple[str, str], dict] = {}  # (model, split) -> {(corruption, severity): (N, 7)}
    whole: dict[tuple[str, str], np.ndarray] = {}  # (model, split) -> (N_split, 7) clean probs of the whole split
    for name in singles:  # uncalibrated, as an ensemble averages its members (a single net's argmax is the same)
        model = load_model(name)
        for split in SPLITS:
            out = corruption_probabilities(model, data.images[rows[split]], seed=seed, progress=True,
                                           calibrated=False)
            probs[name, split] = out
            x = torch.from_numpy(data.images[data.indices(split)]).unsqueeze(1)  # (N, 1, 48, 48) uint8
            whole[name, split] = model.probabilities(x, calibrated=False)
        print(f"measured {name}", flush=True)

    results: dict[str, dict] = {}
    for name in wanted:
        members = entries[name].get("members") or [name]
        res: dict = {"faces": faces, "seed": seed, "no_tta": True}
        for split in SPLITS:
            w = entries[name].get("weights")  # an ensemble's member weights (None: equal)
            p = {k: combine([probs[m, split][k] for m in members], w) for k in probs[members[0], split]}
            y13, yfp = data.labels[rows[split]], fp_label[rows[split]]
            keep = yfp >= 0
            f13 = score(p, y13, name, keep=7)  # FER2013's 7 classes (a FER+ net's Contempt output dropped)
            ffp = score({k: v[keep] for k, v in p.items()}, yfp[keep], name)  # every output: Contempt is a miss
            idx = data.indices(split)
            agree_rows = fp_label[idx] >= 0
            pw = combine([whole[m, split] for m in members], w)
            res[split] = {
                "fer2013": summary(f13), "ferplus": summary(ffp),
                "ferplus_agreement": float((pw.argmax(1)[agree_rows] == fp_label[idx][agree_rows]).mean()),
                "ferplus_faces": int(agree_rows.sum()), "sample_ferplus_faces": int(keep.sum()),
                "per_corruption": {c: float(np.mean(a)) for c, a in f13.cells.items()},
            }
        results[name] = res
        v, t = res["val"], res["test"]
        print(f"{name:<26} val: FER+ {v['ferplus_agreement']:.2%} mCA(FER+) {v['ferplus']['mean_corruption']:.2%} "
              f"clean13 {v['fer2013']['clean']:.2%} mCA13 {v['fer2013']['mean_corruption']:.2%} | test: FER+ "
              f"{t['ferplus_agreement']:.2%} mCA(FER+) {t['ferplus']['mean_corruption']:.2%} clean13 "
              f"{t['fer2013']['clean']:.2%} mCA13 {t['fer2013']['mean_corruption']:.2%} drop "
              f"{t['fer2013']['relative_drop']:.1%}")
    if args.write:
        manifest = json.loads(manifest_path().read_text())
        for name, res in results.items():
            manifest[name]["robustness"] = res
        chosen, scores = apply_default_rule(manifest)
        for name, s in sorted(scores.items(), key=lambda kv: -kv[1]):
            print(f"rule score {name:<26} {s:.2%}" + ("   <- default" if name == chosen else ""))
        text = json.dumps(manifest, indent=2) + "\n"
        atomic_write(manifest_path(), lambda tmp: Path(tmp).write_text(text))
        page = Path(args.page)
        write_page(page, manifest, scores, chosen, args.photo, seed)
        print(f"updated {manifest_path()} and {page}")
    return 0


def summary(result) -> dict:
    return {"n": result.n, "clean": result.clean, "mean_corruption": result.mean_corruption,
            "relative_drop": result.relative_drop}


def write_page(page: Path, manifest: dict, scores: dict[str, float], chosen: str, photo: str | None,
               seed: int) -> None:
    """The robustness results page: the benchmark per model, per corruption, and the default rule's table."""
    from ferlab.corruptions import CORRUPTIONS
    from ferlab.hardware import cpu_name
    from ferlab.pretrained import DEFAULT_RULE

    names = [n for n in manifest if "robustness" in manifest[n]]
    figure = page.with_name("corruptions.png")
    corruption_figure(photo, figure, seed)

    def pct(v: float) -> str:
        return f"{v:.2%}"

    def rows(cells) -> str:
        """A table row per model: ``cells(its figures on one split)`` for each split."""
        return "\n".join(f"| `{n}` | " + " | ".join(c for split in SPLITS
                                                     for c in cells(manifest[n]["robustness"][split])) + " |"
                         for n in names)

    main_table = rows(lambda r: [pct(r["fer2013"]["clean"]), pct(r["fer2013"]["mean_corruption"]),
                                 f"{r['fer2013']['relative_drop']:.1%}"])
    fp_table = rows(lambda r: [pct(r["ferplus_agreement"]), pct(r["ferplus"]["clean"]),
                               pct(r["ferplus"]["mean_corruption"])])
    per = [f"| `{n}` | " + " | ".join(pct(manifest[n]["robustness"]["test"]["per_corruption"][c])
                                       for c in CORRUPTIONS) + " |" for n in names]
    rule_rows = []
    for n, s in sorted(scores.items(), key=lambda kv: -kv[1]):
        v = manifest[n]["robustness"]["val"]
        rule_rows.append(f"| `{n}` | {pct(v['ferplus_agreement'])} | {pct(v['ferplus']['mean_corruption'])} | "
                         f"**{pct(s)}** | {'default' if n == chosen else ''} |")
    levels = "\n".join(f"| `{c.name}` | {c.group} | {c.description} | "
                       + ", ".join(f"{v:g}" for v in c.levels) + " |" for c in CORRUPTIONS.values())
    any_entry = manifest[names[0]]["robustness"]
    # the page's last section, the training runs compared on the benchmark, is kept as it is (runs are not shipped)
    old = page.read_text() if page.is_file() else ""
    kept = old[old.index(TRAINING_SECTION):] if TRAINING_SECTION in old else ""
    page.write_text(f"""# Robustness: the corruption benchmark

Users' faces are not FER2013's: their detector frames them differently, their light and camera differ, and part of
the face may be hidden. The benchmark, in the spirit of ImageNet-C (Hendrycks & Dietterich 2019), measures what
such changes do to each shipped model: 13 corruptions at 5 severities, built with a seed from a sample of
{any_entry['faces']:,} faces of each split.

Build and score it for any model: `ferlab robustness --pretrained NAME --data fer2013.csv.gz --split val`
(PublicTest, to choose on) or `--split test` (PrivateTest, to report); `--faces 0` takes every face of the split.
This page: `python bench/robustness.py --data fer2013.csv.gz --write`, last on {cpu_name()} (rows kept by
`--names` were measured earlier, possibly on another CPU), no TTA, seed {seed}.
Protocol: every model was trained on Training and chosen on PublicTest; PrivateTest is only reported. Against
FER2013's labels the FER+ model's Contempt output is dropped; against FER+ (faces whose majority is one of
FER2013's 7 classes) every output counts, so its Contempt answers are misses.

![One face under every corruption at severity {SEVERITY_FIGURE}](corruptions.png)

The face: NASA's public-domain astronaut portrait (the README's photo, from scikit-image), cut as
`ferlab predict` cuts it.

## The corruptions

| corruption | group | parameter | severities 1-5 |
|---|---|---|---|
{levels}

## Accuracy against FER2013's labels

Clean: the sampled faces as they are; mCA: mean accuracy over the 65 corrupted sets; drop: (clean - mCA) / clean.

| model | PublicTest clean | PublicTest mCA | PublicTest drop | PrivateTest clean | PrivateTest mCA | PrivateTest drop |
|---|---:|---:|---:|---:|---:|---:|
{main_table}

## Against the FER+ majority

Agreement: on every face of the split whose FER+ majority is one of the 7 classes. Clean and mCA: on the sampled
faces that have one.

{FP_HEAD}
{fp_table}

## Per corruption (PrivateTest, FER2013 labels, mean over the 5 severities)

| model | {' | '.join(CORRUPTIONS)} |
|---|{'---:|' * len(CORRUPTIONS)}
{chr(10).join(per)}

## The default model

{DEFAULT_RULE}

| candidate | FER+ agreement (PublicTest) | FER+ mCA (PublicTest) | score | |
|---|---:|---:|---:|---|
{chr(10).join(rule_rows)}

`ferlab models --pretrained` shows these columns; the rule is applied by `bench/robustness.py --write`
(`ferlab.pretrained.apply_default_rule`).
""" + ("\n" + kept if kept else ""))


def corruption_figure(photo: str | None, out: Path, seed: int) -> None:
    """One face from ``photo`` (default: scikit-image's astronaut), cut as ``ferlab predict`` cuts it, under every
    corruption at SEVERITY_FIGURE."""
    import cv2
    import numpy as np

    from ferlab.corruptions import CORRUPTIONS, corrupt
    from ferlab.plots import _figure
    from ferlab.recognize.api import Recognizer, load_image

    if photo is None:
        from skimage import data as skdata

        rgb = skdata.astronaut()
    else:
        rgb = load_image(photo)
    rec = Recognizer()
    face = rec.predict(rgb)[0]
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    marks = None if face.landmarks is None else np.asarray([face.landmarks], np.float32)
    crop = rec.crops(gray, np.asarray([face.box]), marks).reshape(1, 48, 48)
    panels = [("clean", crop[0])] + [(n, corrupt(crop, n, SEVERITY_FIGURE, seed)[0]) for n in CORRUPTIONS]
    fig = _figure(1.3 * 7, 1.5 * 2)
    axes = fig.subplots(2, 7)
    for ax, (title, im) in zip(axes.ravel(), panels, strict=True):
        ax.imshow(im, cmap="gray", vmin=0, vmax=255)
        ax.set_title(title.replace("_", " "), fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
