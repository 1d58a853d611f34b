"""FER2013-label accuracy and FER+ agreement of models, in one table (plain predictions, no TTA).

    python bench/label_agreement.py --data fer2013.csv.gz [--models NAME_OR_RUN ...] [--page docs/results/ferplus.md]

For each model (default: every shipped entry) and split (PublicTest = val, PrivateTest = test) the probabilities are
computed once and scored against both label sources: FER2013's own labels, and the FER+ majority vote
(``fer2013new.csv`` beside the data or in a sibling ``ferplus/`` folder). A 7-class model is scored on the faces
whose FER+ label is one of its classes (the Contempt faces are left out); an 8-class FER+ model on FER2013's labels
has its Contempt output dropped. The last columns count the faces: how many FER+ keeps, and how often FER2013's
label agrees with FER+'s on them. Protocol: every model was trained on Training and chosen on PublicTest (FER2013
or FER+ labels, as its card says); PrivateTest is only reported.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

SPLITS = ("val", "test")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="fer2013.csv[.gz]")
    ap.add_argument("--labels", default="ferplus", help="FER+ votes: ferplus (found beside the data) or a path")
    ap.add_argument("--models", nargs="*", help="shipped names, run folders or checkpoints (default: every shipped)")
    ap.add_argument("--page", help="also write the table as a Markdown page here")
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    from ferlab.data.ferplus import apply_labels
    from ferlab.data.source import open_data
    from ferlab.hardware import cpu_name
    from ferlab.inference.loader import load_model
    from ferlab.pretrained import list_pretrained

    data = open_data(args.data, progress=False)
    fp, _ = apply_labels(data, args.labels, args.data)
    if not np.array_equal(data.ids, np.arange(len(data))):
        raise SystemExit(f"{args.data}: expected every FER2013 row (no skipped rows)")
    fp_label = np.full(len(data), -1)
    fp_label[fp.ids] = fp.labels  # FER+ majority per FER2013 row; -1 where FER+ drops the face
    names = args.models or [e["name"] for e in list_pretrained()]

    rows = []
    for name in names:
        loaded = load_model(name)
        k = len(loaded.class_names)
        row = {"model": name, "classes": k}
        for split in SPLITS:
            idx = data.indices(split)
            x = torch.from_numpy(data.images[idx]).unsqueeze(1)  # (N, 1, 48, 48) uint8
            probs = loaded.probabilities(x, progress=False)  # (N, k)
            pred7 = probs[:, :7].argmax(1)  # FER2013's classes (an 8-class model's Contempt output dropped)
            row[f"fer2013_{split}"] = float((pred7 == data.labels[idx]).mean())
            lab = fp_label[idx]
            scored = (lab >= 0) & (lab < k)
            row[f"ferplus_{split}"] = float((probs.argmax(1)[scored] == lab[scored]).mean())
            row[f"n_{split}"] = int(scored.sum())
        rows.append(row)
        print(f"{name}: FER2013 val {row['fer2013_val']:.2%} test {row['fer2013_test']:.2%} | FER+ val "
              f"{row['ferplus_val']:.2%} test {row['ferplus_test']:.2%}", file=sys.stderr)

    agree = {}
    for split in SPLITS:
        idx = data.indices(split)
        lab = fp_label[idx]
        ok = (lab >= 0) & (lab < 7)
        agree[split] = (float((data.labels[idx][ok] == lab[ok]).mean()), int(ok.sum()))

    lines = ["| model | classes | FER2013 labels: PublicTest | **PrivateTest** | FER+ majority: PublicTest | "
             "**PrivateTest** |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| `{r['model']}` | {r['classes']} | {r['fer2013_val']:.2%} | **{r['fer2013_test']:.2%}** | "
                     f"{r['ferplus_val']:.2%} | **{r['ferplus_test']:.2%}** |")
    lines.append(f"| FER2013's own label, read as a prediction | 7 | 100% | 100% | {agree['val'][0]:.2%} | "
                 f"{agree['test'][0]:.2%} |")
    table = "\n".join(lines)
    faces = (f"FER+ faces scored: PublicTest {agree['val'][1]:,} and PrivateTest {agree['test'][1]:,} for a 7-class "
             f"model (the faces with an emotion majority other than Contempt); "
             + ", ".join(f"{r['model']} {r['n_val']:,} / {r['n_test']:,}" for r in rows if r["classes"] != 7))
    print(table)
    print(faces)
    if args.page:
        cmd = "python bench/label_agreement.py --data fer2013.csv.gz" + (
            f" --models {' '.join(args.models)}" if args.models else "") + f" --page {args.page}"
        Path(args.page).write_text(
            "# FER2013 labels and FER+ labels\n\n"
            "Protocol: every model trained on FER2013 Training, checkpoints chosen on PublicTest (with the labels it "
            "was trained on); PrivateTest only reported. Plain predictions (no TTA), bf16 on a CPU that computes it "
            f"natively (this page: {cpu_name()}; two CPUs' bf16 kernels round differently, and a face's result can "
            "depend on the batch it is computed in, so a figure measured on another CPU or by another command, as in "
            "[the shelf](../shelf.md) or [the robustness page](robustness.md), may differ by a few images). FER+ is "
            "Microsoft's crowd "
            "relabelling of the same faces (10 votes each, MIT licence): the "
            "majority vote is a cleaner label than FER2013's, so agreement with it is a better guide to how a model "
            "does on faces people label consistently.\n\n"
            f"```bash\n{cmd}\n```\n\n{table}\n\n{faces}.\n\n"
            "A model trained on FER+ labels (`--labels ferplus`, [data.md](../data.md#fer-labels)) is scored on FER+ "
            "PrivateTest's majority votes with its checkpoint and TTA mode chosen on FER+ PublicTest; its figures in "
            "every TTA mode are in [the shelf](../shelf.md). For scale, on the FER+ test set: Barsoum et al. (2016), "
            "a VGG13-style net from scratch at 64x64, 83.85% (majority) to 84.99% (probability mode); later "
            "published results reach about 88-90%, mostly with ImageNet pretraining.\n")
        print(f"wrote {args.page}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
