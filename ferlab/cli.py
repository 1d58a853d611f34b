"""The ``ferlab`` command: one sub-command per job, each mapped to a function (no if/elif chains)."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ferlab.hardware import PRECISIONS
from ferlab.inference.options import positive_int, tta_argument

JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
# Keep freed pages (no decay) and no background thread: the allocator then never hands the activations' memory
# back to the kernel between training steps.
JEMALLOC_CONF = "background_thread:false,dirty_decay_ms:-1,muzzy_decay_ms:-1"
# A long-lived server: freed pages go back to the kernel within a second, by jemalloc's background thread even
# while no request comes (a burst of large uploads does not keep its memory).
SERVE_JEMALLOC_CONF = "background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0"
LONG_LIVED_COMMANDS = ("serve",)
# --precision of the commands that train or predict with a checkpoint's precision
PRECISION_CHOICES = PRECISIONS
PRECISION_HELP = ("auto (default): bfloat16 autocast where this CPU computes bf16 natively (AVX512-BF16 or AMX "
                  "instructions), else fp32, which is several times faster on CPUs without them; bf16; fp32")
EVAL_PRECISION_HELP = ("auto (default): the checkpoint's training precision where this CPU computes it natively, "
                       "else fp32; bf16; fp32")
# ferlab demo: the whole train-then-evaluate cycle on the embedded synthetic faces
DEMO_MODEL = "fer-resnet-s"
DEMO_EPOCHS = 6

# Modules that contribute sub-commands: each exposes ``add_commands(sub)``, adding parsers whose ``func``
# default is the command function. They must import heavy libraries inside the command functions only.
COMMAND_MODULES: tuple[str, ...] = (
    "ferlab.recognize.cli",  # predict, export
    "ferlab.explain.cli",  # explain, filters, feature-maps, layers
    "ferlab.study.cli",  # study
    "ferlab.serve.cli",  # serve
)


# --------------------------------------------------------------------------- models
def cmd_models(args: argparse.Namespace) -> int:
    from ferlab.models.summary import model_table

    if args.pretrained:
        return _print_pretrained(args.json, args.pattern)
    rows = model_table(args.pattern)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    head = f"{'name':<16} {'source':<11} {'Keras-style total':>17} {'trainable':>12} {'MFLOPs/img':>11}  description"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['name']:<16} {r['source']:<11} {r['keras_total']:>17,} {r['trainable']:>12,} "
              f"{r['mflops']:>11.1f}  {r['description']}")
    print("\nKeras-style total counts BatchNorm moving mean/variance as Keras does; MFLOPs = 2 x multiply-adds.")
    return 0


def _pct(entry: dict[str, Any], split: str, kind: str) -> str:
    v = entry.get("accuracy", {}).get(split, {}).get(kind)
    return f"{v:.2%}" if v is not None else "-"


# speed classes by forward-pass MFLOPs per face without TTA (machine-independent; the benches give img/s)
SPEED_CLASSES: tuple[tuple[float, str], ...] = ((100.0, "fast"), (500.0, "standard"), (float("inf"), "heavy"))


def _shelf_rows() -> list[dict[str, Any]]:
    """The shipped entries with their MFLOPs per face (an ensemble's: its members'; TTA multiplies it by the
    views) and speed class."""
    from ferlab.models.registry import create_model
    from ferlab.models.summary import flops_per_image
    from ferlab.pretrained import list_pretrained

    rows = list_pretrained()
    by_name = {r["name"]: r for r in rows}
    mflops: dict[str, float] = {}
    for r in rows:
        if r["kind"] == "single" and r.get("model") and r["model"] not in mflops:
            mflops[r["model"]] = flops_per_image(create_model(r["model"])) / 1e6
    for r in rows:
        members = [by_name[m] for m in r.get("members", [])] or [r]
        if all(m.get("model") in mflops for m in members):
            r["mflops"] = round(sum(mflops[m["model"]] for m in members), 1)
            r["speed"] = next(c for limit, c in SPEED_CLASSES if r["mflops"] <= limit)
    return rows


def _print_pretrained(as_json: bool, pattern: str = "*") -> int:
    """The shipped models and ensembles whose names match ``pattern``, with roles, stated accuracies (measured on
    the shipped files) and sizes."""
    from fnmatch import fnmatchcase

    from ferlab.pretrained import DEFAULT_RULE, default_rule_score, manifest_path

    rows = [r for r in _shelf_rows() if fnmatchcase(r["name"], pattern)]
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no pretrained models are shipped in this build ({manifest_path()} lists none)" if pattern == "*"
              else f"no shipped model matches {pattern!r}")
        return 0
    nw = max(24, *(len(r["name"]) for r in rows))
    rw = max(5, *(len(",".join(r["roles"])) for r in rows))
    head = (f"{'name':<{nw}} {'roles':<{rw}} {'nets':>4} {'labels':<7} {'MFLOPs':>7} {'speed':<8} {'MB':>5}  "
            f"{'PublicTest':>10} {'flip':>7} {'affine':>7}  {'PrivateTest':>11} {'flip':>7} {'affine':>7}  "
            f"{'FER+ val':>8} {'mCA val':>7} {'rule':>7} {'ECE':>6}")
    print(head)
    print("-" * len(head))
    for r in rows:
        rob = r.get("robustness", {}).get("val", {})
        score = default_rule_score(r)
        ece = r.get("calibration", {}).get("ece", {}).get("test", {}).get("none", {}).get("after")
        print(f"{r['name']:<{nw}} {','.join(r['roles']) or '-':<{rw}} {len(r.get('members', [])) or 1:>4} "
              f"{r.get('labels', 'fer2013'):<7} "
              f"{r.get('mflops', float('nan')):>7.0f} {r.get('speed', '?'):<8} {r.get('size_bytes', 0) / 1e6:>5.1f}  "
              f"{_pct(r, 'val', 'plain'):>10} {_pct(r, 'val', 'tta'):>7} {_pct(r, 'val', 'affine'):>7}  "
              f"{_pct(r, 'test', 'plain'):>11} {_pct(r, 'test', 'tta'):>7} {_pct(r, 'test', 'affine'):>7}  "
              f"{_fmt(rob.get('ferplus_agreement')):>8} {_fmt(rob.get('ferplus', {}).get('mean_corruption')):>7} "
              f"{_fmt(score):>7} {_fmt(ece):>6}")
    print("\nRoles: default = what predict and serve use when no --model is given, chosen by the rule below; "
          "most-accurate = the FER2013 ensemble; fast = the smallest, for slow machines; ferplus = the best single "
          "net trained on FER+ labels (8 classes) and ferplus-most-accurate the most accurate FER+ entry, their "
          "accuracies against FER+ majority votes. Accuracies measured on the shipped files with `ferlab "
          "evaluate --pretrained NAME --data fer2013.csv --split val|test "
          "[--tta flip|affine]` (bench/shelf.py): trained on Training, chosen on PublicTest, PrivateTest only "
          "reported. MFLOPs per face without TTA; --tta flip doubles it, affine multiplies it by 18. "
          "FER+ val: agreement with the FER+ majority on PublicTest (7 classes); mCA val: mean accuracy against it "
          "on the PublicTest corruption benchmark (bench/robustness.py); rule: their mean; ECE: expected "
          "calibration error on PrivateTest without TTA, after the shipped temperature (bench/calibration.py).\n")
    print("Default rule: " + DEFAULT_RULE)
    return 0


def _fmt(v: float | None) -> str:
    return f"{v:.1%}" if v is not None else "-"


# --------------------------------------------------------------------------- train
def _train_config(args: argparse.Namespace):
    """The TrainConfig of `ferlab train`'s flags (one per field, see train.config.config_flags) over --config."""
    from ferlab.train.config import TrainConfig, config_flags

    over: dict[str, Any] = {}
    for f in config_flags():
        v = getattr(args, f.field)
        if v is not None:
            over[f.field] = f.convert(v)
    if args.fp32:
        over["precision"] = "fp32"
    if args.config:
        return TrainConfig.from_file(args.config, **over)
    return TrainConfig.from_dict(over)


# training flags a resumed run takes (they change how this call runs, not what the run learns)
RESUME_FLAGS: tuple[str, ...] = ("threads", "eval_batch_size", "time_limit")


def cmd_train(args: argparse.Namespace) -> int:
    from ferlab.train.config import TrainConfig
    from ferlab.train.distributed import is_main
    from ferlab.train.fit import default_run_dir, fit

    if args.resume:
        from ferlab.train.config import config_flags

        given = [f.flag for f in config_flags() if getattr(args, f.field) is not None and f.field not in RESUME_FLAGS]
        given += [f for f, on in (("--config", args.config), ("--out", args.out), ("--fp32", args.fp32)) if on]
        if given:
            raise ValueError(f"--resume continues a run exactly as it was configured; drop {', '.join(given)}")
        run_dir = Path(args.resume)
        cfg_path = run_dir / "config.json"
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{run_dir}: not a run directory (no config.json)")
        try:
            saved = json.loads(cfg_path.read_text())
            cfg = TrainConfig.from_dict(saved["train"])
        except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
            raise ValueError(f"{cfg_path}: damaged run config ({type(e).__name__}: {e})") from e
        cfg = resume_data_path(cfg, saved)
        # how this call runs, not what the run learns: the saved time limit was the earlier call's
        cfg = dataclasses.replace(cfg, time_limit=args.time_limit or 0.0,
                                  **{k: getattr(args, k) for k in ("threads", "eval_batch_size")
                                     if getattr(args, k) is not None})
    else:
        cfg = _train_config(args)
        run_dir = Path(args.out) if args.out else default_run_dir(cfg)
        if run_dir.exists() and not run_dir.is_dir():
            raise ValueError(f"--out {run_dir} is a file; name a folder for the run")
        if (run_dir / "last.pt").exists():
            raise FileExistsError(f"{run_dir} already holds a run; use --resume {run_dir} or another --out")
    summary = fit(cfg, run_dir, resume=bool(args.resume), progress=not args.no_progress)
    if not is_main():  # under torchrun only rank 0 reports
        return 0
    best = summary.get(f"best_{cfg.monitor}")
    print(f"{'finished' if summary['finished'] else 'stopped'}: best {cfg.monitor} {best:.4f} at epoch "
          f"{summary['best_epoch']}; {summary['epochs_run']} epochs, {summary['train_seconds_total'] / 60:.1f} min; "
          f"run directory {run_dir}")
    print(evaluate_hint(run_dir))
    return 0


def evaluate_hint(run_dir: Path) -> str:
    """The command to evaluate a run, naming a split its data has: test, else val (a source without a test
    split, e.g. a CSV without a Usage column, has only train and the val part carved from it)."""
    try:
        sizes = json.loads((run_dir / "config.json").read_text())["split"]["sizes"]
    except (OSError, ValueError, KeyError, TypeError):
        sizes = {}
    split = "test" if sizes.get("test", 1) else "val"
    note = "" if split == "test" else "  (the data has no test split; val is the part held out for selection)"
    return f"next: ferlab evaluate {shlex.quote(str(run_dir))} --split {split}{note}"


def resume_data_path(cfg: Any, saved: dict[str, Any]) -> Any:
    """``cfg`` whose data path and FER+ votes path, as typed when the run started (kept for display), are replaced
    by the absolute paths saved beside them when the typed ones do not exist from here (a resume from another
    directory)."""
    data = saved.get("data")
    resolved = data.get("path") if isinstance(data, dict) else None
    if cfg.data and resolved and not Path(cfg.data).exists():
        cfg = dataclasses.replace(cfg, data=str(resolved))
    labels = saved.get("labels")
    votes = labels.get("file") if isinstance(labels, dict) else None
    if (cfg.labels not in ("", "fer2013", "ferplus") and votes and Path(votes).is_absolute()
            and not Path(cfg.labels).expanduser().exists()):
        cfg = dataclasses.replace(cfg, labels=str(votes))
    return cfg


def cmd_demo(args: argparse.Namespace) -> int:
    """Train then evaluate on the embedded synthetic data: the whole cycle in a few minutes on 2 cores."""
    from ferlab.checkpoint import CheckpointError
    from ferlab.evaluate import evaluate_checkpoints, format_report
    from ferlab.train.config import TrainConfig, resolve_config
    from ferlab.train.fit import check_same_options, fit

    run_dir = Path(args.out)
    cfg = TrainConfig(model=args.model, epochs=args.epochs, precision=args.precision)
    resume = (run_dir / "last.pt").exists()  # a demo run already there continues, or is left alone
    if resume:
        try:
            check_same_options(run_dir, resolve_config(cfg)[0])  # as fit resolves it
        except CheckpointError as e:
            raise CheckpointError(f"{e} (for a demo with these options: --out DIR)") from None
    fit(cfg, run_dir, resume=resume, progress=not args.no_progress)
    report = evaluate_checkpoints([run_dir], split="test", out_dir=run_dir / "eval-test", progress=False)
    print(format_report(report))
    print(f"\nrun directory {run_dir}: curves.png (training curves), eval-test/confusion.png, history.csv, "
          "best.safetensors\nThe embedded data is synthetic: it proves the pipeline, not accuracy on real faces.")
    return 0


# --------------------------------------------------------------------------- evaluate
def _labels_suffix(labels: str | None, checkpoint: Path) -> str:
    """The output folder's label suffix: ``-ferplus`` when FER+ labels are asked for, ``-fer2013`` when FER2013's
    are asked for a model trained on FER+ (so that scoring a run on the other labels never overwrites its own
    results); none for the labels the model was trained on."""
    if labels is None:
        return ""
    if labels != "fer2013":
        return "-ferplus"
    from ferlab.checkpoint import read_meta

    return "-fer2013" if read_meta(checkpoint).get("labels") else ""


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ferlab.evaluate import evaluate_checkpoints, format_report
    from ferlab.pretrained import pretrained_entry

    shipped = args.pretrained or []
    for name in shipped:
        pretrained_entry(name)  # a clear error naming the shipped models if ``name`` is not one
    specs = list(args.checkpoints) + shipped
    if not specs:
        raise ValueError("name the checkpoints to evaluate: run directories, .safetensors files or --pretrained NAME")
    out: Path | None = Path(args.out) if args.out else None
    if out is None and args.checkpoints:  # next to the first run; a shipped model writes files only with --out
        first = Path(args.checkpoints[0])
        base = first if first.is_dir() else first.parent if first.is_file() else None  # None: a shipped name
        if base is not None:
            out = base / (f"eval-{args.split}" + ("-ensemble" if len(specs) > 1 else "")
                          + {"none": "", "flip": "-tta"}.get(args.tta, f"-tta-{args.tta}")
                          + _labels_suffix(args.labels, first))
    if out is not None:  # a path that cannot be the output folder fails now, not after the evaluation
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out} is a file; name a folder for the report and figures")
        out.mkdir(parents=True, exist_ok=True)
    report = evaluate_checkpoints(specs, split=args.split, data_path=args.data, tta=args.tta,
                                  batch_size=args.batch_size, out_dir=out,
                                  progress=not (args.json or args.no_progress), precision=args.precision,
                                  labels=args.labels, skip_bad=args.skip_bad or None)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def cmd_predict_csv(args: argparse.Namespace) -> int:
    from ferlab.predict_csv import predict_csv

    n = predict_csv(args.checkpoint, args.data, args.out, split=args.split, tta=args.tta, precision=args.precision)
    print(f"wrote {n:,} predictions to {args.out}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from ferlab.data.source import open_data

    data = open_data(args.path, skip_bad=args.skip_bad)
    rows: dict[str, list[int]] = {}
    for s in sorted(set(data.split.tolist())):
        lab = data.labels[data.split == s]
        rows[s] = [int((lab == k).sum()) for k in range(len(data.class_names))] + [int(len(lab))]
    print(f"{data.source}: layout {data.layout}, {len(data):,} images, fingerprint {data.fingerprint}"
          + (f", {data.n_skipped} bad rows skipped" if data.n_skipped else ""))
    print(f"{'split':<10}" + "".join(f"{c:>9}" for c in data.class_names) + f"{'total':>9}")
    for s, counts in rows.items():
        print(f"{s:<10}" + "".join(f"{c:>9,}" for c in counts))
    for note in data.notes:
        print("note:", note)
    return 0


# --------------------------------------------------------------------------- robustness
def cmd_robustness(args: argparse.Namespace) -> int:
    from ferlab.robustness import format_robustness, robustness

    specs = list(args.checkpoints) + list(args.pretrained or [])
    if not specs:
        raise ValueError("name the model to measure: a run directory, a .safetensors file or --pretrained NAME")
    report = robustness(specs, split=args.split, data_path=args.data, faces=None if args.faces == 0 else args.faces,
                        seed=args.seed, corruptions=args.corruptions, tta=args.tta, labels=args.labels,
                        progress=not (args.json or args.no_progress))
    print(json.dumps(report, indent=2) if args.json else format_robustness(report))
    return 0


# --------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from ferlab import __version__
    from ferlab.train.config import config_flags

    p = argparse.ArgumentParser(prog="ferlab", description="Facial expression recognition: data, models, training, "
                                "evaluation. Run `ferlab COMMAND -h` for a command's options.")
    p.add_argument("--version", action="version", version=f"ferlab {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    m = sub.add_parser("models", help="list the registered models with parameter counts and MFLOPs")
    m.add_argument("--json", action="store_true", help="print JSON")
    m.add_argument("--pattern", default="*", help="shell-style name filter, e.g. 'r00*' (with --pretrained: "
                                                  "'ferplus*')")
    m.add_argument("--pretrained", action="store_true",
                   help="list the shipped pretrained models with their stated PublicTest/PrivateTest accuracy")
    m.set_defaults(func=cmd_models)

    t = sub.add_parser("train", help="train a model (resumable: --resume RUN_DIR)")
    t.add_argument("--config", help="TOML or JSON training config (flags override it); see configs/")
    for flag in config_flags():  # one per TrainConfig field, its help written once in train/config.py
        flag.add_to(t)
    t.add_argument("--fp32", action="store_true", help="plain fp32 (same as --precision fp32)")
    t.add_argument("--out", help="run directory (default runs/MODEL-TIMESTAMP)")
    t.add_argument("--resume", metavar="RUN_DIR",
                   help="continue an interrupted run from its last completed epoch (of the training flags only "
                   "--threads, --eval-batch-size and --time-limit may come with it)")
    t.add_argument("--no-progress", action="store_true", help="no progress bars (epoch lines only)")
    t.set_defaults(func=cmd_train)

    dm = sub.add_parser("demo", help="train then evaluate on the embedded synthetic faces (a few minutes)")
    dm.add_argument("--model", default=DEMO_MODEL, help=f"registered model name (default {DEMO_MODEL})")
    dm.add_argument("--epochs", type=int, default=DEMO_EPOCHS, help=f"number of epochs (default {DEMO_EPOCHS})")
    dm.add_argument("--precision", default="auto", choices=PRECISION_CHOICES, help=PRECISION_HELP)
    dm.add_argument("--out", default="runs/demo", help="run directory (resumed if interrupted)")
    dm.add_argument("--no-progress", action="store_true", help="no progress bars (epoch lines only)")
    dm.set_defaults(func=cmd_demo)

    e = sub.add_parser("evaluate", help="evaluate checkpoints (several: their ensemble too)")
    e.add_argument("checkpoints", nargs="*", metavar="RUN_OR_CKPT",
                   help="run directories or .safetensors checkpoints (or shipped names)")
    e.add_argument("--pretrained", action="append", metavar="NAME",
                   help="a shipped model (see `ferlab models --pretrained`); repeatable, combinable with "
                        "checkpoints (then their ensemble is evaluated too)")
    e.add_argument("--split", default="test", choices=("train", "val", "test"),
                   help="which rows: test (default; FER2013 PrivateTest), val (PublicTest or the carved part), train")
    e.add_argument("--data", help="data path (default: the data the first checkpoint was trained on)")
    e.add_argument("--tta", **tta_argument())
    e.add_argument("--labels", help="score against this label source: fer2013 (the data's own) or ferplus (FER+ "
                                    "majority votes; a fer2013new.csv beside the data, or its path); default: the "
                                    "labels the first checkpoint was trained on")
    e.add_argument("--batch-size", type=positive_int, default=512, help="images per forward pass (default 512)")
    e.add_argument("--skip-bad", action="store_true",
                   help="skip malformed rows of the data (default: as the first checkpoint's training run did)")
    e.add_argument("--precision", default="auto", choices=PRECISION_CHOICES, help=EVAL_PRECISION_HELP)
    e.add_argument("--out", help="where to write metrics.json and confusion.png (default RUN_DIR/eval-SPLIT; "
                                 "for shipped models only with --out)")
    e.add_argument("--json", action="store_true", help="print JSON")
    e.add_argument("--no-progress", action="store_true", help="no progress bars (for logs; --json implies it)")
    e.set_defaults(func=cmd_evaluate)

    from ferlab.corruptions import CORRUPTIONS, DEFAULT_FACES, DEFAULT_SEED

    rb = sub.add_parser("robustness", help="the corruption benchmark: accuracy on 13 corruptions x 5 severities")
    rb.add_argument("checkpoints", nargs="*", metavar="RUN_OR_CKPT",
                    help="run directories, .safetensors checkpoints or shipped names (several: their ensemble)")
    rb.add_argument("--pretrained", action="append", metavar="NAME", help="a shipped model; repeatable")
    rb.add_argument("--split", default="val", choices=("val", "test"),
                    help="val (default; PublicTest, to choose on) or test (PrivateTest, to report)")
    rb.add_argument("--data", help="data path (default: the data the model was trained on)")
    rb.add_argument("--faces", type=int, default=DEFAULT_FACES,
                    help=f"a seeded sample of this many faces of the split (default {DEFAULT_FACES}; 0: all)")
    rb.add_argument("--seed", type=int, default=DEFAULT_SEED,
                    help=f"seeds the sample and every corruption (default {DEFAULT_SEED})")
    rb.add_argument("--corruptions", nargs="+", choices=list(CORRUPTIONS), metavar="NAME",
                    help="only these (default: all): " + ", ".join(CORRUPTIONS))
    rb.add_argument("--tta", **tta_argument())
    rb.add_argument("--labels", help="score against fer2013 or ferplus (default: the labels the model was "
                                     "trained on)")
    rb.add_argument("--json", action="store_true", help="print JSON")
    rb.add_argument("--no-progress", action="store_true", help="no progress bars (--json implies it)")
    rb.set_defaults(func=cmd_robustness)

    pc = sub.add_parser("predict-csv", help="write a Kaggle-style submission (id,label) for an unlabelled CSV")
    pc.add_argument("checkpoint", metavar="RUN_OR_CKPT", help="run directory, .safetensors checkpoint or shipped name")
    pc.add_argument("--data", required=True, help="test.csv (id,feature) or any supported layout")
    pc.add_argument("--split", default="unlabeled", help="which rows to predict (default: the unlabelled ones)")
    pc.add_argument("--out", default="submission.csv", help="the CSV to write (default submission.csv)")
    pc.add_argument("--tta", **tta_argument())
    pc.add_argument("--precision", default="auto", choices=PRECISION_CHOICES, help=EVAL_PRECISION_HELP)
    pc.set_defaults(func=cmd_predict_csv)

    d = sub.add_parser("data", help="load a data path and print its layout, splits and class counts")
    d.add_argument("path", nargs="?", default=None, help="data path (default: the embedded synthetic faces)")
    d.add_argument("--skip-bad", action="store_true", help="skip malformed rows (counted) instead of stopping")
    d.set_defaults(func=cmd_data)

    for module in COMMAND_MODULES:
        importlib.import_module(module).add_commands(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ferlab command line; returns the exit status."""
    from ferlab.checkpoint import CheckpointError
    from ferlab.data.formats import DataError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    # OSError: a path's problem; FloatingPointError: a diverging loss (the epochs before it stay saved)
    except (DataError, CheckpointError, OSError, ValueError, KeyError, FloatingPointError) as e:
        if os.environ.get("FERLAB_DEBUG", "0") not in ("", "0"):
            raise  # the whole traceback, for bug reports
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"ferlab {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nferlab {args.command}: interrupted", file=sys.stderr)
        return 130


def command_of(argv: Sequence[str]) -> str | None:
    """The sub-command named in ``argv`` (the first word that is not an option), or None."""
    return next((a for a in argv if not a.startswith("-")), None)


def launcher_env(environ: Mapping[str, str], argv: Sequence[str] = ()) -> dict[str, str] | None:
    """The environment to re-execute Python in (jemalloc preloaded), or None to run as is.

    jemalloc is preloaded when installed, unless ``FERLAB_JEMALLOC=0`` or it is preloaded already, with
    ``MALLOC_CONF`` unless the user set one: for the batch jobs :data:`JEMALLOC_CONF` (with jemalloc's default
    page decay, freed activations go back to the kernel between steps and training is slower than with glibc;
    without decay it is faster; ``python bench/train_speed.py`` measures them), for ``ferlab serve``
    :data:`SERVE_JEMALLOC_CONF`, which returns memory after a burst (``python bench/serve_load.py`` measures it).
    """
    if environ.get("FERLAB_JEMALLOC", "1") == "0" or "jemalloc" in environ.get("LD_PRELOAD", ""):
        return None
    if not os.path.exists(JEMALLOC):
        return None
    env = dict(environ, LD_PRELOAD=(JEMALLOC + " " + environ.get("LD_PRELOAD", "")).strip())
    env.setdefault("MALLOC_CONF", SERVE_JEMALLOC_CONF if command_of(argv) in LONG_LIVED_COMMANDS else JEMALLOC_CONF)
    return env


def entry() -> None:
    """Console-script launcher: re-executes itself with jemalloc preloaded (see :func:`launcher_env`)."""
    env = launcher_env(os.environ, sys.argv[1:])
    if env is not None:
        os.execve(sys.executable, [sys.executable, "-m", "ferlab", *sys.argv[1:]], env)
    sys.exit(main())
