"""The resumable training run: data, model, epochs, checkpoints, history and curves in one run directory.

RUN_DIR/
  config.json        the checkpoint metadata: model, preprocessing, data, split protocol, training config
  best.safetensors   the weights with the best validation metric, metadata included
  last.pt            the state after the last completed epoch (resume point), written atomically
  history.csv        one row per epoch; curves.png: accuracy and loss, train vs val
  summary.json       written when the run ends

Launched by ``torchrun`` (WORLD_SIZE > 1) the same call trains with DistributedDataParallel: every rank
loads the data, trains on its slice of each global batch (``batch_size`` stays the global batch), metrics
are summed over ranks, and only rank 0 prints and writes files. See :mod:`ferlab.train.distributed`.
"""

from __future__ import annotations

import csv
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import ferlab
from ferlab import hardware
from ferlab.checkpoint import BEST, LAST_STATE, CheckpointError, atomic_write, save_checkpoint
from ferlab.data.ferplus import apply_labels
from ferlab.data.source import open_data
from ferlab.data.splits import train_val_test
from ferlab.data.types import FerData
from ferlab.models import count_params, create_model
from ferlab.train import distributed, seeds
from ferlab.train.callbacks import BestCheckpoint, EarlyStopping
from ferlab.train.config import NOT_LEARNED, TrainConfig, resolve_config
from ferlab.train.engine import evaluate, steps_per_epoch, train_one_epoch
from ferlab.train.optim import build_optimizer, build_schedule
from ferlab.train.sam import SharpnessAware
from ferlab.train.seeds import epoch_generator  # noqa: F401 (part of this module's API)
from ferlab.train.state import ResumeState
from ferlab.transforms import Normalizer, expand_offline, progressive_side

SOFT_TARGETS = "soft_targets.safetensors"  # offline distillation's teacher targets, kept for a resume

INITS: dict[str, Callable[[torch.Tensor], Any]] = {
    "xavier": nn.init.xavier_uniform_,
    "he": lambda w: nn.init.kaiming_normal_(w, nonlinearity="relu"),
}


def init_weights(model: nn.Module, scheme: str) -> None:
    """Re-initialise conv and linear weights (biases to zero) with ``scheme``; 'default' keeps PyTorch's."""
    if scheme == "default":
        return
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            INITS[scheme](m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


@dataclass
class Prepared:
    """The data of a run, as tensors: images (N, 1, 48, 48) uint8 and labels (N,) int64 per split (the training
    split's labels are (N, K) float vote distributions in the FER+ probability and crossentropy modes)."""

    data: FerData
    splits: dict[str, np.ndarray]
    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    labels: dict[str, str] | None = None  # where the labels came from when not the data's own (FER+)
    base_fingerprint: str = ""  # the fingerprint of the data file itself (differs from data's under FER+ labels)

    @property
    def fingerprints(self) -> set[str]:
        """The fingerprints that name these rows: a checkpoint trained on either saw the same splits."""
        return {self.data.fingerprint, self.base_fingerprint or self.data.fingerprint}


def split_protocol(data: FerData, cfg: TrainConfig, splits: dict[str, np.ndarray]) -> dict[str, Any]:
    """A description of which rows were used for what, saved with the model."""
    carved = not len(data.indices("val"))
    if data.layout in ("fer2013-csv", "icml-csv") and not carved:
        text = "FER2013: train on Training; select on PublicTest (val); PrivateTest (test) used only to report"
    elif carved:
        text = (f"train on train minus a stratified {cfg.val_fraction:.0%} part held out as val "
                f"(seed {cfg.split_seed}); select on val; test used only to report")
    else:
        text = "train on train; select on val (the source's own split); test used only to report"
    if cfg.labels not in ("", "fer2013"):
        text += "; FER+ labels (selected and scored on the majority vote)"
    return {
        "text": text,
        "val_carved": carved,
        "val_fraction": cfg.val_fraction,
        "split_seed": cfg.split_seed,
        "sizes": {k: int(len(v)) for k, v in splits.items()},
    }


def prepare(cfg: TrainConfig, progress: bool = True) -> Prepared:
    """Load the data named by the config and split it by the protocol."""
    data = open_data(cfg.data, skip_bad=cfg.skip_bad, synthetic=cfg.synthetic, progress=progress)
    base_fingerprint = data.fingerprint
    data, label_info = apply_labels(data, cfg.labels, cfg.data)
    splits = train_val_test(data, val_fraction=cfg.val_fraction, seed=cfg.split_seed)
    if not len(splits["train"]) or not len(splits["val"]):
        raise ValueError(f"{data.source}: need labelled train and val rows, got sizes "
                         f"{ {k: len(v) for k, v in splits.items()} }")
    tensors = {
        name: (torch.from_numpy(data.images[idx]).unsqueeze(1), torch.from_numpy(data.labels[idx]).long())
        for name, idx in splits.items()
    }
    if cfg.label_mode != "majority":  # train on the vote distributions (N, K); val and test keep majority labels
        tensors["train"] = (tensors["train"][0], torch.from_numpy(data.targets[splits["train"]]).float())
    return Prepared(data, splits, tensors, label_info, base_fingerprint)


def build_meta(cfg: TrainConfig, model: nn.Module, normalizer: Normalizer, prep: Prepared) -> dict[str, Any]:
    """Everything evaluate/explain/report need to rebuild and judge the model from its checkpoint alone."""
    d = prep.data
    return {
        "ferlab_version": ferlab.__version__,
        "model": {
            "name": cfg.model, "args": cfg.model_args, "num_classes": len(d.class_names), "in_chans": 1,
            "input_size": list(d.images.shape[1:]), "params": count_params(model),
        },
        "preprocess": {"normalize": normalizer.state(), "input_size": list(d.images.shape[1:])},
        "class_names": list(d.class_names),
        "data": {
            "path": str(Path(cfg.data).resolve()) if cfg.data else None,
            "source": d.source, "layout": d.layout, "fingerprint": d.fingerprint,
            "synthetic": cfg.synthetic if cfg.data is None else None,
        },
        "split": split_protocol(d, cfg, prep.splits),
        **({"labels": prep.labels} if prep.labels else {}),
        "train": cfg.to_dict(),
    }


def check_input_side(net: nn.Module, name: str, side: int) -> None:
    """Raise a clear error naming ``name`` ("model NAME", "teacher SPEC") when ``net`` cannot take side x side
    inputs (progressive resizing needs that)."""
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            net(torch.zeros(2, 1, side, side, device=next(net.parameters()).device))
    except RuntimeError as e:
        raise ValueError(f"{name} does not accept {side}x{side} inputs, so it cannot train with "
                         f"progressive resizing (size_start); use a net with global pooling, e.g. fer-resnet-s "
                         f"({str(e).splitlines()[0]})") from None
    finally:
        net.train(was_training)


def default_run_dir(cfg: TrainConfig, root: str | Path = "runs") -> Path:
    return Path(root) / f"{cfg.model}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


HISTORY_FIELDS = ("epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "seconds", "images_per_s",
                  "size")
PLOT_EVERY_S = 30.0  # curves.png is redrawn at most this often during a run (and at its end): short epochs


def write_history(run_dir: Path, history: list[dict[str, float]], plot: bool = True) -> None:
    """RUN_DIR/history.csv (replaced whole, so a reader never sees half a file) and, with ``plot``, curves.png."""
    import io

    from ferlab.plots import plot_history

    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=HISTORY_FIELDS, restval="")
    w.writeheader()
    w.writerows(history)
    text = buf.getvalue()
    atomic_write(run_dir / "history.csv", lambda tmp: Path(tmp).write_text(text, newline=""))
    if plot:
        plot_history(history, run_dir / "curves.png")


def read_history(run_dir: str | Path) -> list[dict[str, float]]:
    """The rows of RUN_DIR/history.csv as written by :func:`write_history` ([] when there is none yet)."""
    path = Path(run_dir) / "history.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        # a column added since the run started is empty in its earlier rows
        return [{k: float(v) if v != "" else float("nan") for k, v in row.items()} for row in csv.DictReader(f)]


def check_same_options(run_dir: Path, cfg: TrainConfig) -> None:
    """Refuse to resume ``run_dir`` with training options other than those it started with (those of
    :data:`NOT_LEARNED` aside): the saved optimiser and schedule state belong to them (a one-cycle schedule, for
    one, to its epoch count). An option newer than the run counts as its default."""
    path = run_dir / "config.json"
    try:
        meta = json.loads(path.read_text())
        saved = meta["train"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: cannot read the run's training options ({e})") from None
    now = json.loads(json.dumps(cfg.to_dict()))  # as config.json holds them (tuples as lists)
    default = json.loads(json.dumps(TrainConfig().to_dict()))
    votes = (meta.get("labels") or {}).get("file") if isinstance(meta.get("labels"), dict) else None

    def same(k: str) -> bool:  # a votes path as typed, or the absolute one the run recorded for it
        a, b = saved.get(k, default.get(k)), now.get(k, default.get(k))
        return a == b or (k == "labels" and votes is not None and b == votes)

    differ = [k for k in sorted(set(saved) | set(now)) if k not in NOT_LEARNED and not same(k)]
    if differ:
        changes = "; ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in differ)
        raise CheckpointError(f"{run_dir}: started with other training options than these ({changes}); "
                              "a run resumes only as it was configured: start a new run in another directory")


def format_eta(seconds: float) -> str:
    """A remaining time for the epoch lines: ``1h05m``, ``4m09s``, ``42s``."""
    s = max(0, round(seconds))
    hours, rest = divmod(s, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def fit(
    cfg: TrainConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train ``cfg`` into ``run_dir``; with ``resume``, continue from its last completed epoch.

    ``stop_after`` ends this call after that many epochs, as an interruption would (for tests).
    Returns the run summary (also written to RUN_DIR/summary.json). Under ``torchrun`` this trains with
    DistributedDataParallel; the process group lives for this call only. torch's thread count (and on a GPU,
    cuDNN's benchmark mode) is the caller's again afterwards.
    """
    threads = torch.get_num_threads()  # the run sets its own (and the governor changes it): restored after
    benchmark = torch.backends.cudnn.benchmark
    try:
        with distributed.session() as ddp:
            if ddp.device.type == "cuda":  # the batches' shapes repeat: let cuDNN time and keep its fastest kernels
                torch.backends.cudnn.benchmark = True
            return _fit(cfg, Path(run_dir), ddp, resume=resume, progress=progress, stop_after=stop_after, log=log)
    finally:
        torch.set_num_threads(threads)
        torch.backends.cudnn.benchmark = benchmark


def _quiet(_: str) -> None:
    pass


def auto_threads(world_size: int = 1) -> int:
    """Threads for ``threads = 0``: the cores not busy at start (CPU use sampled for half a second).

    torch's OpenMP threads wait for each other at every parallel step, so when another process holds one
    of two cores a 2-thread run slows 10-20x (bench/train_speed.py shows it); one thread per free core avoids
    that. Returns 0 (leave torch's setting) under torchrun or when OMP_NUM_THREADS is set.
    """
    if world_size > 1 or os.environ.get("OMP_NUM_THREADS"):
        return 0
    return hardware.free_cores(hardware.busy_cores(), len(os.sched_getaffinity(0)))



@dataclass
class Run:
    """The pieces of one training run, built by :func:`_build` and used by the epoch loop."""

    cfg: TrainConfig
    run_dir: Path
    prep: Prepared
    normalizer: Normalizer
    x_train: torch.Tensor  # (N, 1, H, W) uint8, offline copies included
    y_train: torch.Tensor  # (N,) int64
    x_val: torch.Tensor  # this rank's share of the validation images
    y_val: torch.Tensor
    net: nn.Module
    eval_net: nn.Module  # what is validated and checkpointed: the EMA of the weights when on, else the net
    ema: AveragedModel | None
    optimizer: torch.optim.Optimizer
    schedule: Any
    early: EarlyStopping
    best: BestCheckpoint
    teacher: Any  # a Teacher, its offline SoftTargets, or None
    meta: dict[str, Any]
    history: list[dict[str, float]]
    start: int = 0  # the first epoch (0-based) this call trains
    stopped_early: bool = False
    out_of_time: bool = False  # this call stopped at its time_limit (the run can resume)
    plotted_at: float = float("-inf")  # time.perf_counter() when curves.png was last drawn
    epoch_written_at: float = float("-inf")  # ... and when history.csv was last written

    @property
    def full_side(self) -> int:
        return int(self.x_train.shape[-1])


def _start_threads(cfg: TrainConfig, ddp: distributed.Session, precision_line: str,
                   log: Callable[[str], None]) -> hardware.ThreadGovernor | None:
    """Set torch's thread count for the run and log the first line (machine, precision, threads); returns the
    thread governor when threads = 0 (auto)."""
    threads = cfg.threads or auto_threads(ddp.world_size)
    if threads:
        torch.set_num_threads(threads)
    log(f"{hardware.describe()}; {precision_line}"
        + (f"; torch threads {threads}" + ("" if cfg.threads else " (auto: the cores not busy at start, "
                                                                   "re-checked as the run goes)") if threads else ""))
    # threads = 0: follow the cores other processes leave free (see hardware.ThreadGovernor)
    return hardware.ThreadGovernor(log=log) if threads and not cfg.threads else None


def _training_data(cfg: TrainConfig, prep: Prepared, ddp: distributed.Session
                   ) -> tuple[Normalizer, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The normaliser (fitted on the training split), the training tensors with any offline copies, and this
    rank's share of the validation tensors."""
    x_train, y_train = prep.tensors["train"]
    x_val, y_val = prep.tensors["val"]
    normalizer = Normalizer.fit(cfg.normalize, x_train.numpy())
    if cfg.offline_copies:
        if y_train.ndim != 1:
            raise ValueError(f"offline_copies needs hard labels; label_mode {cfg.label_mode!r} trains on distributions")
        xi, yi = expand_offline(x_train.squeeze(1).numpy(), y_train.numpy(), cfg.offline_copies,
                                cfg.augment_config(), seed=cfg.seed)
        x_train, y_train = torch.from_numpy(xi).unsqueeze(1), torch.from_numpy(yi).long()
    if len(x_val) < ddp.world_size:
        raise ValueError(f"{prep.data.source}: {len(x_val)} validation images cannot be shared by "
                         f"{ddp.world_size} processes")
    return normalizer, x_train, y_train, x_val[ddp.rank :: ddp.world_size], y_val[ddp.rank :: ddp.world_size]


def _build_net(cfg: TrainConfig, prep: Prepared, ddp: distributed.Session, full_side: int) -> nn.Module:
    torch.manual_seed(seeds.init_seed(cfg.seed))
    net = create_model(cfg.model, num_classes=len(prep.data.class_names), **cfg.model_args)
    init_weights(net, cfg.init)
    net = net.to(ddp.device)
    if cfg.channels_last:
        net = net.to(memory_format=torch.channels_last)
    if cfg.size_start:
        check_input_side(net, f"model {cfg.model}", min(cfg.size_start, full_side))
    return net


def _warm_start(cfg: TrainConfig, prep: Prepared, net: nn.Module, run_dir: Path, resume: bool,
                log: Callable[[str], None]) -> dict[str, Any] | None:
    """Start ``net`` from ``cfg.init_from``'s weights (a fresh run; a resumed one has its own) and return what the
    run's metadata records about it (None without a warm start)."""
    if not cfg.init_from:
        return None
    if resume:  # the weights come from last.pt; the record from the run's config.json
        config = run_dir / "config.json"
        return json.loads(config.read_text()).get("init_from") if config.is_file() else None
    from ferlab.train.provenance import overlap_warnings
    from ferlab.train.warmstart import warm_start

    ws = warm_start(net, cfg.init_from, cfg.model, cfg.model_args, prep.data.class_names)
    log(ws.describe())
    for warning in overlap_warnings(f"warm start {cfg.init_from}", ws.meta, prep.fingerprints,
                                    split_protocol(prep.data, cfg, prep.splits)):
        log(f"warning: {warning}")
    return ws.record()


def _build_teacher(cfg: TrainConfig, prep: Prepared, ddp: distributed.Session, full_side: int,
                   x_train: torch.Tensor, log: Callable[[str], None]) -> tuple[Any, Any]:
    """The distillation teacher of ``cfg.teachers`` on the run's device, or with ``cfg.distill_targets`` its soft
    targets read from that file, and what the run's metadata records of them ("records", the protocol
    "warnings", and for a file its "key" and "sha256"); (None, None) without teachers."""
    if not cfg.teachers:
        return None, None
    if cfg.distill_targets:
        from ferlab.train.distill import read_distill_targets

        targets, record = read_distill_targets(
            Path(cfg.distill_targets), teachers=cfg.teachers, tta=cfg.distill_offline,
            temperature=cfg.distill_temperature, data_fingerprint=prep.data.fingerprint, images=x_train,
            num_classes=len(prep.data.class_names))
        for warning in record.get("warnings", []):  # found when the targets were computed, with the teachers
            log(f"warning: {warning}")
        return targets, record
    from ferlab.train.distill import Teacher

    teacher = Teacher(cfg.teachers, cfg.distill_temperature, precision=cfg.precision, channels_last=cfg.channels_last)
    teacher.check_compatible(prep.data.class_names, prep.data.images.shape[1:])
    warnings = teacher.protocol_warnings(prep.fingerprints, split_protocol(prep.data, cfg, prep.splits))
    for warning in warnings:
        log(f"warning: {warning}")
    if cfg.size_start:  # the teacher sees the student's resized batches
        for spec, member in zip(teacher.specs, teacher.members, strict=True):
            check_input_side(member, f"teacher {spec}", min(cfg.size_start, full_side))
    teacher = teacher.to(ddp.device)
    return ((teacher.to(memory_format=torch.channels_last) if cfg.channels_last else teacher),
            {"records": teacher.records(), "warnings": warnings})


def write_soft_targets(cfg: TrainConfig, path: str | Path, *, progress: bool = True,
                       log: Callable[[str], None] = print) -> Path:
    """Compute the offline soft targets of ``cfg``'s teachers for its training images and write them to ``path``
    (kept when it already holds them). A run of ``cfg`` with ``distill_targets = path`` then needs neither the
    teachers' files nor their pass over the images: a file of N x K probabilities travels instead of the
    teachers' weights."""
    if not (cfg.teachers and cfg.distill_offline):
        raise ValueError("soft targets to write need teachers and distill_offline (the views to average over)")
    from ferlab.train.distill import offline_soft_targets

    cfg, _ = resolve_config(replace(cfg, distill_targets=""), "cpu")
    prep = prepare(cfg, progress)
    single = distributed.Session()
    _, x_train, _, _, _ = _training_data(cfg, prep, single)
    teacher, about = _build_teacher(cfg, prep, single, int(x_train.shape[-1]), x_train, log)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    offline_soft_targets(teacher, x_train, cfg.distill_offline, path, data_fingerprint=prep.data.fingerprint,
                         batch_size=cfg.eval_batch_size, progress=progress, warnings=about["warnings"])
    return path


def _build(cfg: TrainConfig, run_dir: Path, ddp: distributed.Session, progress: bool, resume: bool,
           log: Callable[[str], None]) -> Run:
    """Data, model (warm-started from ``cfg.init_from`` unless resuming), optimiser, schedule, callbacks, teacher
    and metadata of a run."""
    prep = prepare(cfg, progress)
    normalizer, x_train, y_train, x_val, y_val = _training_data(cfg, prep, ddp)
    if ddp.device.type == "cuda":  # the uint8 images live on the GPU: batches are gathered and augmented there
        x_train, y_train, x_val = x_train.to(ddp.device), y_train.to(ddp.device), x_val.to(ddp.device)
    full_side = int(x_train.shape[-1])
    net = _build_net(cfg, prep, ddp, full_side)
    warm = _warm_start(cfg, prep, net, run_dir, resume, log if ddp.is_main else _quiet)
    optimizer = build_optimizer(net, cfg)
    # EMA of the weights (and BatchNorm statistics): when on, it is what is validated and checkpointed
    ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True) \
        if cfg.ema_decay else None
    teacher, about = _build_teacher(cfg, prep, ddp, full_side, x_train, log)
    schedule = build_schedule(optimizer, cfg, steps_per_epoch(len(x_train), cfg.batch_size, ddp.world_size))
    mode = "max" if cfg.monitor == "val_acc" else "min"
    meta = build_meta(cfg, net, normalizer, prep)
    if warm is not None:
        meta["init_from"] = warm
    if about is not None:  # what the student learnt from, beyond the specs in meta["train"]["teachers"]
        meta["teachers"] = about.get("records", [])
        if cfg.distill_targets:
            meta["distill_targets"] = {"file": cfg.distill_targets, "sha256": about["sha256"],
                                       "teacher_sha256": about["key"].get("teacher_sha256")}
    return Run(cfg, run_dir, prep, normalizer, x_train, y_train, x_val, y_val, net,
               ema.module if ema is not None else net, ema, optimizer, schedule,
               EarlyStopping(cfg.early_stopping, mode), BestCheckpoint(mode), teacher, meta, [])


def _resume(run: Run, ddp: distributed.Session, log: Callable[[str], None]) -> None:
    """Load RUN_DIR/last.pt into ``run`` (rank 0 reads it and sends it to the others)."""
    state_path = run.run_dir / LAST_STATE
    raw = None
    if ddp.is_main:  # no shared file system needed
        if not state_path.is_file():
            raise CheckpointError(f"{run.run_dir}: nothing to resume ({LAST_STATE} missing)")
        check_same_options(run.run_dir, run.cfg)
        raw = ResumeState.load(state_path).to_dict()
    state = ResumeState.from_dict(ddp.broadcast_object(raw), state_path)
    if state.data_fingerprint != run.prep.data.fingerprint:
        raise CheckpointError(f"{run.run_dir}: the data changed since this run started "
                              f"(fingerprint {state.data_fingerprint} -> {run.prep.data.fingerprint})")
    state.restore(run.net, run.optimizer, run.schedule, run.early, run.best, run.ema)
    run.history = list(state.history)
    run.start, run.stopped_early = state.epoch + 1, state.stopped_early
    log(f"resuming {run.run_dir} after epoch {run.start} of {run.cfg.epochs}")


def _begin(run: Run, log: Callable[[str], None]) -> None:
    """A new run: its folder and config.json, and what it is about to do."""
    cfg = run.cfg
    run.run_dir.mkdir(parents=True, exist_ok=True)
    (run.run_dir / "config.json").write_text(json.dumps(run.meta, indent=2))
    p = run.meta["model"]["params"]
    log(f"run {run.run_dir}: {cfg.model} ({p['trainable']:,} trainable parameters) on {run.prep.data.source}; "
        f"train {len(run.x_train):,} / val {len(run.prep.splits['val']):,} images; {run.meta['split']['text']}")
    if run.teacher is not None:
        log(f"distilling from {len(cfg.teachers)} teacher checkpoint(s) at temperature {cfg.distill_temperature}"
            f", weight {cfg.distill_weight}" + (f", offline ({cfg.distill_offline} views)" if cfg.distill_offline
                                                else "") + f": {', '.join(cfg.teachers)}"
            + (f"; their soft targets read from {cfg.distill_targets}" if cfg.distill_targets else ""))


def _fit(
    cfg: TrainConfig,
    run_dir: Path,
    ddp: distributed.Session,
    *,
    resume: bool,
    progress: bool,
    stop_after: int | None,
    log: Callable[[str], None],
) -> dict[str, Any]:
    if not ddp.is_main:
        log, progress = _quiet, False
    cfg, precision_line = resolve_config(cfg, ddp.device.type)
    governor = _start_threads(cfg, ddp, precision_line, log)
    run = _build(cfg, run_dir, ddp, progress, resume, log)
    if resume:
        _resume(run, ddp, log)
    elif ddp.is_main:
        _begin(run, log)
    if ddp.distributed or ddp.device.type != "cpu":
        log(f"training on {ddp.world_size} x {ddp.device.type}"
            + (f" with DistributedDataParallel; global batch {cfg.batch_size}, "
               f"{cfg.batch_size // ddp.world_size} per process" if ddp.distributed else ""))
    if run.teacher is not None and cfg.distill_offline and not cfg.distill_targets:  # targets replace the teacher
        from ferlab.train.distill import offline_soft_targets

        t0 = time.perf_counter()
        run.teacher = offline_soft_targets(run.teacher, run.x_train, cfg.distill_offline,
                                           run_dir / SOFT_TARGETS if ddp.is_main else None,
                                           data_fingerprint=run.prep.data.fingerprint,
                                           batch_size=cfg.eval_batch_size, progress=progress)
        log(f"offline distillation: soft targets of {len(run.x_train):,} training images ({cfg.distill_offline} "
            f"views), {time.perf_counter() - t0:.1f}s")
    t_run = time.perf_counter()
    last_train = _epochs(run, ddp, governor, progress=progress, stop_after=stop_after, log=log)
    return _finish(run, ddp, last_train, time.perf_counter() - t_run, log)


def _epochs(run: Run, ddp: distributed.Session, governor: hardware.ThreadGovernor | None, *, progress: bool,
            stop_after: int | None, log: Callable[[str], None]) -> dict[str, float] | None:
    """Train from ``run.start`` until the last epoch, early stopping or ``stop_after`` epochs; returns the last
    epoch's training metrics (None when no epoch ran)."""
    cfg, net, ema = run.cfg, run.net, run.ema
    model = ddp.wrap(net)  # DDP broadcasts rank 0's weights to all ranks here

    def on_step() -> None:
        run.schedule.step_batch()
        if ema is not None:
            ema.update_parameters(net)
        if governor is not None:
            governor.step()

    sam = SharpnessAware(cfg.sam_rho, cfg.sam_adaptive) if cfg.sam_rho else None
    tr = None
    epoch_seconds: list[float] = []  # wall time of each epoch of this call, for the remaining-time estimate
    t_start = time.perf_counter()
    for epoch in range(run.start, cfg.epochs):
        if run.stopped_early or (stop_after is not None and len(epoch_seconds) >= stop_after):
            break
        # rank 0 decides for all (its epochs also write the files): ranks that decided apart would deadlock
        if ddp.broadcast_object(out_of_time(cfg.time_limit, time.perf_counter() - t_start, epoch_seconds)
                                if cfg.time_limit else False):
            run.out_of_time = True
            log(f"time limit: {cfg.time_limit:g} s would be passed by epoch {epoch + 1}; stopping after epoch "
                f"{epoch} of {cfg.epochs} (continue with --resume {run.run_dir})")
            break
        t_epoch = time.perf_counter()
        torch.manual_seed(seeds.epoch_torch_seed(cfg.seed, epoch, ddp.rank))  # dropout and the like
        lr = run.optimizer.param_groups[0]["lr"]
        side = progressive_side(epoch, run.full_side, cfg.size_start, cfg.size_ramp_epochs)
        tr = train_one_epoch(
            model, run.optimizer, run.x_train, run.y_train, batch_size=cfg.batch_size, aug=cfg.augment_config(),
            normalizer=run.normalizer, g=seeds.epoch_generator(cfg.seed, epoch), label_smoothing=cfg.label_smoothing,
            size=side, mixup=cfg.mixup, cutmix=cfg.cutmix, teacher=run.teacher, distill_weight=cfg.distill_weight,
            sam=sam,
            precision=cfg.precision, channels_last=cfg.channels_last, on_step=on_step,
            sample_labels=cfg.label_mode == "probability", progress=progress, desc=f"epoch {epoch + 1}/{cfg.epochs}",
            rank=ddp.rank, world_size=ddp.world_size,
        )
        ddp.broadcast_buffers(net)  # rank 0's BatchNorm statistics everywhere, as in the saved model
        if ema is not None:
            ddp.broadcast_buffers(ema.module)
        tr = ddp.mean(tr)
        va = ddp.mean(evaluate(run.eval_net, run.x_val, run.y_val, run.normalizer, batch_size=cfg.eval_batch_size,
                               precision=cfg.precision, channels_last=cfg.channels_last))
        is_best = _end_epoch(run, ddp, epoch, lr, side, tr, va)
        epoch_seconds.append(time.perf_counter() - t_epoch)
        left = 0 if run.stopped_early else cfg.epochs - (epoch + 1)  # early stopping may end the run sooner
        eta = f" | eta {format_eta(left * float(np.mean(epoch_seconds[-5:])))}" if left else ""
        log(f"epoch {epoch + 1}/{cfg.epochs}  train loss {tr['loss']:.4f} acc {tr['acc']:.4f} | "
            f"val loss {va['loss']:.4f} acc {va['acc']:.4f} | lr {lr:.2e} | {tr['seconds']:.1f}s "
            f"({tr['n'] / tr['seconds']:.0f} img/s{'' if side == run.full_side else f' at {side}x{side}'}){eta}"
            f"{'  *best' if is_best else ''}")
        if run.stopped_early:
            log(f"early stopping: {cfg.monitor} has not improved for {cfg.early_stopping} epochs")
    return tr


def out_of_time(limit: float, elapsed: float, epoch_seconds: list[float]) -> bool:
    """Whether another epoch would end past ``limit`` seconds (0: no limit), judged by the slowest of the last
    three epochs; the first epoch of a call always runs."""
    return bool(limit) and bool(epoch_seconds) and elapsed + max(epoch_seconds[-3:]) > limit


def _end_epoch(run: Run, ddp: distributed.Session, epoch: int, lr: float, side: int, tr: dict[str, float],
               va: dict[str, Any]) -> bool:
    """Step the schedule and callbacks on the epoch's validation metric, record it, and (rank 0) write the best
    checkpoint, the history and the resume state. Returns whether the epoch is the best so far."""
    cfg = run.cfg
    monitored = va["acc"] if cfg.monitor == "val_acc" else va["loss"]
    run.schedule.step_epoch(monitored)
    run.history.append({
        "epoch": epoch + 1, "lr": lr, "train_loss": tr["loss"], "train_acc": tr["acc"],
        "val_loss": va["loss"], "val_acc": va["acc"], "seconds": tr["seconds"] + va["seconds"],
        "images_per_s": tr["n"] / tr["seconds"], "size": side,
    })
    is_best = run.best.update(monitored, epoch + 1)
    if is_best:
        run.meta["result"] = {"epoch": epoch + 1, "val_acc": va["acc"], "val_loss": va["loss"]}
        if ddp.is_main:
            save_checkpoint(run.run_dir / BEST, run.eval_net, run.meta)
    run.stopped_early = run.early.update(monitored, epoch + 1)
    if ddp.is_main:
        plot = time.perf_counter() - run.plotted_at >= PLOT_EVERY_S  # the last epoch's curves: see _finish
        write_history(run.run_dir, run.history, plot=plot)
        run.epoch_written_at = time.perf_counter()
        run.plotted_at = run.epoch_written_at if plot else run.plotted_at
        ResumeState.capture(epoch, run.net, run.optimizer, run.schedule, run.early, run.best, run.history,
                            run.stopped_early, run.prep.data.fingerprint, run.ema).save(run.run_dir / LAST_STATE)
    return is_best


def _finish(run: Run, ddp: distributed.Session, last_train: dict[str, float] | None, seconds: float,
            log: Callable[[str], None]) -> dict[str, Any]:
    """The run summary (written to RUN_DIR/summary.json by rank 0)."""
    cfg, history = run.cfg, run.history
    done = run.stopped_early or (len(history) > 0 and history[-1]["epoch"] >= cfg.epochs)
    summary = {
        "run_dir": str(run.run_dir), "model": cfg.model, "finished": done, "epochs_run": len(history),
        "best_epoch": run.best.best_epoch, f"best_{cfg.monitor}": run.best.best,
        "train_seconds_total": sum(h["seconds"] for h in history),
        "this_call_seconds": seconds, "stopped_early": run.stopped_early, "out_of_time": run.out_of_time,
        "protocol": run.meta["split"]["text"], "device": ddp.device.type, "world_size": ddp.world_size,
        "train_images_per_epoch": last_train["n"] if last_train is not None else None,  # summed over ranks
    }
    if ddp.distributed:
        # the largest difference of any weight between ranks: DDP keeps them identical, so this is 0.0
        summary["rank_spread"] = ddp.spread(run.net)
        if summary["rank_spread"] > 0:
            log(f"warning: the ranks' weights differ by up to {summary['rank_spread']:.3g}")
    if ddp.is_main:
        if history and run.plotted_at < run.epoch_written_at:  # the curves to the last epoch (the CSV is current)
            from ferlab.plots import plot_history

            plot_history(history, run.run_dir / "curves.png")
        text = json.dumps(summary, indent=2)
        atomic_write(run.run_dir / "summary.json", lambda tmp: Path(tmp).write_text(text))
    return summary
