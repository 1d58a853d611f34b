"""Sub-commands of ferlab.study (registered through ferlab.cli.COMMAND_MODULES)."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_study(args: argparse.Namespace) -> int:
    from ferlab.study.plan import FER2013_SIZES, estimate_seconds, get_budget, plan_for, two_core_speedup
    from ferlab.study.report import write_report
    from ferlab.study.runner import run_study

    budget = get_budget(args.budget)
    experiments = plan_for(budget, args.data, args.threads)  # fails early when --data is required
    out = Path(args.out or f"runs/study-{budget.name}")
    if budget.needs_data:
        hours = sum(estimate_seconds(experiments, FER2013_SIZES, budget.kfold).values()) / 3600
        print(f"study {budget.name}: {len(experiments)} runs, about {hours:.1f} CPU-core hours of training on "
              f"FER2013-sized data (~{hours / two_core_speedup():.1f} h on 2 free cores, less for adopted runs); "
              f"finished runs are cached in {out / 'runs'} and an interrupted study resumes")
    else:
        print(f"study {budget.name}: {len(experiments)} runs into {out / 'runs'}")
    study = run_study(budget, out, data=args.data, threads=args.threads, progress=not args.no_progress,
                      adopt=args.adopt or ())
    paths = write_report(study)
    c = study.counts
    print(f"{c['trained']} runs trained, {c['resumed']} resumed, {c['reused']} reused in {study.seconds:.0f} s")
    print(f"report: {paths['html']} (self-contained) and {paths['markdown']}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add this package's sub-commands to the ferlab parser."""
    s = sub.add_parser("study", help="run (or reuse) the study's experiments and write report.html/report.md",
                       description="Train the experiments of a budget (cached by config: re-running costs "
                                   "seconds; an interrupted run resumes) and write OUT/report.html (self-contained) "
                                   "and OUT/report.md answering Q1-Q6, ensembles and k-fold.")
    s.add_argument("--data", help="data path (FER2013 for --budget full and long; default: the embedded synthetic "
                                  "faces)")
    s.add_argument("--budget", default="quick", choices=("quick", "full", "long"),
                   help="quick: synthetic faces, minutes (default); full: FER2013, hours, resumable; long: full with "
                        "the Q3 and k-fold runs trained to convergence, for a GPU (docs/gpu.md) or >1 day of 2 cores")
    s.add_argument("--out", help="output folder (default runs/study-BUDGET)")
    s.add_argument("--threads", type=int, default=0,
                   help="torch threads for training and evaluation "
                        "(0: auto, the cores not busy with other work at start)")
    s.add_argument("--adopt", action="append", metavar="RUN_DIR",
                   help="reuse a finished run trained elsewhere (e.g. by `ferlab train --config configs/...` or on "
                        "a GPU by bench/gpu_campaign.py) when its config and data (for a k-fold run: its fold's "
                        "data) match an experiment of the budget (repeatable)")
    s.add_argument("--no-progress", action="store_true", help="no progress bars (one line per epoch and run)")
    s.set_defaults(func=cmd_study)
