"""Run (or reuse) the study's experiments, one after another, and evaluate each under the split protocol.

Every run lives in ``OUT/runs/<hash>/``, the hash covering its full training config (minus the data path and thread
count) plus the data's fingerprint and, for k-fold runs, the fold. A finished run is reused as it is; an
interrupted one is resumed from its ``last.pt``. Protocol: train on train, select the checkpoint on val (FER2013's
PublicTest), report test (PrivateTest); k-fold runs also report their held-out fold.

Per run the runner adds ``study.json`` (the experiment) and ``eval.json`` + ``probs-<split>.npy`` (the evaluation,
recomputed only when missing).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ferlab.data.types import FerData
from ferlab.study.plan import Budget, Experiment, get_budget, plan_for
from ferlab.train.config import NOT_LEARNED, resolve_config

CACHE_VERSION = 1  # bump when a change must invalidate every cached run
NOT_HASHED = NOT_LEARNED  # TrainConfig fields that do not change what a run learns
# TrainConfig fields added after cache version 1, hashed only when set, so runs cached before they existed (at
# their defaults, which reproduce the old behaviour exactly) keep their hashes.
HASHED_WHEN_SET: dict[str, object] = {"mixup": 0.0, "cutmix": 0.0, "ema_decay": 0.0, "teachers": [],
                                      "distill_weight": 0.5, "distill_temperature": 4.0, "size_start": 0,
                                      "size_ramp_epochs": 0, "distill_offline": "", "labels": "fer2013",
                                      "label_mode": "majority", "init_from": "", "sam_rho": 0.0,
                                      "sam_adaptive": False}
STATUSES = ("trained", "resumed", "reused")


def run_hash(exp: Experiment, data_fingerprint: str) -> str:
    """16 hex digits identifying what ``exp`` learns: its config (``precision = "auto"`` as it resolves on this
    machine, as the run saves it), the data's content and its fold."""
    cfg = {k: v for k, v in resolve_config(exp.cfg)[0].to_dict().items()
           if k not in NOT_HASHED and not (k in HASHED_WHEN_SET and v == HASHED_WHEN_SET[k])}
    fold = {k: exp.tags[k] for k in ("fold", "k") if k in exp.tags}
    blob = json.dumps({"v": CACHE_VERSION, "cfg": cfg, "data": data_fingerprint, "fold": fold}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class RunResult:
    """One experiment after the runner: where it lives, what happened to it, and its evaluation."""

    experiment: Experiment
    run_dir: Path
    hash: str
    status: str  # one of STATUSES
    summary: dict[str, Any]
    evaluation: dict[str, Any]  # split -> classification metrics (+ "fold" for k-fold runs)
    history: list[dict[str, float]]
    meta: dict[str, Any]

    def probs(self, split: str) -> np.ndarray:
        """Softmax probabilities (N, K) of the selected checkpoint on ``split``."""
        return np.load(self.run_dir / f"probs-{split}.npy")

    def acc(self, split: str) -> float:
        return float(self.evaluation[split]["accuracy"])


@dataclass
class StudyRuns:
    """Everything the report needs: the budget, the data and split, and every run's result."""

    budget: Budget
    out: Path
    data: FerData
    splits: dict[str, np.ndarray]  # base split: row indices of data
    results: list[RunResult]
    protocol: str
    counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def by_role(self, role: str) -> list[RunResult]:
        return [r for r in self.results if r.experiment.role == role]

    def labels(self, split: str) -> np.ndarray:
        return self.data.labels[self.splits[split]]


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _evaluate(run_dir: Path, rows: dict[str, np.ndarray], data: FerData) -> dict[str, Any]:
    """Metrics and saved probabilities of the run's selected checkpoint on each split of ``rows``."""
    import torch

    from ferlab.evaluate import classification_metrics
    from ferlab.inference.loader import load_model

    model = load_model(run_dir)
    out: dict[str, Any] = {}
    for split, idx in rows.items():
        x = torch.from_numpy(data.images[idx]).unsqueeze(1)  # (N, 1, 48, 48) uint8
        probs = model.probabilities(x, progress=False, desc="predict").astype(np.float32)  # (N, K)
        np.save(run_dir / f"probs-{split}.npy", probs)
        out[split] = classification_metrics(data.labels[idx], probs, list(data.class_names))
    out["selected_epoch"] = model.meta.get("result", {}).get("epoch")
    (run_dir / "eval.json").write_text(json.dumps(out, indent=2))
    return out


def adopt_runs(run_dirs: list[str | Path], experiments: list[Experiment], data_fingerprint: str, out: Path,
               log: Callable[[str], None] = print, fold_fingerprints: dict[str, dict[str, int]] | None = None
               ) -> list[str]:
    """Copy finished runs trained elsewhere into the cache when config and data match an experiment.

    A run matches a q1-q3 experiment when its config and data fingerprint (``data_fingerprint``, the base data's)
    do, and a k-fold experiment when its config does and its data is that fold's (``fold_fingerprints``: fold
    fingerprint -> the fold's tags, see :func:`ferlab.study.folds.fold_fingerprint`). An experiment whose precision
    is ``auto`` takes a run trained in bf16 or fp32, whichever its device resolved it to. Returns the names of the
    experiments adopted. A run matching nothing is reported through ``log`` and left alone; an unfinished one raises
    ValueError (resume it with ``ferlab train --resume`` first).
    """
    import dataclasses

    from ferlab.train.config import TrainConfig

    fold_fingerprints = fold_fingerprints or {}

    def key(e: Experiment, fingerprint: str, **over: Any) -> str:
        # a fold run trains on its fold's file, whatever `synthetic` says
        return run_hash(dataclasses.replace(e, cfg=dataclasses.replace(
            e.cfg, **over, **({"synthetic": {}} if e.role == "kfold" else {}))), fingerprint)

    by_key = {key(e, data_fingerprint): e for e in experiments}
    for e in experiments:  # "auto" precision: bf16 where the device computes it natively, as a GPU does, else fp32
        if e.cfg.precision == "auto":
            for precision in ("bf16", "fp32"):
                by_key.setdefault(key(e, data_fingerprint, precision=precision), e)
    adopted = []
    for d in map(Path, run_dirs):
        meta, summary = _read_json(d / "config.json"), _read_json(d / "summary.json")
        if meta is None:
            raise FileNotFoundError(f"{d}: not a run directory (no config.json)")
        if not (summary or {}).get("finished"):
            raise ValueError(f"{d}: the run has not finished (summary.json missing or unfinished); finish it with "
                             f"`ferlab train --resume {d}` before adopting it")
        cfg = TrainConfig.from_dict(meta["train"])
        theirs = meta["data"]["fingerprint"]
        tags = fold_fingerprints.get(theirs)
        probe = Experiment("adopted", "kfold", cfg, dict(tags)) if tags else Experiment("adopted", "adopted", cfg)
        exp = by_key.get(key(probe, data_fingerprint if tags else theirs))
        if exp is None:
            log(f"{d}: its config or data match no experiment of this budget; not adopted")
            continue
        h = run_hash(exp, data_fingerprint)
        target = out / "runs" / h
        if (_read_json(target / "summary.json") or {}).get("finished"):
            log(f"{d}: {exp.name} is already in the cache ({target})")
            continue
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(d, target, ignore=lambda _dir, names: [n for n in names if n.startswith("eval-")])
        (target / "study.json").write_text(json.dumps(
            {"name": exp.name, "role": exp.role, "tags": exp.tags, "hash": h, "adopted_from": str(d.resolve()),
             "data_fingerprint": data_fingerprint}, indent=2))
        log(f"{d}: adopted as {exp.name} ({target})")
        adopted.append(exp.name)
    return adopted


def _trained_on(run_dir: Path) -> str | None:
    """The data fingerprint a run directory's config.json records (None when unreadable)."""
    return ((_read_json(run_dir / "config.json") or {}).get("data") or {}).get("fingerprint")


def _open_base(experiments: list[Experiment]) -> tuple[FerData, dict[str, np.ndarray]]:
    """The data all experiments share, and its base train/val/test split."""
    from ferlab.data.source import open_data
    from ferlab.data.splits import train_val_test

    first = experiments[0].cfg
    keys = ("data", "synthetic", "val_fraction", "split_seed")
    for e in experiments[1:]:
        if any(getattr(e.cfg, k) != getattr(first, k) for k in keys):
            raise ValueError(f"study plan: {e.name} uses other data or split options than {experiments[0].name}")
    data = open_data(first.data, skip_bad=first.skip_bad, synthetic=first.synthetic, progress=False)
    splits = train_val_test(data, val_fraction=first.val_fraction, seed=first.split_seed)
    return data, {k: v[data.labels[v] >= 0] for k, v in splits.items()}


def run_study(
    budget: str | Budget,
    out: str | Path,
    *,
    data: str | None = None,
    threads: int = 0,
    progress: bool = True,
    log: Callable[[str], None] = print,
    fit_log: Callable[[str], None] | None = None,
    adopt: list[str | Path] | tuple = (),
) -> StudyRuns:
    """Run or reuse every experiment of ``budget`` into ``out``/runs; returns the runs and their evaluations.

    ``threads`` (> 0) sets torch's thread count for training and evaluation. ``log`` gets one line per
    experiment; ``fit_log`` (default: ``log``) gets the trainer's epoch lines. ``adopt``: finished run
    directories trained elsewhere to copy into the cache first (see :func:`adopt_runs`).
    """
    import dataclasses

    import torch

    from ferlab.checkpoint import LAST_STATE
    from ferlab.study.folds import study_folds, write_fold
    from ferlab.train.fit import fit, read_history

    t0 = time.perf_counter()
    b = get_budget(budget) if isinstance(budget, str) else budget
    experiments = plan_for(b, data, threads)
    if threads:
        torch.set_num_threads(threads)
    out = Path(out)
    base_data, splits = _open_base(experiments)
    first = experiments[0].cfg
    folds = (study_folds(base_data, b.kfold, val_fraction=first.val_fraction, split_seed=first.split_seed)[1]
             if b.kfold else [])
    if adopt:
        adopt_runs(list(adopt), experiments, base_data.fingerprint, out, log,
                   {f.fingerprint: {"fold": f.index, "k": b.kfold} for f in folds})
    fit_log = fit_log or log
    results: list[RunResult] = []
    counts = dict.fromkeys(STATUSES, 0)
    n = len(experiments)
    for i, exp in enumerate(experiments, 1):
        h = run_hash(exp, base_data.fingerprint)
        run_dir = out / "runs" / h
        rows = {"val": splits["val"], "test": splits["test"]}
        cfg = exp.cfg
        if exp.role == "kfold":
            fold = folds[exp.tags["fold"]]
            path = write_fold(base_data, out / "data" / fold.file_name, fold.train, splits["val"], fold.fingerprint)
            cfg = dataclasses.replace(cfg, data=str(path.resolve()), synthetic={})
            rows["fold"] = fold.held_out
        summary = _read_json(run_dir / "summary.json")
        head = f"[{i:>{len(str(n))}}/{n}] {exp.name:<22} {exp.label}"
        if summary and summary.get("finished"):
            status = "reused"
        else:
            resume = (run_dir / LAST_STATE).is_file()
            if resume and exp.role == "kfold" and _trained_on(run_dir) != folds[exp.tags["fold"]].fingerprint:
                log(f"{head}: its fold data changed since it started (an older fold file); training it afresh")
                shutil.rmtree(run_dir)
                resume = False
            status = "resumed" if resume else "trained"
            log(f"{head}: {'resuming' if resume else 'training'} in {run_dir}")
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "study.json").write_text(json.dumps(
                {"name": exp.name, "role": exp.role, "tags": exp.tags, "hash": h, "budget": b.name,
                 "data_fingerprint": base_data.fingerprint}, indent=2))
            (run_dir / "eval.json").unlink(missing_ok=True)
            summary = fit(cfg, run_dir, resume=resume, progress=progress, log=fit_log)
        counts[status] += 1
        evaluation = _read_json(run_dir / "eval.json") or _evaluate(run_dir, rows, base_data)
        meta = json.loads((run_dir / "config.json").read_text())
        res = RunResult(exp, run_dir, h, status, summary, evaluation, read_history(run_dir), meta)
        results.append(res)
        fold_txt = f", held-out fold {res.acc('fold'):.3f}" if "fold" in evaluation else ""
        log(f"{head}: {status}; {summary['epochs_run']} epochs, {summary['train_seconds_total']:.0f} s; "
            f"val {res.acc('val'):.3f}, test {res.acc('test'):.3f}{fold_txt}")
    protocol = results[0].meta["split"]["text"] if results else ""
    return StudyRuns(b, out, base_data, splits, results, protocol, counts, time.perf_counter() - t0)
