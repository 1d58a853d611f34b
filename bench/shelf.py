"""Measure every shipped model and ensemble on the shipped files and write the accuracies into the manifest.

    python bench/shelf.py --data fer2013.csv.gz [--names NAME ...] [--dry-run] [--page docs/shelf.md]

For each shipped single model and split (PublicTest = val, PrivateTest = test) the 18 affine test-time views are
predicted once; the plain, flip, shift and affine accuracies are the first 1, 2, 10 and 18 views' mean logits
(the modes' views are nested), exactly what ``ferlab evaluate --pretrained NAME --split SPLIT --tta MODE``
reports. An ensemble's accuracy is that of the mean of its members' probabilities, as ``ferlab evaluate
--pretrained ENSEMBLE`` reports. Precision is each checkpoint's ``auto`` (``ferlab evaluate``'s default).
Protocol: trained on Training, everything chosen on PublicTest, PrivateTest only reported.

The manifest's ``accuracy`` of each entry becomes ``{split: {"plain", "tta" (flip), "shift", "affine"}}``, and
``--page`` (default docs/shelf.md) is rewritten from the manifest: the table of what ships.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

MODES = {"plain": 1, "tta": 2, "shift": 10, "affine": 18}  # manifest key -> views (ferlab.transforms.TTA_MODES)
SPLITS = ("val", "test")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="fer2013.csv[.gz]")
    ap.add_argument("--names", nargs="*", help="only these entries (default: all); an ensemble measures its members")
    ap.add_argument("--dry-run", action="store_true", help="print, do not write the manifest")
    ap.add_argument("--page", default="docs/shelf.md", help="the generated results page (default docs/shelf.md)")
    ap.add_argument("--page-only", action="store_true", help="only rewrite the page from the manifest")
    args = ap.parse_args(argv)

    import torch

    from ferlab.checkpoint import atomic_write
    from ferlab.data.source import open_data
    from ferlab.inference.predict import combine
    from ferlab.pretrained import list_pretrained, manifest_path, shipped_names

    if args.page_only:
        write_page(Path(args.page))
        return 0
    entries = {e["name"]: e for e in list_pretrained()}
    try:
        wanted = shipped_names(args.names)
    except KeyError as e:
        ap.error(e.args[0])
    singles = sorted({m for n in wanted for m in (entries[n].get("members") or [n])})
    logits, labels, source_of = mode_logits(singles, open_data(args.data), args.data, MODES)
    probs = {k: torch.from_numpy(z).softmax(1).numpy() for k, z in logits.items()}  # (name, split, mode) -> (N, K)
    manifest = json.loads(manifest_path().read_text())
    print(f"{'name':<28} " + " ".join(f"{s + ' ' + m:>12}" for s in SPLITS for m in MODES))
    for name in wanted:
        members = entries[name].get("members") or [name]
        src = source_of[members[0]]
        w = entries[name].get("weights")  # an ensemble's member weights (None: equal)
        acc = {split: {mode: float((combine([probs[m, split, mode] for m in members], w).argmax(1)
                                    == labels[src, split]).mean()) for mode in MODES} for split in SPLITS}
        manifest[name]["accuracy"] = acc
        manifest[name]["n"] = {split: int(len(labels[src, split])) for split in SPLITS}
        print(f"{name:<28} " + " ".join(f"{acc[s][m]:>12.2%}" for s in SPLITS for m in MODES))
    if not args.dry_run:
        text = json.dumps(manifest, indent=2) + "\n"
        atomic_write(manifest_path(), lambda tmp: Path(tmp).write_text(text))
        write_page(Path(args.page))
        print(f"updated {manifest_path()} and {args.page}")
    return 0


def mode_logits(names: list[str], data, data_path: str, modes: dict[str, int], splits: tuple[str, ...] = SPLITS,
                tta: str = "affine") -> tuple[dict, dict, dict]:
    """Each shipped single model's mean logits (N, K) per split and TTA mode (the modes' views are nested, so the
    views of ``tta``, the largest mode, are predicted once), scored faces' labels under the model's own label
    source, and that source.

    Returns ``logits[name, split, mode]``, ``labels[source, split]`` and ``source_of[name]``.
    """
    import torch

    from ferlab.data.ferplus import apply_labels
    from ferlab.data.source import label_source
    from ferlab.evaluate import split_rows
    from ferlab.inference.loader import load_model

    logits, labels, source_of, by_source = {}, {}, {}, {}
    for name in names:
        model = load_model(name)
        src = source_of[name] = label_source(model.meta)
        if src not in by_source:  # fer2013, or FER+ for a model trained on it: the data under those labels
            by_source[src] = apply_labels(data, src, data_path)[0]
        d = by_source[src]
        for split in splits:
            idx = split_rows(d, model.meta, split)
            labels[src, split] = d.labels[idx]
            x = torch.from_numpy(d.images[idx]).unsqueeze(1)  # (N, 1, 48, 48) uint8
            views = model.view_logits(x, tta=tta, progress=True, desc=f"{name} {split}")  # (V, N, K)
            for mode, v in modes.items():
                logits[name, split, mode] = views[:v].mean(0).numpy()
    return logits, labels, source_of


def write_page(path: Path) -> None:
    """The shelf's results page: one row per shipped model or ensemble, from the manifest."""
    from ferlab.hardware import cpu_name
    from ferlab.pretrained import list_pretrained

    entries = list_pretrained()

    def pct(e: dict, split: str, mode: str) -> str:
        v = e.get("accuracy", {}).get(split, {}).get(mode)
        return f"{v:.2%}" if v is not None else "-"

    rows = []
    for e in entries:
        size = e.get("size_bytes", 0) / 1e6  # an ensemble's: its members' together
        picks = [f" x{w:g}" for w in e["weights"]] if e.get("weights") else [""] * len(e.get("members", []))
        what = ", ".join(f"`{m}`{x}" for m, x in zip(e["members"], picks, strict=True)) \
            if e["kind"] == "ensemble" else f"`{e.get('model')}`"
        labels = e.get("labels", "fer2013")
        rows.append(f"| `{e['name']}` | {', '.join(e['roles']) or '-'} | {what} | {labels} | {size:.1f} | "
                    + " | ".join(pct(e, s, m) for s in SPLITS for m in MODES) + " |")
    total = sum(e.get("size_bytes", 0) for e in entries if e["kind"] == "single") / 1e6
    head = "| " + " | ".join(f"{'PublicTest' if s == 'val' else 'PrivateTest'} {m.replace('tta', 'flip')}"
                             for s in SPLITS for m in MODES) + " |"
    text = f"""# The shelf: shipped models

Generated by `python bench/shelf.py --data fer2013.csv.gz` from `ferlab/weights/manifest.json`; every accuracy
is measured on the shipped file (ensembles: on their members' files) and is what
`ferlab evaluate --pretrained NAME --data fer2013.csv.gz --split val|test [--tta flip|shift|affine]` prints.
Protocol: trained on FER2013 Training; checkpoints, members, TTA modes and roles chosen on PublicTest;
PrivateTest only reported. Precision: each checkpoint's `auto`, bf16 where the CPU computes it natively (as on
the machine that last wrote this page, {cpu_name()}, and the earlier ones whose rows `--names` kept); on a CPU
without bf16 instructions the figures are fp32's and may differ by a few images.

Weights shipped together: {total:.1f} MB.

| name | roles | nets | labels | MB {head}
|---|---|---|---|---:|{'---:|' * (len(SPLITS) * len(MODES))}
""" + "\n".join(rows) + """

Roles: `default` is what `ferlab predict`, `ferlab serve` and `Recognizer()` use without a model name, chosen by
a written rule that weighs FER+ agreement and the corruption benchmark on PublicTest
([results/robustness.md](results/robustness.md#the-default-model)); `best-single` is the FER2013 net with the
highest PublicTest accuracy without TTA; `most-accurate` is the FER2013 ensemble; `fast` the smallest net;
`ferplus` is the FER+ net best on FER+ PublicTest without TTA and `ferplus-most-accurate` the FER+ entry
most accurate there (an ensemble where selection on FER+ PublicTest picks more than one net);
`ensemble-member` marks the nets an ensemble averages. Test-time
augmentation: `flip` is 2 views per face, `shift` 10, `affine` 18, each one forward pass of every member.
Labels: the accuracies of a `fer2013` model are against FER2013's labels; those of a `ferplus` model (8 classes)
against the FER+ majority vote on the faces FER+ keeps, selected on FER+ PublicTest
([data.md](data.md#fer-labels)). How every model agrees with FER+: [results/ferplus.md](results/ferplus.md).

Earlier shipped models and their model cards: [docs/models/](models/).
"""
    path.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
