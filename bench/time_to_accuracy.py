"""Time to accuracy: train a config from scratch, then report PrivateTest accuracy and the wall time it took.

The training runs as ``python -m ferlab train`` in a subprocess, in the environment the ``ferlab``
launcher would use (jemalloc without page decay, unless FERLAB_JEMALLOC=0), so the wall time counts
everything a user waits for: interpreter start, data loading and parsing (or the cache), every epoch and
the checkpoints.
The config's ``epochs`` set the run's length: choose them so that the run fits the budget; this script
does not stop training early, it measures. Then the checkpoint selected on PublicTest (val) is evaluated
on PublicTest and PrivateTest (test) in each test-time augmentation mode of ``--tta-modes`` (default: all of
them, none, flip, shift, affine; their views are nested, so only the largest mode's views are predicted); the
mode best on PublicTest is the one reported (ties go to the earlier, cheaper mode), and the evaluation time
counts toward the wall time.

    python bench/time_to_accuracy.py --data fer2013.csv.gz --config configs/X.toml --budget-min 30
    python bench/time_to_accuracy.py --config configs/X.toml --epochs 1 --synthetic '{"n_train": 500}'  # a dry run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from ferlab.hardware import describe
from ferlab.transforms import TTA_MODES, tta_view_count


def train_command(args: argparse.Namespace, out: Path) -> list[str]:
    cmd = [sys.executable, "-m", "ferlab", "train", "--config", args.config, "--out", str(out), "--no-progress"]
    for flag in ("data", "epochs", "seed", "threads", "synthetic"):
        value = getattr(args, flag)
        if value is not None:
            cmd += [f"--{flag}", str(value)]
    return cmd


def train_env() -> dict[str, str]:
    """The environment of the training process: the one the ``ferlab`` launcher would use."""
    from ferlab.cli import launcher_env

    return launcher_env(os.environ) or dict(os.environ)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="training config (TOML/JSON), e.g. configs/fer-resnet-s.toml")
    ap.add_argument("--data", help="fer2013.csv[.gz]; default: the config's data (else the synthetic faces)")
    ap.add_argument("--budget-min", type=float, default=30.0, help="the wall-time budget in minutes")
    ap.add_argument("--target", type=float, default=0.70, help="the PrivateTest accuracy to reach")
    ap.add_argument("--epochs", type=int, help="override the config's epochs")
    ap.add_argument("--seed", type=int, help="override the config's seed (to measure the seed-to-seed spread)")
    ap.add_argument("--threads", type=int,
                    help="torch threads (default: auto, the cores not busy with other work at start)")
    ap.add_argument("--tta-modes", nargs="+", default=list(TTA_MODES), choices=list(TTA_MODES),
                    help="test-time augmentations to choose from on PublicTest (val); default: all")
    ap.add_argument("--synthetic", help=argparse.SUPPRESS)  # options of the synthetic data, for tests
    ap.add_argument("--out", help="run directory (default runs/tta-CONFIG-TIMESTAMP); must not hold a run")
    ap.add_argument("--json", action="store_true", help="print the result as JSON as well")
    args = ap.parse_args(argv)

    out = Path(args.out or f"runs/tta-{Path(args.config).stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    if (out / "last.pt").exists():
        sys.exit(f"time_to_accuracy: {out} already holds a run; a timing needs a fresh run directory")
    cmd = train_command(args, out)
    print("training:", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=train_env())
    train_wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"time_to_accuracy: training failed with exit status {proc.returncode}")

    import torch

    from ferlab.data.source import data_for, split_rows
    from ferlab.ensemble import accuracy
    from ferlab.inference.loader import load_model

    t1 = time.perf_counter()
    model = load_model(out)  # the checkpoint selected on PublicTest, and the data: loaded once
    meta = model.meta
    data = data_for(model.meta, args.data, progress=False)
    rows = {split: split_rows(data, model.meta, split) for split in ("val", "test")}
    # the modes' views are nested (each starts with the views of the smaller ones), so the views of the largest
    # mode are predicted once and every mode averages its first views
    n_views = {mode: tta_view_count(mode, (1, *data.images.shape[1:])) for mode in args.tta_modes}
    largest = max(args.tta_modes, key=n_views.__getitem__)
    by_tta: dict[str, dict[str, float]] = {mode: {} for mode in args.tta_modes}
    for split, idx in rows.items():
        images = torch.from_numpy(data.images[idx]).unsqueeze(1)  # (N, 1, 48, 48) uint8
        views = model.view_logits(images, tta=largest)  # (V, N, K)
        for mode in args.tta_modes:
            by_tta[mode][split] = accuracy(views[: n_views[mode]].mean(0).softmax(1).numpy(), data.labels[idx])
    eval_wall = time.perf_counter() - t1
    selected = max(args.tta_modes, key=lambda m: (by_tta[m]["val"], -args.tta_modes.index(m)))
    summary = json.loads((out / "summary.json").read_text())
    result = {
        "config": args.config, "run_dir": str(out), "data": data.source,
        "protocol": meta["split"]["text"], "epochs_run": summary["epochs_run"],
        "best_epoch": meta["result"]["epoch"], "val_acc_at_selection": meta["result"]["val_acc"],
        "by_tta": by_tta, "selected_tta": selected, "test_acc": by_tta[selected]["test"],
        "test_n": len(rows["test"]), "train_wall_s": train_wall, "eval_wall_s": eval_wall,
        "total_wall_s": train_wall + eval_wall, "budget_s": args.budget_min * 60, "target": args.target,
        "hardware": describe(),
    }
    within = result["total_wall_s"] <= result["budget_s"]
    print(f"\nconfig {args.config} on {result['data']}; {result['protocol']}")
    print(f"machine: {result['hardware']} (wall times depend on it)")
    print(f"wall time: training {train_wall / 60:.1f} min (process start, data loading, {result['epochs_run']} "
          f"epochs, checkpoints) + evaluation {eval_wall / 60:.1f} min ({len(args.tta_modes)} test-time "
          f"augmentation modes on PublicTest and PrivateTest) = {result['total_wall_s'] / 60:.1f} min; "
          f"budget {args.budget_min:g} min: {'within' if within else 'OVER'}")
    print(f"selected epoch {result['best_epoch']} on PublicTest (val) (accuracy {result['val_acc_at_selection']:.4f})")
    print(f"{'test-time augmentation':<24} {'PublicTest (val)':>17} {'PrivateTest (test)':>19}")
    for mode in args.tta_modes:
        mark = "  <- best on PublicTest" if mode == selected else ""
        print(f"{mode:<24} {by_tta[mode]['val']:>17.4f} {by_tta[mode]['test']:>19.4f}{mark}")
    acc = result["test_acc"]
    print(f"PrivateTest (test) accuracy {acc:.4f} (test-time augmentation {selected!r}, chosen on PublicTest)  "
          f"target {args.target:.4f}: {'reached' if acc >= args.target else 'missed'}")
    if args.json:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
