"""Ensemble accuracy: choose members on PublicTest (val) by greedy forward selection, report PrivateTest (test).

    python bench/ensemble.py runs/a runs/b ferlab-shipped-name ... --data fer2013.csv.gz [--tta [shift|affine]]
        [--replacement] [--max-members N] [--cache DIR]

Each candidate (run directory, .safetensors file or shipped model name) predicts the val and test splits
once (``--cache DIR`` keeps those predictions, keyed by the checkpoint's bytes, the data and the TTA mode, so
a second selection costs seconds). The ensemble (softmax probabilities averaged) grows one member at a time,
each time by the candidate that raises val accuracy most, and stops when none raises it (Caruana et al.
2004); with ``--replacement`` a candidate may be picked again (a higher weight), the selection runs
``--max-members`` steps (default: twice the candidates) and keeps the best prefix on val. Test accuracy is
printed beside each step but never used to choose. The last line is the chosen ensemble's PrivateTest accuracy
and a ``ferlab evaluate`` command that reproduces it (a member named twice counts twice).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np

SPLITS = ("val", "test")


def cache_key(spec: str, data, tta: str) -> str:
    """What a candidate's cached predictions depend on: the checkpoint file's bytes, the data and the TTA mode."""
    from ferlab.checkpoint import resolve

    h = hashlib.sha256(resolve(spec).read_bytes())
    h.update(f"|{data.fingerprint}|{tta}|uncalibrated".encode())
    return h.hexdigest()[:24]


def predict(spec: str, data, tta: str, cache: Path | None = None
            ) -> tuple[dict, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A candidate's metadata, its val/test row indices and its probabilities (N, K) on them: uncalibrated, as an
    ensemble averages its members' (a shipped net's temperature would otherwise weigh it differently from a run)."""
    import torch

    from ferlab.checkpoint import read_meta
    from ferlab.data.source import split_rows
    from ferlab.inference.loader import load_model

    meta = read_meta(spec)
    rows = {split: split_rows(data, meta, split) for split in SPLITS}
    file = cache / f"{cache_key(spec, data, tta)}.npz" if cache is not None else None
    if file is not None and file.is_file():
        with np.load(file, allow_pickle=False) as z:  # plain arrays only
            if all(np.array_equal(z[f"rows_{s}"], rows[s]) for s in SPLITS):
                return meta, rows, {s: z[f"probs_{s}"] for s in SPLITS}
    model = load_model(spec)
    probs = {}
    for split in SPLITS:
        x = torch.from_numpy(data.images[rows[split]]).unsqueeze(1)  # (N, 1, 48, 48) uint8
        probs[split] = model.probabilities(x, tta=tta, calibrated=False)
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_suffix(".tmp.npz")
        np.savez(tmp, **{f"rows_{s}": rows[s] for s in SPLITS}, **{f"probs_{s}": probs[s] for s in SPLITS})
        tmp.replace(file)  # whole files only, even if interrupted
    return meta, rows, probs


def main(argv: list[str] | None = None) -> int:
    from ferlab.checkpoint import read_meta
    from ferlab.data.source import data_for
    from ferlab.ensemble import accuracy, greedy_selection
    from ferlab.inference.options import tta_argument

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("candidates", nargs="+", help="run directories, .safetensors files or shipped model names (a "
                                                 "shipped ensemble's name: its members)")
    p.add_argument("--data", help="the data all candidates were trained on, e.g. fer2013.csv.gz (default: the first "
                                  "candidate's training data)")
    p.add_argument("--tta", **tta_argument())  # each member's test-time augmentation, as in `ferlab evaluate`
    p.add_argument("--replacement", action="store_true",
                   help="a candidate may be picked again (Caruana et al.'s selection with replacement)")
    p.add_argument("--max-members", type=int, default=None,
                   help="at most this many picks (default: every candidate once; with --replacement, twice)")
    p.add_argument("--cache", type=Path, default=None,
                   help="a folder that keeps each candidate's val/test predictions for the next selection")
    args = p.parse_args(argv)
    from ferlab.pretrained import list_pretrained

    ensembles = {e["name"]: e["members"] for e in list_pretrained() if e.get("members")}
    args.candidates = list(dict.fromkeys(  # a shipped ensemble's name stands for its members (each once)
        m for c in args.candidates for m in (ensembles[c] if c in ensembles and not Path(c).exists() else [c])))

    data = data_for(read_meta(args.candidates[0]), args.data)
    metas, probs = [], []
    rows0: dict[str, np.ndarray] | None = None
    for spec in args.candidates:
        meta, rows, pr = predict(spec, data, args.tta, args.cache)
        if meta["data"]["fingerprint"] != data.fingerprint:
            print(f"error: {spec} was trained on other data (fingerprint {meta['data']['fingerprint']}, "
                  f"{data.source} has {data.fingerprint})", file=sys.stderr)
            return 2
        if rows0 is None:
            rows0 = rows
        elif any(not np.array_equal(rows[s], rows0[s]) for s in rows):
            print(f"error: {spec} uses other val/test rows than {args.candidates[0]}", file=sys.stderr)
            return 2
        metas.append(meta)
        probs.append(pr)
    assert rows0 is not None
    y = {s: data.labels[rows0[s]] for s in ("val", "test")}
    protocol = metas[0]["split"]["text"]
    print(f"{len(args.candidates)} candidates on {data.source}; {protocol}; members chosen on val only"
          + (f"; {args.tta} TTA" if args.tta != "none" else ""))
    print(f"\n{'candidate':<48} {'model':<14} {'val':>7} {'test':>7}")
    for spec, meta, pr in zip(args.candidates, metas, probs, strict=True):
        print(f"{spec:<48} {meta['model']['name']:<14} {accuracy(pr['val'], y['val']):>7.2%} "
              f"{accuracy(pr['test'], y['test']):>7.2%}")

    steps = greedy_selection([pr["val"] for pr in probs], y["val"], args.max_members, replacement=args.replacement)
    print(f"\n{'step':>4}  {'member added':<48} {'ensemble val':>12} {'ensemble test':>13}")
    for n, step in enumerate(steps, 1):
        test = accuracy(np.mean([probs[i]["test"] for i in step.members], axis=0), y["test"])  # reported only
        print(f"{n:>4}  {args.candidates[step.added]:<48} {step.val_acc:>12.2%} {test:>13.2%}")
    chosen = steps[-1].members  # ``test`` is now the chosen ensemble's
    specs = [args.candidates[i] for i in chosen]
    picks = f" ({len(set(chosen))} distinct)" if len(set(chosen)) < len(chosen) else ""
    print(f"\nchosen on val: {len(chosen)} member(s){picks}, val {steps[-1].val_acc:.2%}; PrivateTest (test) {test:.2%}"
          + (f" with {args.tta} TTA" if args.tta != "none" else ""))
    print("reproduce: ferlab evaluate " + " ".join(specs) + (f" --data {args.data}" if args.data else "")
          + " --split test" + {"none": "", "flip": " --tta"}.get(args.tta, f" --tta {args.tta}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
