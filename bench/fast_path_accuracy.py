"""Does the fast path learn as well as plain fp32? Train one config both ways, same seeds, and compare.

For each seed the config trains twice, identical except for the speed settings:
  fp32   precision = "fp32", channels_last = false (plain PyTorch)
  fast   precision = "bf16", channels_last = true  (ferlab's default: bf16 autocast, channels_last)
Each run selects its checkpoint on PublicTest (val); PrivateTest (test) is evaluated only to report. Printed:
per run val/test accuracy and training images/s; per mode the mean +- std over seeds; the difference of
the means against the seed-to-seed spread, with the binomial standard error of one accuracy on the test
split for scale. Finished runs are reused (after checking that their config is this one) and interrupted ones
resume, so the command can be re-run.

    python bench/fast_path_accuracy.py --data fer2013.csv.gz --config configs/r000-cnn1-6ep.toml --seeds 0 1
    python bench/fast_path_accuracy.py --config configs/r000-cnn1-6ep.toml --epochs 1 \\
        --synthetic '{"n_train": 500}'                            # a dry run on the embedded faces
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

MODES: dict[str, dict[str, Any]] = {
    "fp32": {"precision": "fp32", "channels_last": False},
    "fast": {"precision": "bf16", "channels_last": True},
}


def run_one(cfg: Any, run_dir: Path) -> dict[str, Any]:
    """Train ``cfg`` into ``run_dir`` (reuse a finished run, resume an interrupted one) and evaluate it.

    A run already in ``run_dir`` must have been trained with ``cfg`` (up to the data path and thread count):
    its config is compared first, and a mismatch is an error rather than a silently stale number.
    """
    from ferlab.evaluate import evaluate_checkpoints
    from ferlab.study.runner import NOT_HASHED  # the config fields that do not change what a run learns
    from ferlab.train.config import TrainConfig
    from ferlab.train.fit import fit, read_history

    if (run_dir / "config.json").exists():
        old = TrainConfig.from_dict(json.loads((run_dir / "config.json").read_text())["train"]).to_dict()
        new = cfg.to_dict()
        diff = sorted(k for k in new if k not in NOT_HASHED and old.get(k) != new[k])
        if diff:
            sys.exit(f"fast_path_accuracy: {run_dir} holds a run of another config (differs in {', '.join(diff)}); "
                     "use another --out")
    if not (run_dir / "summary.json").exists() or not json.loads((run_dir / "summary.json").read_text())["finished"]:
        fit(cfg, run_dir, resume=(run_dir / "last.pt").exists(), progress=False)
    summary = json.loads((run_dir / "summary.json").read_text())
    speeds = [row["images_per_s"] for row in read_history(run_dir)]
    test = evaluate_checkpoints([run_dir], split="test", data_path=cfg.data, progress=False)
    return {"run_dir": str(run_dir), "best_epoch": summary["best_epoch"], "val_acc": summary["best_val_acc"],
            "test_acc": test["accuracy"], "test_n": test["n"], "protocol": summary["protocol"],
            "images_per_s": statistics.median(speeds), "train_seconds": summary["train_seconds_total"]}


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else float("nan"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="training config (TOML/JSON)")
    ap.add_argument("--data", help="fer2013.csv[.gz]; default: the config's data (else the synthetic faces)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds, one fp32 and one fast run each")
    ap.add_argument("--epochs", type=int, help="override the config's epochs")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: the free cores)")
    ap.add_argument("--synthetic", help=argparse.SUPPRESS)  # options of the synthetic data, for tests
    ap.add_argument("--out", help="folder of the runs (default runs/fastpath-CONFIG)")
    ap.add_argument("--json", action="store_true", help="print the result as JSON as well")
    args = ap.parse_args(argv)

    from ferlab.train.config import TrainConfig

    over: dict[str, Any] = {"threads": args.threads}
    if args.data:
        over["data"] = args.data
    if args.epochs:
        over["epochs"] = args.epochs
    if args.synthetic:
        over["synthetic"] = json.loads(args.synthetic)
    base = TrainConfig.from_file(args.config, **over)
    out = Path(args.out or f"runs/fastpath-{Path(args.config).stem}")

    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    for seed in args.seeds:
        for mode, settings in MODES.items():
            cfg = dataclasses.replace(base, seed=seed, **settings)
            print(f"[{mode} seed {seed}] training {cfg.model} into {out / f'{mode}-s{seed}'}", flush=True)
            runs[mode].append(run_one(cfg, out / f"{mode}-s{seed}"))

    first = runs["fp32"][0]
    n = first["test_n"]
    print(f"\nconfig {args.config} ({base.model}, {base.epochs} epochs) on {base.data or 'the synthetic faces'}; "
          f"{first['protocol']}")
    print(f"{'mode':<6} {'seed':>4} {'epoch':>5} {'val acc':>8} {'test acc':>8} {'img/s':>7}")
    for mode in MODES:
        for seed, r in zip(args.seeds, runs[mode], strict=True):
            print(f"{mode:<6} {seed:>4} {r['best_epoch']:>5} {r['val_acc']:>8.4f} {r['test_acc']:>8.4f} "
                  f"{r['images_per_s']:>7.0f}")
    stats = {m: {k: _mean_std([r[k] for r in runs[m]]) for k in ("val_acc", "test_acc", "images_per_s")}
             for m in MODES}
    for mode in MODES:
        s = stats[mode]
        print(f"{mode:<6} mean  val {s['val_acc'][0]:.4f} +- {s['val_acc'][1]:.4f}  test {s['test_acc'][0]:.4f} "
              f"+- {s['test_acc'][1]:.4f}  ({len(args.seeds)} seeds, +- is the std over seeds)  "
              f"{s['images_per_s'][0]:.0f} img/s")
    diff = stats["fast"]["test_acc"][0] - stats["fp32"]["test_acc"][0]
    spread = max(stats[m]["test_acc"][1] for m in MODES)
    se = math.sqrt(first["test_acc"] * (1 - first["test_acc"]) / n)
    speedup = stats["fast"]["images_per_s"][0] / stats["fp32"]["images_per_s"][0]
    print(f"fast - fp32 test accuracy: {diff:+.4f}; seed-to-seed std up to {spread:.4f}; binomial std error of one "
          f"accuracy on {n} test images {se:.4f}; fast trains {speedup:.2f}x the fp32 images/s")
    if args.json:
        print(json.dumps({"config": args.config, "seeds": args.seeds, "runs": runs,
                          "test_acc_difference": diff, "seed_std": spread, "binomial_se": se,
                          "speedup": speedup}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
