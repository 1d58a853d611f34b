"""What storing the shipped weights as int8 instead of fp16 costs: size, accuracy and changed predictions.

    python bench/weight_storage.py [--data fer2013.csv.gz] [--names NAME ...] [--tta none|affine] [--write]

Each shipped single model's file is written again as int8 (``bench/ship_model.py --dtype int8``: conv and
linear weights as int8 with one scale per output channel, the rest fp16) into a temporary folder, and both files
are scored on PublicTest (val) and PrivateTest (test) with the model's own labels (FER2013's, or the FER+
majority for a FER+ model), as ``ferlab evaluate`` does. Printed per model: both sizes, both accuracies per
split, how many faces' predicted class int8 changes and, for scale, how many computing the fp16 file in bf16
instead of fp32 changes (on a CPU that computes bf16 natively). Protocol: the models were trained on Training and
chosen on PublicTest; PrivateTest only reports.

``--write`` then stores each measured model as int8 on the shelf: its file is replaced by the int8 one and its
manifest entry's ``dtype``, ``size_bytes`` and ``sha256`` follow (the rest of the entry stays). Measure it again
afterwards: ``bench/shelf.py --names NAME``, ``bench/calibration.py --write`` and ``bench/robustness.py --write``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

SPLITS = ("val", "test")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="fer2013.csv[.gz] (default: each model's own training data)")
    ap.add_argument("--names", nargs="*", help="only these shipped single models (default: all)")
    ap.add_argument("--tta", default="none", choices=("none", "affine"), help="test-time views (default: none)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--write", action="store_true", help="store the measured models as int8 on the shelf")
    args = ap.parse_args(argv)

    import torch
    from ship_model import store_file, write_shipped  # bench/ship_model.py: the shipped file, written as --dtype says

    from ferlab.data.ferplus import apply_labels
    from ferlab.data.source import data_for, label_source, open_data
    from ferlab.evaluate import split_rows
    from ferlab.inference.loader import load_model
    from ferlab.pretrained import list_pretrained, pretrained_path

    if args.threads:
        torch.set_num_threads(args.threads)
    entries = {e["name"]: e for e in list_pretrained() if e["kind"] == "single"}
    singles = list(entries)
    wanted = args.names or singles
    unknown = [n for n in wanted if n not in singles]
    if unknown:
        ap.error(f"not a shipped single model: {', '.join(unknown)} (shipped: {', '.join(singles)})")
    stored_int8 = [n for n in wanted if str(entries[n].get("dtype", "")).startswith("int8")]
    for name in stored_int8:  # its fp16 file is not shipped: nothing to compare it with
        print(f"{name}: shipped as int8 already; its model card compares it with the fp16 file",
              file=sys.stderr)
    wanted = [n for n in wanted if n not in stored_int8]
    data = open_data(args.data) if args.data else None
    labelled: dict[str, object] = {}  # label source -> the data under those labels
    print("| model | fp16 MB | int8 MB | PublicTest fp16 | int8 | PrivateTest fp16 | int8 | changed by int8 | "
          "changed by bf16 compute |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory() as tmp:
        for name in wanted:
            fp16 = pretrained_path(name)
            int8, _, _ = write_shipped(name, f"{name}-int8", Path(tmp), "int8")
            half, quarter = load_model(name), load_model(str(int8))
            src = label_source(half.meta)
            if data is None:
                d = data_for(half.meta, None, progress=False)
            else:
                if src not in labelled:
                    labelled[src] = apply_labels(data, src, args.data)[0]
                d = labelled[src]
            runs = [(half, "auto"), (quarter, "auto")]
            in_bf16 = half.run_precision("auto") != "fp32"  # then the fp16 file in fp32 too, for scale
            runs += [(half, "fp32")] if in_bf16 else []
            acc, by_int8, by_bf16, n = {}, 0, 0, 0
            for split in SPLITS:
                idx = split_rows(d, half.meta, split)
                x = torch.from_numpy(d.images[idx]).unsqueeze(1)  # (N, 1, 48, 48) uint8
                y = torch.from_numpy(d.labels[idx])
                # class per face (N,): mean logits over the views, in the model's own precision unless named
                p16, p8, *p32 = (m.view_logits(x, tta=args.tta, precision=prec).mean(0).argmax(1) for m, prec in runs)
                acc[split] = ((p16 == y).double().mean().item(), (p8 == y).double().mean().item())
                by_int8 += int((p16 != p8).sum())
                by_bf16 += int((p16 != p32[0]).sum()) if in_bf16 else 0
                n += len(idx)
            bf16 = f"{by_bf16} of {n}" if in_bf16 else "(fp32 here)"
            print(f"| `{name}` | {fp16.stat().st_size / 1e6:.2f} | {int8.stat().st_size / 1e6:.2f} | "
                  f"{acc['val'][0]:.2%} | {acc['val'][1]:.2%} | {acc['test'][0]:.2%} | {acc['test'][1]:.2%} | "
                  f"{by_int8} of {n} | {bf16} |", flush=True)
            if args.write:
                store_file(name, int8, fp16)
    return 0


if __name__ == "__main__":
    sys.exit(main())
