"""Turn a lent GPU window into trained nets: the data packed to travel, a CUDA smoke check with a throughput
calibration, and one command that trains a plan of configs concurrently and packs the results to come back.

Steps (docs/gpu.md is the runbook, with the exact device calls):

    # here, once: FER2013's Training and PublicTest rows, packed losslessly in two parts (PrivateTest stays here)
    python bench/gpu_campaign.py pack --data ../shared/data/fer2013/fer2013.csv.gz
    # here, for a plan that distils offline: the teachers' soft targets, which travel instead of their weights
    python bench/gpu_campaign.py targets --plan PLAN --data ../shared/data/fer2013/fer2013.csv.gz
    # here, before the window: the shipped weights the plan does not load wait in .gpu/aside, so that both parts
    # travel with each call (it says whether they fit; if not, each call carries one part)
    python bench/gpu_campaign.py aside --plan PLAN
    # on the GPU machine, one call that carries both parts: assemble and verify the data, smoke-check CUDA, time
    # the plan's nets together, train them inside the budget and pack the results
    python3 bench/gpu_campaign.py stage .gpu/part1 .gpu/part2 && python3 bench/gpu_campaign.py run --smoke ...
    # (a plan whose parts do not fit together: call 1 carries part 1 and runs `smoke`, call 2 carries part 2 and
    # runs `run`, while the machine is still warm)
    # here again: the weights back, then the returned runs, evaluated and selected on PublicTest as usual
    python bench/gpu_campaign.py restore
    python bench/gpu_campaign.py unpack /work/.device/.../results.tar.gz.* --to runs/gpu

``--dry-run`` (smoke and run) rehearses the same code on the CPU: tiny data, two epochs (tests/test_gpu_campaign.py).

A plan (configs/gpu/*.toml) lists runs: a config, field overrides, and ``epochs = "fit"`` to size the epoch count
from the calibration so that the run's whole schedule ends inside the budget (capped at ``max_epochs``). Every
run also gets the budget as its ``time_limit``: it stops cleanly at an epoch's end rather than be cut off. A plan
may also name experiments of a ``ferlab study`` budget (``[[study]]``, e.g. the long budget's Q3 and k-fold runs):
they train exactly as the study would (their k-fold data is cut here from the staged pack, under the study's fold
fingerprints), start only when their fixed schedule fits, and ``ferlab study --adopt`` takes them back.
Checkpoints are chosen on PublicTest (val) by the trainer; PrivateTest never goes to the GPU machine: ``stage``
and ``run`` refuse data that holds it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
import time
import tomllib
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the GPU machine has the checkout, not an installed ferlab
    sys.path.insert(0, str(REPO))
PACK_NAME = "fer2013-trainval.ferpack"
VOTES_NAME = "fer2013new.csv"
MANIFEST = "manifest.json"
DEFAULT_STORE = Path("/tmp/ferlab-gpu")  # on the GPU machine: outlives one call while the machine stays warm
GPU_DIR = REPO / ".gpu"  # git-ignored: the parts, and the shipped weights set aside during a window
WEIGHTS = Path("ferlab") / "weights"  # the shipped weights, relative to the repository
RESULTS = "results.tar.gz"
FILE_LIMIT = 16 * 2**20 - 2**16  # what comes back: at most 8 files of 16 MiB (kept a little under), 64 MiB in all
BACK_LIMIT = 64 * 2**20
TREE_LIMIT = 64 * 2**20  # the working tree sent with each call
# share of the calibrated training throughput a fitted schedule counts on: an epoch also validates (about 4% of its
# work) and writes its checkpoints and history, and the time limit judges by the slowest of the last three epochs
FIT_SAFETY = 0.8
START_SECONDS = 45.0  # a run's start (imports, data decoding, CUDA context) before its first epoch
COLLECT_SECONDS = 40.0  # kept at the end of `run` for packing the results
CALIBRATION = "calibration.json"
MAX_CONCURRENCY = 8
TRAIN_ROWS = 28709  # FER2013's Training split: the epoch size a fitted schedule is sized for


def sha256_file(path: Path) -> str:
    from ferlab.data.cache import sha256_file as digest

    return digest(path)


def tracked_bytes(repo: Path = REPO) -> int | None:
    """The bytes that every device call sends besides what it carries: the tracked files and the untracked ones
    git does not ignore; None outside git."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=repo,
                             capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    files = {p for p in out.decode().split("\0") if p}
    return sum((repo / p).stat().st_size for p in files if (repo / p).is_file())


def git(repo: Path, *args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True).stdout
    except subprocess.CalledProcessError as e:
        raise SystemExit(f"git {' '.join(args)} failed in {repo}: {e.stderr.strip()}") from None


# --------------------------------------------------------------------------------------------------------------------
# pack and stage: the data's way to the GPU machine


def cmd_pack(args: argparse.Namespace) -> int:
    from ferlab.data.ferplus import VOTES_FILE, find_votes
    from ferlab.data.pack import write_pack
    from ferlab.data.source import open_data

    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    data = open_data(args.data, progress=True)
    if not {"train", "val"} <= set(data.split):
        raise SystemExit(f"{args.data}: needs Training and PublicTest rows to pack")
    t0 = time.perf_counter()
    whole = out / PACK_NAME
    header = write_pack(data, whole, splits=("train", "val"))
    print(f"packed {header['rows']:,} rows ({', '.join(f'{k} {v:,}' for k, v in header['splits'].items())}) of "
          f"{data.source} into {whole}: {whole.stat().st_size / 1e6:.1f} MB in {time.perf_counter() - t0:.0f} s")
    try:
        votes = find_votes(args.labels, args.data) if args.labels else None
    except FileNotFoundError as e:
        print(f"no FER+ votes travel ({e})")
        votes = None
    blob = whole.read_bytes()
    size = math.ceil(len(blob) / args.parts)
    parts = []
    for i in range(args.parts):
        name = f"{PACK_NAME}.{i + 1}"
        chunk = blob[i * size : (i + 1) * size]
        parts.append({"name": name, "bytes": len(chunk), "sha256": hashlib.sha256(chunk).hexdigest()})
        (out / f"part{i + 1}").mkdir(parents=True)
        (out / f"part{i + 1}" / name).write_bytes(chunk)
    manifest = {"pack": PACK_NAME, "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest(), "parts": parts,
                "votes": None, "source_fingerprint": header["source"]["fingerprint"], "splits": header["splits"]}
    if votes is not None:  # FER+ votes (MIT) ride with the last part, under the name the loader looks for
        shutil.copyfile(votes, out / f"part{args.parts}" / VOTES_FILE)
        manifest["votes"] = {"name": VOTES_FILE, "sha256": sha256_file(votes)}
    for i in range(args.parts):
        (out / f"part{i + 1}" / MANIFEST).write_text(json.dumps(manifest, indent=1))
    whole.unlink()
    tree = tracked_bytes()
    for i in range(args.parts):
        folder = out / f"part{i + 1}"
        n = sum(p.stat().st_size for p in folder.iterdir())
        total = f"; with the tracked tree {(n + tree) / 2**20:.1f} MiB of {TREE_LIMIT / 2**20:.0f}" if tree else ""
        print(f"{folder}: {n / 2**20:.1f} MiB{total}" + ("  TOO LARGE: pack with more --parts"
                                                         if tree and n + tree > TREE_LIMIT else ""))
    print("so that one call carries every part (a window of one call), set aside the shipped weights the plan does "
          "not load: python bench/gpu_campaign.py aside --plan PLAN")
    return 0


def cmd_stage(args: argparse.Namespace) -> int:
    """Check the parts in each folder against the manifest and keep them in the store; with every part there,
    assemble the pack and check it whole (checksum, then a full decode)."""
    store = Path(args.store)
    store.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] | None = None
    for folder in map(Path, args.parts):
        m = json.loads((folder / MANIFEST).read_text())
        if manifest is not None and m["sha256"] != manifest["sha256"]:
            raise SystemExit(f"{folder}: its manifest is for another pack than the other folders'")
        manifest = m
        for part in m["parts"]:
            src, kept = folder / part["name"], store / part["name"]
            if src.is_file():
                if src.stat().st_size != part["bytes"] or sha256_file(src) != part["sha256"]:
                    raise SystemExit(f"{src}: checksum mismatch (damaged in transfer?)")
                if kept.is_file() and kept.stat().st_size == part["bytes"] and sha256_file(kept) == part["sha256"]:
                    print(f"{src}: already staged (this machine stayed warm)")
                    continue
                shutil.copyfile(src, kept)
                print(f"staged {src} ({part['bytes'] / 2**20:.1f} MiB, checksum ok)")
        if m["votes"] and (folder / m["votes"]["name"]).is_file():
            if sha256_file(folder / m["votes"]["name"]) != m["votes"]["sha256"]:
                raise SystemExit(f"{folder / m['votes']['name']}: checksum mismatch")
            shutil.copyfile(folder / m["votes"]["name"], store / m["votes"]["name"])
        (store / MANIFEST).write_text(json.dumps(m, indent=1))
    if manifest is None:
        raise SystemExit("no part folder given")
    missing = [p["name"] for p in manifest["parts"] if not (store / p["name"]).is_file()]
    if missing:
        print(f"waiting for {', '.join(missing)} (stage its folder in the next call, while this machine is warm)")
        return 0
    return assemble(store, manifest)


def assemble(store: Path, manifest: dict[str, Any]) -> int:
    from ferlab.data.formats import load_data

    whole = store / manifest["pack"]
    if whole.is_file() and sha256_file(whole) == manifest["sha256"]:  # read whole by an earlier call: rows cached
        print(f"{whole}: already assembled and checked")
        return 0
    with open(whole, "wb") as f:
        for part in manifest["parts"]:
            f.write((store / part["name"]).read_bytes())
    if sha256_file(whole) != manifest["sha256"]:
        raise SystemExit(f"{whole}: the assembled pack's checksum does not match the manifest")
    t0 = time.perf_counter()
    # read once here: the payload and the decoded images are checked against their checksums, and the rows go to
    # the data cache, where every training process of `run` finds them instead of decoding the pack again
    data = load_data(whole, progress=False)
    if "test" in set(data.split):
        raise SystemExit(f"{whole} holds PrivateTest rows; they never go to the GPU machine")
    print(f"assembled {whole}: {len(data):,} rows, checksums ok, decoded in {time.perf_counter() - t0:.1f} s"
          + (f"; FER+ votes {manifest['votes']['name']}" if manifest.get("votes") else ""))
    return 0


# --------------------------------------------------------------------------------------------------------------------
# aside and restore: here, the shipped weights a plan does not load kept out of the tree during a window


def weights_needed(runs: list[PlannedRun], manifest: dict[str, Any], targets: Path | None = None) -> set[str]:
    """The shipped weights files the plan's runs load (teachers and warm starts named by shipped name), an
    ensemble's as its members' files; an offline-distillation run whose soft targets wait in ``targets`` (from
    `targets`) loads no teacher."""
    from ferlab.pretrained import RENAMED

    names: list[str] = []
    for r in runs:
        cfg = r.train_config()
        teachers = [] if targets is not None and targets_file(r, targets) is not None else cfg.teachers
        names += [n for n in (*teachers, cfg.init_from) if n]
    files: set[str] = set()
    while names:
        name = names.pop()
        entry = manifest.get(name) or manifest.get(RENAMED.get(name, ""))
        if entry is None:  # a run folder or a weights file, not a shipped name
            continue
        if entry.get("kind") == "ensemble":
            names += entry["members"]
        else:
            files.add(entry["file"])
    return files


def targets_file(run: PlannedRun, targets: Path) -> Path | None:
    """``targets``/NAME.safetensors when ``run`` distils offline and that file of its soft targets is there."""
    cfg = run.train_config()
    path = targets / f"{run.name}.safetensors"
    return path if cfg.teachers and cfg.distill_offline and path.is_file() else None


def cmd_targets(args: argparse.Namespace) -> int:
    """Compute here the soft targets of the plan's offline-distillation runs (their teachers over the Training
    images), one file a run in ``--out``: they travel in place of the teachers' weights."""
    from ferlab.train.fit import write_soft_targets

    out = Path(args.out)
    runs = [r for r in read_plan(args.plan) if r.train_config().distill_offline]
    if not runs:
        print(f"{args.plan}: no run distils offline; no soft targets to compute")
        return 0
    for r in runs:
        t0 = time.perf_counter()
        cfg = r.train_config(data=args.data)
        path = write_soft_targets(cfg, out / f"{r.name}.safetensors", progress=not args.no_progress, log=print)
        print(f"{r.name}: soft targets of {', '.join(cfg.teachers)} in {path} "
              f"({path.stat().st_size / 2**20:.1f} MiB, {time.perf_counter() - t0:.0f} s)", flush=True)
    return 0


def cmd_aside(args: argparse.Namespace) -> int:
    """Move the shipped weights that the plan does not load to ``.gpu/aside`` (out of the index and the tree, so
    that they do not travel) and say whether the tree and every part then fit in one call."""
    repo, aside, gpu = Path(args.repo), Path(args.aside), Path(args.gpu)
    weights = repo / WEIGHTS
    if git(repo, "status", "--porcelain", "--", str(WEIGHTS)).strip():
        raise SystemExit(f"{weights} differs from the last commit (or weights are already aside): commit the change "
                         "or run `restore` first")
    manifest = json.loads((weights / "manifest.json").read_text())
    runs = read_plan(args.plan)
    targets = gpu / "targets"
    keep = weights_needed(runs, manifest, targets)
    for r in runs:
        if (path := targets_file(r, targets)) is not None:
            from ferlab.train.distill import stale_teachers

            if stale := stale_teachers(path):
                raise SystemExit(f"{path}: computed from other weights of {', '.join(stale)} than those here: "
                                 f"compute them again (`targets --plan {args.plan}`)")
        elif r.train_config().distill_offline:
            print(f"{r.name}: its teachers travel; `python bench/gpu_campaign.py targets --plan {args.plan} --data "
                  "fer2013.csv.gz` computes their soft targets here, so that they stay behind")
    aside.mkdir(parents=True, exist_ok=True)
    moved = 0
    for f in sorted(weights.glob("*.safetensors")):
        if f.name in keep:
            continue
        git(repo, "rm", "--cached", "-q", "--", str(f.relative_to(repo)))
        moved += f.stat().st_size
        shutil.move(f, aside / f.name)
    print(f"set aside {moved / 2**20:.1f} MiB of shipped weights in {aside}"
          + (f" (kept, the plan loads them: {', '.join(sorted(keep))})" if keep else "")
          + "; `python bench/gpu_campaign.py restore` puts them back")
    tree = tracked_bytes(repo) or 0
    parts = sorted(p for p in gpu.glob("part*") if p.is_dir())
    if not parts:
        print(f"the tree now sends {tree / 2**20:.1f} MiB; no parts in {gpu} yet (run `pack`)")
        return 0
    if any(targets_file(r, targets) for r in runs):  # the soft targets go with the call that runs `run`
        parts.append(targets)
    total = tree + sum(f.stat().st_size for p in parts for f in p.iterdir())
    carry = ", ".join(f'"{p.relative_to(repo) if p.is_relative_to(repo) else p}"' for p in parts)
    if total <= TREE_LIMIT - 2**20:
        print(f"the tree and every part: {total / 2**20:.1f} MiB of {TREE_LIMIT / 2**20:.0f}: each call carries "
              f"them all (carry: [{carry}]): the window is one call of `stage` and `run --smoke`")
    else:
        print(f"the tree and every part: {total / 2**20:.1f} MiB, over {TREE_LIMIT / 2**20:.0f}: each call carries "
              "one part, and the second call needs the first's machine still warm")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    """Put the weights set aside back, and their index entries as the last commit has them."""
    repo, aside = Path(args.repo), Path(args.aside)
    weights = repo / WEIGHTS
    back = sorted(aside.glob("*.safetensors")) if aside.is_dir() else []
    for f in back:
        dst = weights / f.name
        if dst.exists():
            raise SystemExit(f"{dst} exists already: compare it with {f} by hand")
        shutil.move(f, dst)
        git(repo, "reset", "-q", "--", str(dst.relative_to(repo)))
    left = git(repo, "status", "--porcelain", "--", str(WEIGHTS)).strip()
    print(f"restored {len(back)} weights file(s) to {weights}"
          + (f"; still differs from the last commit:\n{left}" if left else "; it matches the last commit"))
    return 1 if left else 0


# --------------------------------------------------------------------------------------------------------------------
# plans


@dataclass
class PlannedRun:
    """One run of a plan: a config file, field overrides, and how many epochs ("fit": sized to the budget)."""

    name: str
    config: str
    overrides: dict[str, Any] = field(default_factory=dict)
    epochs: int | str = "fit"
    max_epochs: int = 300
    min_epochs: int = 10
    experiment: Any = None  # a ferlab.study.plan.Experiment: the run is that study experiment, exactly
    budget: str = ""  # the study budget of ``experiment``

    def train_config(self, **more: Any) -> Any:
        import dataclasses

        from ferlab.train.config import TrainConfig

        if self.experiment is not None:
            return dataclasses.replace(self.experiment.cfg, **more)
        path = REPO / self.config if not Path(self.config).is_absolute() else Path(self.config)
        return TrainConfig.from_file(path, **{**self.overrides, **more})

    @property
    def fold(self) -> int | None:
        """The k-fold index of a study k-fold run (None otherwise)."""
        return self.experiment.tags["fold"] if self.experiment is not None and self.experiment.role == "kfold" \
            else None


def read_plan(path: str | Path) -> list[PlannedRun]:
    """The runs of a plan file; every config is read and checked now, so a bad plan fails before any training."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise SystemExit(f"{path}: cannot read the plan ({e})") from None
    runs = []
    for i, r in enumerate(raw.get("run", [])):
        unknown = set(r) - {"name", "config", "set", "epochs", "max_epochs", "min_epochs"}
        if unknown or "name" not in r or "config" not in r:
            raise SystemExit(f"{path}: run {i + 1} needs name and config (and knows set, epochs, max_epochs, "
                             f"min_epochs){'; unknown: ' + ', '.join(sorted(unknown)) if unknown else ''}")
        run = PlannedRun(r["name"], r["config"], dict(r.get("set", {})), r.get("epochs", "fit"),
                         int(r.get("max_epochs", 300)), int(r.get("min_epochs", 10)))
        if run.epochs != "fit" and not (isinstance(run.epochs, int) and run.epochs > 0):
            raise SystemExit(f"{path}: run {run.name}: epochs must be a positive integer or \"fit\"")
        try:
            run.train_config()
        except (OSError, ValueError) as e:
            raise SystemExit(f"{path}: run {run.name}: {e}") from None
        runs.append(run)
    for i, st in enumerate(raw.get("study", [])):
        runs += study_runs(path, i, st)
    names = [r.name for r in runs]
    if not runs or len(set(names)) != len(names):
        raise SystemExit(f"{path}: a plan needs one or more runs with distinct names")
    weights = sum(checkpoint_bytes(r.train_config()) for r in runs)
    if weights > BACK_LIMIT - 4 * 2**20:
        raise SystemExit(f"{path}: the runs' fp16 checkpoints come to {weights / 2**20:.1f} MiB, more than can come "
                         f"back ({BACK_LIMIT / 2**20:.0f} MiB with room for logs): plan fewer or smaller nets")
    return runs


def study_runs(path: Path, i: int, entry: dict[str, Any]) -> list[PlannedRun]:
    """The runs of a ``[[study]]`` entry: the experiments of budget ``budget`` whose names match one of ``runs``
    (shell patterns, e.g. "q3/*-on/s0"), each with its fixed schedule."""
    from fnmatch import fnmatch

    from ferlab.study.plan import get_budget, plan_for

    unknown = set(entry) - {"budget", "runs"}
    if unknown or "budget" not in entry:
        raise SystemExit(f"{path}: study entry {i + 1} needs budget (and knows runs)"
                         f"{'; unknown: ' + ', '.join(sorted(unknown)) if unknown else ''}")
    patterns = entry.get("runs", ["*"])
    if not isinstance(entry["budget"], str) or not isinstance(patterns, list) \
            or not all(isinstance(p, str) for p in patterns):
        raise SystemExit(f"{path}: study entry {i + 1}: budget is a name and runs a list of patterns, "
                         'e.g. budget = "long", runs = ["q3/*/s0"]')
    try:
        budget = get_budget(entry["budget"])
        experiments = plan_for(budget, "staged pack")
    except ValueError as e:
        raise SystemExit(f"{path}: study entry {i + 1}: {e}") from None
    chosen = [e for e in experiments if any(fnmatch(e.name, p) for p in patterns)]
    if not chosen:
        raise SystemExit(f"{path}: study entry {i + 1}: no experiment of budget {budget.name} matches "
                         f"{', '.join(patterns)}")
    return [PlannedRun(f"study-{budget.name}-{e.name.replace('/', '-')}", f"ferlab study --budget {budget.name}",
                       epochs=e.cfg.epochs, min_epochs=e.cfg.epochs, experiment=e, budget=budget.name)
            for e in chosen]


def checkpoint_bytes(cfg: Any) -> int:
    """The bytes of a run's fp16 checkpoint as it comes back (two per parameter)."""
    from ferlab.models import create_model

    state = create_model(cfg.model, **cfg.model_args).state_dict()
    return 2 * sum(t.numel() for t in state.values() if t.is_floating_point())


def fitted_epochs(run: PlannedRun, images_per_s: float | None, seconds: float, rows: int = TRAIN_ROWS) -> int:
    """The epochs of ``run``: a fixed count as it is; "fit": as many as end inside ``seconds`` at
    ``images_per_s`` (its calibrated throughput), at most max_epochs; 0 when fewer than min_epochs would (a
    one-cycle schedule cut short is wasted). Without a calibration, min_epochs (the time limit guards it)."""
    if isinstance(run.epochs, int):
        return run.epochs
    if not images_per_s:
        return run.min_epochs
    n = min(run.max_epochs, int(FIT_SAFETY * max(0.0, seconds - START_SECONDS) * images_per_s / rows))
    return n if n >= run.min_epochs else 0


# --------------------------------------------------------------------------------------------------------------------
# launching runs


def child_env(dry_run: bool) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               PYTHONUNBUFFERED="1", FERLAB_JEMALLOC="0")
    if dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the rehearsal runs the same code on the CPU
    return env


@dataclass
class Launched:
    name: str
    run_dir: Path
    proc: subprocess.Popen
    started: float
    log: Any


def launch(name: str, cfg: Any, run_dir: Path, *, data: str | None, threads: int, time_limit: float,
           dry_run: bool, resume: bool = False) -> Launched:
    """Start ``ferlab train`` for ``cfg`` (a TrainConfig; with ``resume``, continue RUN_DIR instead) in its own
    process, logging to NAME.log beside RUN_DIR. ``time_limit``: seconds of training (0: none)."""
    import dataclasses

    run_dir.parent.mkdir(parents=True, exist_ok=True)
    limit = ["--time-limit", f"{max(1e-3, time_limit):g}"] if time_limit else []
    common = ["--no-progress", "--threads", str(threads), *limit]
    if resume:
        cmd = [sys.executable, "-m", "ferlab", "train", "--resume", str(run_dir), *common]
    else:
        cfg_file = run_dir.parent / f"{name}.train.json"
        cfg_file.write_text(json.dumps(dataclasses.replace(cfg, data=None).to_dict(), indent=1))
        cmd = [sys.executable, "-m", "ferlab", "train", "--config", str(cfg_file), "--out", str(run_dir), *common,
               *(["--data", data] if data else [])]
    log = open(run_dir.parent / f"{name}.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env(dry_run), cwd=REPO)
    return Launched(name, run_dir, proc, time.perf_counter(), log)


def last_epoch(run_dir: Path) -> dict[str, float] | None:
    """The last row of a run's history; None when there is none yet or it cannot be read (never an exception: a
    progress line must not end the campaign)."""
    from ferlab.train.fit import read_history

    try:
        rows = read_history(run_dir)
    except (OSError, ValueError, TypeError, KeyError):
        return None
    return rows[-1] if rows else None


def wait(launched: list[Launched], deadline: float, *, first: bool = False, report_every: float = 30.0) -> None:
    """Wait until every process has ended (with ``first``: any one of them), reporting progress now and then; at
    ``deadline`` stop every one still running (its best checkpoint so far is kept). The logs of the processes that
    ended are closed."""
    next_report = time.perf_counter() + report_every
    while True:
        running = [p for p in launched if p.proc.poll() is None]
        if not running or (first and len(running) < len(launched)):
            break
        now = time.perf_counter()
        if now > deadline:
            for p in running:
                print(f"{p.name}: past the deadline, stopped (its best checkpoint so far is kept)")
                stop(p.proc)
            break
        if now >= next_report:
            next_report = now + report_every
            print(" | ".join(progress_line(p) for p in launched), flush=True)
        time.sleep(1.0)
    for p in launched:
        if p.proc.poll() is not None:
            p.log.close()


def progress_line(p: Launched) -> str:
    row = last_epoch(p.run_dir)
    state = "done" if p.proc.poll() is not None else "running"
    if row is None:
        return f"{p.name}: {state}, starting"
    return f"{p.name}: epoch {int(row['epoch'])} val {row['val_acc']:.4f} ({row['images_per_s']:.0f} img/s)"


def threads_each(concurrency: int) -> int:
    return max(1, min(4, ((os.cpu_count() or 2) - 1) // max(1, concurrency)))


def device_name(dry_run: bool) -> str:
    import torch

    if dry_run or not torch.cuda.is_available():
        from ferlab.hardware import cpu_name

        return f"CPU ({cpu_name()})"
    return torch.cuda.get_device_name(0)


def require_gpu(dry_run: bool) -> None:
    import torch

    if not dry_run and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: this command is for the GPU machine (rehearse it with --dry-run)")


# --------------------------------------------------------------------------------------------------------------------
# smoke: the CUDA path of the trainer, evaluation and resume, and the plan's throughput


def cmd_smoke(args: argparse.Namespace) -> int:
    """Check augmentation on the device against the CPU's; train two epochs on synthetic faces (the first stopped by
    a time limit, the second by a resume) and check the device's validation accuracy against the CPU's on the same
    checkpoint; then time the plan's first net alone and all its nets together on a FER2013-sized synthetic set,
    and keep their images/s for `run` to size its schedules."""
    require_gpu(args.dry_run)
    out, store = Path(args.out), Path(args.store)
    out.mkdir(parents=True, exist_ok=True)
    work = store / "smoke"  # not under OUT: only a few files may come back
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.perf_counter()
    report: dict[str, Any] = {"device": device_name(args.dry_run), "checks": {}}
    report["checks"] = smoke_checks(work / "check", args.dry_run)
    runs = read_plan(args.plan)
    conc = min(args.concurrency or len(runs), len(runs), MAX_CONCURRENCY)
    # the first net alone, then the plan's nets together: how much running them at once costs each
    alone = calibrate(runs[:1], work / "alone", 1, args)
    speeds = calibrate(runs[:conc], work / "together", conc, args)
    report.update(concurrency=conc, images_per_s=speeds, alone={runs[0].name: alone[runs[0].name]},
                  together=round(sum(speeds.values())), seconds=round(time.perf_counter() - t0, 1))
    (store / CALIBRATION).write_text(json.dumps(report, indent=1))
    (out / CALIBRATION).write_text(json.dumps(report, indent=1))
    share = speeds[runs[0].name] / alone[runs[0].name]
    print(f"calibration: {report['together']:,} images/s with {conc} nets at once; {runs[0].name} keeps {share:.0%} "
          f"of its speed alone; saved to {store / CALIBRATION}; smoke + calibration {report['seconds']:.0f} s")
    return 0


def calibrate(runs: list[PlannedRun], work: Path, conc: int, args: argparse.Namespace) -> dict[str, float]:
    """Train ``runs`` together for a few epochs on a FER2013-sized synthetic set; each one's images/s in its last
    epoch (the first one pays for cuDNN's kernel search)."""
    rows = 600 if args.dry_run else TRAIN_ROWS
    synthetic = {"n_train": rows, "n_val": 256, "n_test": 16, "seed": 0}
    launched = []
    for r in runs:
        # offline distillation trains at plain training's speed, and the synthetic faces have no soft targets
        offline = {"teachers": [], "distill_offline": "", "distill_targets": ""} \
            if r.train_config().distill_offline else {}
        cfg = r.train_config(epochs=args.calibration_epochs, labels="fer2013", label_mode="majority",
                             early_stopping=0, synthetic=synthetic, **offline)
        launched.append(launch(r.name, cfg, work / r.name, data=None, threads=threads_each(conc),
                               time_limit=args.calibration_seconds, dry_run=args.dry_run))
    wait(launched, time.perf_counter() + args.calibration_seconds + 60)
    speeds: dict[str, float] = {}
    for p in launched:  # a net whose calibration failed loses its speed alone: the others keep theirs
        row = last_epoch(p.run_dir)
        if row is None:
            print(f"calibration run {p.name} gave no epoch (exit {p.proc.returncode}):\n{tail(work / f'{p.name}.log')}",
                  flush=True)
            continue
        speeds[p.name] = float(row["images_per_s"])
        print(f"{p.name}: {speeds[p.name]:,.0f} training images/s with {len(runs)} net(s) at once", flush=True)
    if not speeds:
        raise SystemExit("every calibration run failed")
    return speeds


def smoke_checks(work: Path, dry_run: bool) -> dict[str, Any]:
    """Trainer, resume and evaluation on the device, in ``work`` (emptied first): raises SystemExit naming the step
    that failed."""
    print(f"smoke check on {device_name(dry_run)}", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    synthetic = {"n_train": 512, "n_val": 256, "n_test": 64, "seed": 1}
    from ferlab.train.config import TrainConfig

    cfg = TrainConfig(model="fer-resnet-s", epochs=2, batch_size=64, synthetic=synthetic, augment=EVERY_AUGMENTATION,
                      mixup=0.2, cutmix=1.0, ema_decay=0.99, precision="auto", seed=0)
    checks: dict[str, Any] = {"augmentation": same_augmentation(dry_run)}
    print(f"ok: augmentation on the device matches the CPU's (largest difference {checks['augmentation']:.2g})")
    run_dir = work / "run"
    steps = [("train (stopped after epoch 1 by its time limit)", 1,
              lambda: launch("train", cfg, run_dir, data=None, threads=2, time_limit=1e-3, dry_run=dry_run)),
             ("resume (epoch 2)", 2, lambda: launch("resume", cfg, run_dir, data=None, threads=2, time_limit=0,
                                                    dry_run=dry_run, resume=True))]
    for what, epochs_done, start in steps:
        p = start()
        wait([p], time.perf_counter() + 300)
        row = last_epoch(run_dir)
        if p.proc.returncode != 0 or row is None or int(row["epoch"]) != epochs_done:
            raise SystemExit(f"smoke check failed at {what}:\n{tail(work / f'{p.name}.log')}")
        checks[what] = f"epochs done: {epochs_done}"
        print(f"ok: {what}")
    summary = json.loads((run_dir / "summary.json").read_text())
    if not summary["finished"] or summary["epochs_run"] != 2:
        raise SystemExit(f"smoke check failed: resume did not finish the run ({summary})")
    gpu_val = float(summary["best_val_acc"])  # the checkpoint's, as validated on the device
    ev = subprocess.run([sys.executable, "-m", "ferlab", "evaluate", str(run_dir), "--split", "val", "--json",
                         "--no-progress"], capture_output=True, text=True, env=child_env(True), cwd=REPO)
    if ev.returncode != 0:
        raise SystemExit(f"smoke check failed at evaluation:\n{ev.stderr[-3000:]}")
    cpu_val = float(json.loads(ev.stdout)["accuracy"])
    checks["evaluation"] = {"val_acc_on_device": gpu_val, "val_acc_on_cpu": cpu_val}
    print(f"ok: evaluation: val accuracy {gpu_val:.4f} on the device, {cpu_val:.4f} by `ferlab evaluate` on the CPU")
    if abs(gpu_val - cpu_val) > 0.03:  # the same weights; bf16 rounding moves a few borderline images at most
        raise SystemExit("smoke check failed: the device's validation accuracy differs from the CPU's")
    checks["waits_per_batch"] = waits_per_batch(dry_run, batches=2 if dry_run else 20)
    print(f"measured: the trainer waits for the device {checks['waits_per_batch']} time(s) a batch")
    return checks


def waits_per_batch(dry_run: bool, batches: int = 20) -> float | str:
    """How often one training batch waits for the GPU (each wait idles it while the CPU prepares the next batch):
    synchronising calls counted by CUDA's sync debug mode over ``batches`` batches (the running loss, read every
    ``SYNC_STEPS`` batches, is one of them). A figure to report, never a failure; a dry run trains the same
    batches on the CPU, where nothing waits (0)."""
    import warnings

    import torch

    from ferlab.models import create_model
    from ferlab.train.engine import train_one_epoch
    from ferlab.transforms import AugmentConfig, Normalizer

    device = torch.device("cpu" if dry_run else "cuda")
    g = torch.Generator().manual_seed(0)
    n = 64 * batches
    images = torch.randint(0, 256, (n, 1, 48, 48), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 7, (n,), generator=g)
    model = create_model("fer-resnet-s").to(device)
    run = partial(train_one_epoch, model, torch.optim.AdamW(model.parameters()), images, labels, batch_size=64,
                  aug=AugmentConfig(**EVERY_AUGMENTATION), normalizer=Normalizer("unit"), mixup=0.2,
                  precision="bf16", progress=False)
    try:
        run(g=torch.Generator().manual_seed(1))  # warm-up: cuDNN's choices and allocations
        if device.type != "cuda":
            return 0.0
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                run(g=torch.Generator().manual_seed(2))
            finally:
                torch.cuda.set_sync_debug_mode("default")
    except (RuntimeError, ValueError, TypeError) as e:
        return f"not measured ({type(e).__name__}: {e})"
    return round(sum("synchroniz" in str(w.message) for w in seen) / batches, 2)


# every training augmentation at once, so that the smoke check runs each on the device
EVERY_AUGMENTATION = {"rotation": 10, "shift": 0.05, "shear": 5, "zoom": 0.1, "hflip": True, "crop_pad": 4,
                      "erase_p": 0.25, "brightness": 0.2, "contrast": 0.3, "gamma": 1.4, "blur_p": 0.3, "noise": 0.03}


def same_augmentation(dry_run: bool) -> float:
    """The largest difference between a batch augmented on the device and on the CPU from the same draws."""
    import torch

    from ferlab.transforms import AugmentConfig, augment

    device = torch.device("cpu" if dry_run else "cuda")
    x = torch.rand(64, 1, 48, 48, generator=torch.Generator().manual_seed(0))
    cfg = AugmentConfig(**EVERY_AUGMENTATION)
    on_cpu = augment(x.clone(), cfg, torch.Generator().manual_seed(1))
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # the check is of the draws: the blur's convolution in full fp32
    try:
        on_device = augment(x.to(device), cfg, torch.Generator().manual_seed(1)).cpu()
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    diff = float((on_cpu - on_device).abs().max())
    if diff > 1e-3:  # float rounding differs between devices; a wrong draw moves pixels by far more
        raise SystemExit(f"smoke check failed: augmentation on {device} differs from the CPU's by {diff:.3g}")
    return diff


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"({path} unreadable)"


# --------------------------------------------------------------------------------------------------------------------
# run: the plan inside the budget, and its results packed to come back


def cmd_run(args: argparse.Namespace) -> int:
    t_start = time.perf_counter()
    require_gpu(args.dry_run)
    runs = use_targets(read_plan(args.plan), Path(args.targets))
    out, store = Path(args.out), Path(args.store)
    out.mkdir(parents=True, exist_ok=True)
    data = args.data or (str(store / PACK_NAME) if (store / PACK_NAME).is_file() else None)
    if data is None and not args.dry_run:
        raise SystemExit(f"no data: stage the pack first (it goes to {store / PACK_NAME}) or pass --data")
    if data is not None:
        check_no_test_rows(data)
    folds = fold_data([r for r in runs if r.fold is not None], data, store / "folds")  # before any launch
    smoke = None
    if args.smoke:  # a window of one call: the CUDA checks first, and no training if one fails
        smoke = smoke_checks(store / "smoke" / "check", args.dry_run)
    calib_path = store / CALIBRATION
    calibration = json.loads(calib_path.read_text()) if calib_path.is_file() else {}
    conc = min(args.concurrency or len(runs), len(runs), MAX_CONCURRENCY)
    if not calibration.get("images_per_s") and args.calibrate:  # a fresh machine: `smoke` ran on another one
        print(f"no calibration in {store}: timing the plan's nets first ({args.calibration_epochs} epochs)", flush=True)
        t0 = time.perf_counter()
        try:
            calibration = {"device": device_name(args.dry_run), "concurrency": conc, "measured_by": "run",
                           "images_per_s": calibrate(runs[:conc], store / "calibration", conc, args)}
        except SystemExit as e:  # train anyway: the runs' own time limit still guards the budget
            print(f"calibration failed, fitted schedules get their min_epochs: {e}")
            calibration = {}
        else:
            calibration["seconds"] = round(time.perf_counter() - t0, 1)
            calib_path.write_text(json.dumps(calibration, indent=1))
    speeds = calibration.get("images_per_s", {})
    budget = args.budget - COLLECT_SECONDS  # the training's share of the command
    work = store / "runs" / time.strftime("%Y%m%d-%H%M%S")  # not under OUT: only the packed results come back
    campaign: dict[str, Any] = {"device": device_name(args.dry_run), "plan": str(args.plan), "budget_s": args.budget,
                                "concurrency": conc, "data": Path(data).name if data else "synthetic",
                                "calibration": calibration or None, "smoke": smoke, "runs": {}}
    print(f"{len(runs)} run(s) on {campaign['device']}, {conc} at a time, "
          f"{budget - (time.perf_counter() - t_start):.0f} s of training left"
          + ("" if speeds else "; no calibration: fitted schedules use their min_epochs"))
    pending, active = list(runs), []
    try:
        while pending or active:
            while pending and len(active) < conc:
                r = pending.pop(0)
                left = budget - (time.perf_counter() - t_start)
                if left < START_SECONDS + 30:
                    print(f"{r.name}: not started, {left:.0f} s left")
                    campaign["runs"][r.name] = {"started": False}
                    continue
                speed = run_speed(r, runs, speeds)
                epochs = 2 if args.dry_run else fitted_epochs(r, speed, left)
                if r.experiment is not None and not args.dry_run and not speed:
                    print(f"{r.name}: not started, no calibrated speed for its net (run `smoke` with this plan first)")
                    campaign["runs"][r.name] = {"started": False}
                    continue
                if not epochs or (r.experiment is not None and not args.dry_run and not fits(r, speed, left)):
                    print(f"{r.name}: not started, fewer than its {r.min_epochs} epochs fit in {left:.0f} s")
                    campaign["runs"][r.name] = {"started": False}
                    continue
                more: dict[str, Any] = {"epochs": epochs}
                if data is None:
                    more["synthetic"] = {"n_train": 400, "n_val": 128, "n_test": 16, "seed": 0}
                cfg = r.train_config(**more)
                run_data = folds.get(r.name, data)
                campaign["runs"][r.name] = {"started": True, "epochs": epochs, "config": r.config,
                                            "overrides": r.overrides, "model": cfg.model}
                if r.experiment is not None:
                    campaign["runs"][r.name]["study"] = {"budget": r.budget, "experiment": r.experiment.name}
                how = "rehearsal" if args.dry_run else "fitted" if r.epochs == "fit" else "fixed"
                print(f"{r.name}: {cfg.model}, {epochs} epochs ({how}) from {r.config}", flush=True)
                active.append(launch(r.name, cfg, work / r.name, data=run_data, threads=threads_each(conc),
                                     time_limit=left - START_SECONDS, dry_run=args.dry_run))
            wait(active, t_start + budget, first=True)
            for p in [p for p in active if p.proc.poll() is not None or time.perf_counter() > t_start + budget]:
                finish(p, campaign["runs"][p.name], work)
                active.remove(p)
    finally:  # whatever ended the loop (an error in this script included), what was trained comes back
        for p in active:
            try:
                finish(p, campaign["runs"][p.name], work)
            except Exception as e:  # noqa: BLE001 (one run's record must not keep the others from coming back)
                print(f"{p.name}: could not be finished cleanly ({type(e).__name__}: {e})", flush=True)
        campaign["train_seconds"] = round(time.perf_counter() - t_start, 1)
        files = collect(work, out, store / "collect", campaign)
        print(f"campaign done in {time.perf_counter() - t_start:.0f} s; {len(files)} file(s) to bring back: "
              + ", ".join(f"{f.name} ({f.stat().st_size / 2**20:.1f} MiB)" for f in files))
    return 0 if all(r.get("returncode") == 0 for r in campaign["runs"].values() if r.get("started")) else 1


def use_targets(runs: list[PlannedRun], targets: Path) -> list[PlannedRun]:
    """``runs`` with ``distill_targets`` set where a run's soft targets came along (see `targets`): those runs
    need neither their teachers' files nor their pass. The path is the repository's relative one where it lies
    inside it (runs start there), so the recipe that comes back names the same file here as on the GPU machine."""
    for r in runs:
        if (path := targets_file(r, targets)) is not None:
            path = path.resolve()
            r.overrides["distill_targets"] = str(path.relative_to(REPO) if path.is_relative_to(REPO) else path)
            print(f"{r.name}: soft targets from {path} in place of its teachers", flush=True)
    return runs


def run_speed(run: PlannedRun, runs: list[PlannedRun], speeds: dict[str, float]) -> float | None:
    """The calibrated images/s of ``run``, or of a calibrated run of the plan that trains the same net."""
    if run.name in speeds:
        return speeds[run.name]
    cfg = run.train_config()
    for other in runs:
        if other.name in speeds:
            o = other.train_config()
            if (o.model, o.model_args, o.batch_size) == (cfg.model, cfg.model_args, cfg.batch_size):
                return speeds[other.name]
    return None


def fits(run: PlannedRun, images_per_s: float | None, seconds: float, rows: int = TRAIN_ROWS) -> bool:
    """Whether ``run``'s fixed schedule ends inside ``seconds`` at its calibrated speed (a study run that cannot
    finish is useless: the study adopts finished runs only). Without a calibration: False."""
    if not images_per_s:
        return False
    return START_SECONDS + int(run.epochs) * rows / (FIT_SAFETY * images_per_s) <= seconds


def fold_data(runs: list[PlannedRun], data: str | None, folds: Path) -> dict[str, str]:
    """The data of each study k-fold run of ``runs``, by run name: its fold cut from the staged pack (train +
    val), written once under the study's fold fingerprint, so that ``ferlab study --adopt`` recognises the run."""
    if not runs:
        return {}
    from ferlab.data.formats import load_data
    from ferlab.study.folds import study_folds, write_fold
    from ferlab.study.plan import get_budget

    if data is None:
        raise SystemExit(f"{runs[0].name}: a k-fold run needs the staged data (its folds are cut from it)")
    base = load_data(data, progress=False)
    cuts: dict[tuple, tuple] = {}  # (k, val_fraction, split_seed) -> study_folds(...): the folds are cut once
    out = {}
    for run in runs:
        cfg = run.experiment.cfg
        key = (get_budget(run.budget).kfold, cfg.val_fraction, cfg.split_seed)
        if key not in cuts:
            cuts[key] = study_folds(base, key[0], val_fraction=key[1], split_seed=key[2])
        split, cut = cuts[key]
        fold = cut[run.fold]
        out[run.name] = str(write_fold(base, folds / fold.file_name, fold.train, split["val"], fold.fingerprint))
    return out


def check_no_test_rows(data: str) -> None:
    from ferlab.data.pack import is_pack, pack_info
    from ferlab.data.source import open_data

    splits = ({k for k, n in pack_info(data)["splits"].items() if n} if is_pack(data)
              else set(open_data(data, progress=False).split))
    if "test" in splits:
        raise SystemExit(f"{data} holds test (PrivateTest) rows; they never go to the GPU machine")


def stop(proc: subprocess.Popen) -> None:
    """End a training process: SIGTERM, then SIGKILL after 20 s (its files are written atomically)."""
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def finish(p: Launched, record: dict[str, Any], work: Path) -> None:
    if p.proc.poll() is None:
        stop(p.proc)
    p.log.close()
    record["returncode"] = p.proc.returncode
    record["wall_s"] = round(time.perf_counter() - p.started, 1)
    summary = p.run_dir / "summary.json"
    try:
        s = json.loads(summary.read_text()) if summary.is_file() else {}
    except (OSError, ValueError) as e:  # a run stopped while writing it: what it trained still comes back
        print(f"{p.name}: {summary} unreadable ({e})", flush=True)
        s = {}
    record.update({k: s.get(k) for k in ("finished", "epochs_run", "best_epoch", "best_val_acc", "out_of_time",
                                         "train_seconds_total") if k in s})
    state = "ok" if p.proc.returncode == 0 else f"exit {p.proc.returncode}"
    best = record.get("best_val_acc")
    print(f"{p.name}: {state}; best val {'-' if best is None else f'{best:.4f}'} at epoch {record.get('best_epoch')}"
          f" of {record.get('epochs_run')} run, {record['wall_s']:.0f} s", flush=True)
    if p.proc.returncode != 0:
        print(tail(work / f"{p.name}.log", 15))


def half_precision_copy(src: Path, dst: Path) -> None:
    """The checkpoint ``src`` with its floating tensors stored as fp16 (half the bytes to bring back)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(src), "pt") as f:
        meta = f.metadata()
    state = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in load_file(str(src)).items()}
    save_file(state, str(dst), metadata=meta)


def collect(work: Path, out: Path, staging: Path, campaign: dict[str, Any]) -> list[Path]:
    """Each run's fp16 best checkpoint, config, history, curves, summary and log in one tar.gz, cut into pieces
    of at most 16 MiB, plus campaign.json: at most 8 files, 64 MiB together."""
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name in campaign["runs"]:
        src, dst = work / name, staging / name
        if not src.is_dir():
            continue
        dst.mkdir(parents=True)
        if (src / "best.safetensors").is_file():
            half_precision_copy(src / "best.safetensors", dst / "best.safetensors")
        for f in ("config.json", "history.csv", "curves.png", "summary.json"):
            if (src / f).is_file():
                shutil.copyfile(src / f, dst / f)
        for f in (f"{name}.log", f"{name}.train.json"):
            if (work / f).is_file():
                shutil.copyfile(work / f, dst / f.replace(f"{name}.", "train."))
    (staging / "campaign.json").write_text(json.dumps(campaign, indent=1))
    archive = staging.parent / RESULTS
    with tarfile.open(archive, "w:gz") as tar:
        for item in sorted(staging.iterdir()):
            tar.add(item, arcname=item.name)
    blob = archive.read_bytes()
    archive.unlink()
    if len(blob) > BACK_LIMIT - 2**20:
        raise SystemExit(f"the results are {len(blob) / 2**20:.1f} MiB, over what can come back: plan fewer runs")
    pieces = max(1, math.ceil(len(blob) / FILE_LIMIT))
    files = []
    for i in range(pieces):
        f = out / f"{RESULTS}.{i + 1}"
        f.write_bytes(blob[i * FILE_LIMIT : (i + 1) * FILE_LIMIT])
        files.append(f)
    (out / "campaign.json").write_text(json.dumps(campaign, indent=1))
    return [*files, out / "campaign.json"]


# --------------------------------------------------------------------------------------------------------------------
# unpack: back here, the returned pieces into run folders


def cmd_unpack(args: argparse.Namespace) -> int:
    pieces = sorted(map(Path, args.pieces), key=lambda p: int(p.suffix.lstrip(".") or 0))
    if not pieces or any(not p.name.startswith(RESULTS + ".") for p in pieces):
        raise SystemExit(f"give the {RESULTS}.N pieces the run command wrote")
    numbers = [int(p.suffix.lstrip(".")) for p in pieces]
    if numbers != list(range(1, len(pieces) + 1)):
        raise SystemExit(f"pieces {numbers} given; all of 1..N are needed, in one call")
    to = Path(args.to)
    to.mkdir(parents=True, exist_ok=True)
    blob = b"".join(p.read_bytes() for p in pieces)
    tmp = to / RESULTS
    tmp.write_bytes(blob)
    try:
        with tarfile.open(tmp, "r:gz") as tar:
            tar.extractall(to, filter="data")  # refuses absolute paths, links out of the folder and devices
    except (tarfile.TarError, EOFError, OSError) as e:
        raise SystemExit(f"cannot unpack the results ({e}): a piece is missing or damaged") from None
    finally:
        tmp.unlink()
    campaign = json.loads((to / "campaign.json").read_text())
    print(f"unpacked into {to}: trained on {campaign['device']} in {campaign['train_seconds'] / 60:.1f} min")
    for name, r in campaign["runs"].items():
        best = r.get("best_val_acc")
        print(f"  {to / name}: " + (f"{r.get('epochs_run')} of {r.get('epochs')} epochs, best val "
                                   f"{'-' if best is None else f'{best:.4f}'} at epoch {r.get('best_epoch')}"
                                   if r.get("started") else "not started"))
    studies = sorted({r["study"]["budget"] for r in campaign["runs"].values() if r.get("study")})
    for budget in studies:
        done = [to / name for name, r in campaign["runs"].items()
                if r.get("study", {}).get("budget") == budget and r.get("finished")]
        print(f"study runs ({len(done)} finished): take them into the study with\n  ferlab study --budget {budget} "
              f"--data fer2013.csv.gz --out runs/study-{budget} " + " ".join(f"--adopt {d}" for d in done))
    hardware = f"one {campaign['device']}, {campaign['concurrency']} nets at once"
    print("next, on PublicTest (val) only: ferlab evaluate RUN --data fer2013.csv.gz --split val --tta affine; "
          "bench/ensemble.py for ensembles; then ship a winner with\n"
          f'  python bench/ship_model.py {to}/NAME --name NAME --data fer2013.csv.gz --dtype fp16 '
          f'--config {to}/NAME/train.json --hardware "{hardware}"')
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="pack FER2013's Training and PublicTest rows into parts that travel")
    p.add_argument("--data", required=True, help="fer2013.csv[.gz]")
    p.add_argument("--labels", default="ferplus", help="FER+ votes to send along: ferplus (found beside the data), "
                   "a fer2013new.csv path, or '' for none")
    p.add_argument("--out", default=str(GPU_DIR), help="output folder (git-ignored)")
    p.add_argument("--parts", type=int, default=2, help="parts: each call carries all of them when they fit beside "
                   "the tree (see `aside`), else one")
    p = sub.add_parser("targets", help="here, before a window: the soft targets of the plan's offline-distillation "
                       "runs, to travel in place of their teachers' weights")
    p.add_argument("--plan", required=True, help="plan file (configs/gpu/*.toml)")
    p.add_argument("--data", required=True, help="fer2013.csv[.gz], as packed")
    p.add_argument("--out", default=str(GPU_DIR / "targets"), help="output folder (git-ignored)")
    p.add_argument("--no-progress", action="store_true")
    p = sub.add_parser("aside", help="here, before a window: set aside the shipped weights the plan does not load, "
                       "so that every part travels with each call")
    p.add_argument("--plan", required=True, help="plan file (configs/gpu/*.toml)")
    p = sub.add_parser("restore", help="here, after a window: put the weights set aside back")
    for q in (sub.choices["aside"], p):
        q.add_argument("--repo", default=str(REPO), help=argparse.SUPPRESS)
        q.add_argument("--aside", default=str(GPU_DIR / "aside"), help=argparse.SUPPRESS)
    sub.choices["aside"].add_argument("--gpu", default=str(GPU_DIR), help="the folder of the parts (from `pack`)")
    p = sub.add_parser("stage", help="on the GPU machine: check and keep parts; assemble the pack when all are there")
    p.add_argument("parts", nargs="+", help="part folders (.gpu/partN)")
    p.add_argument("--store", default=str(DEFAULT_STORE))
    for name, helptext in (("smoke", "on the GPU machine: CUDA smoke check and throughput calibration"),
                           ("run", "on the GPU machine: train the plan inside the budget and pack the results")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--plan", required=True, help="plan file (configs/gpu/*.toml)")
        p.add_argument("--out", required=True, help="output folder ($OUT on the GPU machine)")
        p.add_argument("--store", default=str(DEFAULT_STORE))
        p.add_argument("--concurrency", type=int, default=0, help="nets at once (0: every run of the plan)")
        p.add_argument("--dry-run", action="store_true", help="rehearse on the CPU: tiny data, two epochs")
        p.add_argument("--calibration-epochs", type=int, default=3)
        p.add_argument("--calibration-seconds", type=float, default=60.0)
        if name == "run":
            p.add_argument("--smoke", action="store_true", help="run the smoke checks first (a window of one "
                           "call); no training if one fails")
            p.add_argument("--no-calibrate", dest="calibrate", action="store_false",
                           help="without a calibration from `smoke`, fitted schedules get their min_epochs instead "
                                "of timing the nets first")
            p.add_argument("--data", default=None, help="data (default: the staged pack)")
            p.add_argument("--targets", default=str(GPU_DIR / "targets"), help="soft targets from `targets`, "
                           "used by the runs they were computed for")
            p.add_argument("--budget", type=float, default=480.0, help="seconds for the whole command")
    p = sub.add_parser("unpack", help="here: the returned results.tar.gz.N pieces into run folders")
    p.add_argument("pieces", nargs="+")
    p.add_argument("--to", default="runs/gpu")
    args = ap.parse_args(argv)
    commands = {"pack": cmd_pack, "targets": cmd_targets, "stage": cmd_stage, "aside": cmd_aside,
                "restore": cmd_restore, "smoke": cmd_smoke, "run": cmd_run, "unpack": cmd_unpack}
    return commands[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
