"""Fit a calibration temperature for every shipped model and ensemble on PublicTest and report what it does.

    python bench/calibration.py --data fer2013.csv.gz [--names NAME ...] [--write | --page-only]

For each shipped single model and split (PublicTest = val, PrivateTest = test) the 18 affine test-time views are
predicted once; the scores of the modes none, flip, shift and affine are the mean logits of the first 1, 2, 10
and 18 views (the modes' views are nested). An ensemble's scores are the log of the mean of its members'
uncalibrated probabilities. One temperature per model and mode is fitted on PublicTest by minimising the
negative log-likelihood (:func:`ferlab.inference.calibration.fit_temperature`); PrivateTest only reports.
Labels: FER2013's for a FER2013 model, the FER+ majority for a FER+ model (as its stated accuracies).

Printed: the temperature, the expected calibration error (15 bins) and the NLL before and after, per split.
``--write`` stores ``calibration`` in each manifest entry (the temperatures by mode, where they were fitted, and
the ECE and NLL before and after), writes the results page and the reliability diagram beside it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

MODES = {"none": 1, "flip": 2, "shift": 10, "affine": 18}  # TTA mode -> views (ferlab.transforms.TTA_MODES)
SPLITS = ("val", "test")  # the same as bench/shelf.py's
SPLIT_NAMES = {"val": "PublicTest", "test": "PrivateTest"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="fer2013.csv[.gz]")
    ap.add_argument("--names", nargs="*", help="only these entries (default: all); an ensemble measures its members")
    ap.add_argument("--write", action="store_true", help="store the temperatures in the manifest, write the page")
    ap.add_argument("--page", default="docs/results/calibration.md", help="the results page written by --write")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--page-only", action="store_true", help="only rewrite the page and its figure from the "
                                                             "manifest (predicts PrivateTest once, without TTA)")
    args = ap.parse_args(argv)

    import numpy as np
    import torch
    from shelf import mode_logits  # bench/shelf.py: the shelf's logits in every TTA mode, predicted once

    from ferlab.checkpoint import atomic_write
    from ferlab.data.source import open_data
    from ferlab.inference.calibration import ensemble_scores, fit_temperature, nll, reliability, scaled_probabilities
    from ferlab.pretrained import list_pretrained, manifest_path, shipped_names

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.page_only:
        write_page(Path(args.page), open_data(args.data), args.data)
        return 0
    entries = {e["name"]: e for e in list_pretrained()}
    try:
        wanted = shipped_names(args.names)
    except KeyError as e:
        ap.error(e.args[0])
    singles = sorted({m for n in wanted for m in (entries[n].get("members") or [n])})
    data = open_data(args.data)
    logits, labels, source_of = mode_logits(singles, data, args.data, MODES)  # (name, split, mode) -> (N, K)

    def scores(name: str, split: str, mode: str) -> np.ndarray:
        members = entries[name].get("members")
        return ensemble_scores([logits[m, split, mode] for m in members], entries[name].get("weights")) if members \
            else logits[name, split, mode]

    results: dict[str, dict] = {}
    print(f"{'name':<26} {'mode':<7} {'T':>6} " + " ".join(
        f"{SPLIT_NAMES[s] + ' ' + k:>20}" for s in SPLITS for k in ("ECE before", "ECE after")))
    for name in wanted:
        src = source_of[(entries[name].get("members") or [name])[0]]
        cal: dict = {"temperature": {}, "fit_on": "val", "labels": entries[name].get("labels", "fer2013"), "bins": 15,
                     "ece": {}, "nll": {}}
        for mode in MODES:
            t = fit_temperature(scores(name, "val", mode), labels[src, "val"])
            cal["temperature"][mode] = round(t, 4)
            row = []
            for split in SPLITS:
                z, y = scores(name, split, mode), labels[src, split]
                before, after = reliability(scaled_probabilities(z, 1.0), y), reliability(scaled_probabilities(z, t), y)
                cal["ece"].setdefault(split, {})[mode] = {"before": round(before.ece, 5),
                                                          "after": round(after.ece, 5)}
                cal["nll"].setdefault(split, {})[mode] = {"before": round(nll(z, y), 5),
                                                          "after": round(nll(z, y, t), 5)}
                row += [before.ece, after.ece]
            print(f"{name:<26} {mode:<7} {t:>6.3f} " + " ".join(f"{v:>20.2%}" for v in row))
        results[name] = cal
    if args.write:
        manifest = json.loads(manifest_path().read_text())
        for name, cal in results.items():
            manifest[name]["calibration"] = cal
        text = json.dumps(manifest, indent=2) + "\n"
        atomic_write(manifest_path(), lambda tmp: Path(tmp).write_text(text))
        page = Path(args.page)
        write_page(page, data, args.data)
        print(f"updated {manifest_path()}, {page} and {page.with_suffix('.png')}")
    return 0


def test_curves(data, data_path: str) -> dict[str, tuple]:
    """(before, after) reliability on PrivateTest without TTA for every calibrated shipped entry, with the
    temperatures in the manifest."""
    from shelf import mode_logits

    from ferlab.inference.calibration import ensemble_scores, reliability, scaled_probabilities, temperature_for
    from ferlab.pretrained import list_pretrained

    entries = {e["name"]: e for e in list_pretrained() if "calibration" in e}
    singles = sorted({m for e in entries.values() for m in (e.get("members") or [e["name"]])})
    logits, labels, source_of = mode_logits(singles, data, data_path, {"none": 1}, splits=("test",), tta="none")
    curves = {}
    for name, e in entries.items():
        members = e.get("members") or [name]
        z = ensemble_scores([logits[m, "test", "none"] for m in members], e.get("weights")) if e.get("members") else \
            logits[name, "test", "none"]
        t = temperature_for(e["calibration"], "none")
        y = labels[source_of[members[0]], "test"]
        curves[name] = (reliability(scaled_probabilities(z, 1.0), y), reliability(scaled_probabilities(z, t), y))
    return curves


def write_page(page: Path, data, data_path: str) -> None:
    """The calibration results page, from the manifest, and its reliability diagram (PrivateTest, no TTA, every
    model; predicted again without TTA)."""
    from ferlab.hardware import cpu_name
    from ferlab.plots import plot_reliability
    from ferlab.pretrained import list_pretrained

    shelf = [e for e in list_pretrained() if "calibration" in e]
    roles = {e["name"]: ", ".join(e["roles"]) or "-" for e in shelf}
    results = {e["name"]: e["calibration"] for e in shelf}
    curves = test_curves(data, data_path)
    figure = page.with_suffix(".png")
    plot_reliability([(n, *curves[n]) for n in results], figure,
                     title="Reliability on PrivateTest, no TTA (temperatures fitted on PublicTest)")

    def rows(mode: str) -> str:
        out = []
        for name, cal in results.items():
            e, n = cal["ece"], cal["nll"]
            out.append(f"| `{name}` | {roles.get(name, '-')} | {cal['labels']} | {cal['temperature'][mode]:.3f} | "
                       + " | ".join(f"{e[s][mode]['before']:.2%} -> {e[s][mode]['after']:.2%}" for s in SPLITS)
                       + f" | {n['test'][mode]['before']:.3f} -> {n['test'][mode]['after']:.3f} |")
        return "\n".join(out)

    head = ("| model | roles | labels | T | ECE PublicTest | ECE PrivateTest | NLL PrivateTest |\n"
            "|---|---|---|---:|---:|---:|---:|")
    page.write_text(f"""# Calibrated probabilities

Users read a model's probabilities as its confidence. Every shipped model and ensemble divides its scores by a
temperature T fitted on PublicTest (temperature scaling, Guo et al. 2017): probabilities are softmax(z / T), with
z a single net's logits or an ensemble's log mean probability. T is positive, so no prediction and no stated
accuracy changes. The temperatures are stored in the manifest (`calibration`, one per TTA mode) and applied by
`ferlab predict`, `ferlab serve`, `Recognizer`, the ONNX export and `ferlab evaluate`.

Generated by `python bench/calibration.py --data fer2013.csv.gz --write`, last on {cpu_name()} (rows kept by
`--names` were measured earlier, possibly on another CPU). Protocol: fitted on
PublicTest; PrivateTest only reported. ECE: expected calibration error over 15 equal-width confidence bins
(lower is better; 0 is perfect). NLL: mean negative log-likelihood of the true label. Labels: FER2013's for
the FER2013 models, the FER+ majority for the FER+ model.

## Without test-time augmentation (what `ferlab predict` and `ferlab serve` use by default)

{head}
{rows("none")}

![Reliability diagrams]({figure.name})

A point below the diagonal is a confidence bin whose faces are right less often than the confidence claims
(over-confidence); above it, under-confidence. T below 1 sharpens the probabilities (the net was under-confident:
mixup and label smoothing train for that, and soft FER+ vote targets far more), above 1 softens them. A T close to
1 means the net was calibrated already; there the ECE moves by a few tenths of a point either way, which is the
noise of 15 bins over about 3,500 faces.

## With the 18 affine views (`--tta affine`)

{head}
{rows("affine")}
""")


if __name__ == "__main__":
    sys.exit(main())
