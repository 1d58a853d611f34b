"""The training configuration: one dataclass, read from TOML/JSON files and command-line overrides."""

from __future__ import annotations

import argparse
import dataclasses
import json
import tomllib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ferlab import hardware
from ferlab.data.ferplus import LABEL_MODES
from ferlab.hardware import MAX_THREADS, PRECISIONS
from ferlab.transforms import AUGMENT_PRESETS, NORMALIZE_MODES, PROGRESSIVE_MULTIPLE, TTA_MODES, AugmentConfig

CHOICES: dict[str, tuple[str, ...]] = {
    "optimizer": ("sgd", "adam", "adamw"),
    "schedule": ("onecycle", "cosine", "plateau", "none"),
    "init": ("default", "xavier", "he"),
    "normalize": NORMALIZE_MODES,
    "precision": PRECISIONS,
    "monitor": ("val_acc", "val_loss"),
    "label_mode": LABEL_MODES,
}

# Options that do not change what a run learns: where the data file lives (its content is checked by its
# fingerprint), the thread count, the evaluation batch size, the wall-clock limit of one call, and where offline
# soft targets are read from (checked against the teachers, views, temperature and images they were computed for).
NOT_LEARNED: tuple[str, ...] = ("data", "threads", "eval_batch_size", "time_limit", "distill_targets")


@dataclass
class TrainConfig:
    """Everything a training run depends on; saved in every checkpoint and in RUN_DIR/config.json."""

    # model
    model: str = "fer-resnet-s"
    model_args: dict[str, Any] = field(default_factory=dict)
    init: str = "default"  # default (PyTorch's), xavier (uniform, as Keras), he (kaiming normal)
    # warm start (fine-tuning): a checkpoint of the same model (run dir, file or shipped name) whose weights the
    # run starts from; classifier rows of classes it lacks keep the fresh init ("" = train from scratch)
    init_from: str = ""
    # data: path to any supported layout; None = the embedded synthetic faces
    data: str | None = None
    skip_bad: bool = False
    val_fraction: float = 0.1  # carved from train (stratified) when the source has no validation split
    split_seed: int = 0
    synthetic: dict[str, Any] = field(default_factory=dict)  # make_synthetic() arguments
    labels: str = "fer2013"  # the data's own labels; "ferplus" (or a fer2013new.csv path): FER+ crowd labels
    label_mode: str = "majority"  # FER+ targets: majority, probability (a label drawn per batch), crossentropy (soft)
    # preprocessing
    normalize: str = "dataset"
    augment: str | dict[str, Any] = "standard"  # a preset name (see transforms.AUGMENT_PRESETS) or options
    offline_copies: int = 0  # offline expansion: k augmented copies of each training image
    # progressive resizing: the first epoch trains on size_start x size_start images (0 = off), growing to the
    # data's size at epoch size_ramp_epochs (see transforms.progressive_side); needs a net with global pooling
    size_start: int = 0
    size_ramp_epochs: int = 0
    # optimisation
    epochs: int = 30
    batch_size: int = 128
    optimizer: str = "adamw"
    lr: float = 2e-3  # the peak learning rate for onecycle
    momentum: float = 0.9  # SGD only
    weight_decay: float = 0.01
    schedule: str = "onecycle"
    warmup_epochs: float = 2.0
    plateau_patience: int = 5
    plateau_factor: float = 0.5
    label_smoothing: float = 0.0
    mixup: float = 0.0  # Beta(alpha, alpha) of mixup; 0 = off
    cutmix: float = 0.0  # Beta(alpha, alpha) of CutMix; 0 = off (both on: one of them per batch)
    ema_decay: float = 0.0  # exponential moving average of the weights per step, e.g. 0.999; 0 = off
    # sharpness-aware minimisation: each step's gradient taken at the worst weights within this radius (e.g. 0.05;
    # adaptive, ASAM: a radius relative to each weight's size, e.g. 0.5); 0 = off; costs a second pass per batch
    sam_rho: float = 0.0
    sam_adaptive: bool = False
    # knowledge distillation: teacher checkpoints (run dirs, files or shipped names; several = their ensemble)
    teachers: list[str] = field(default_factory=list)
    distill_weight: float = 0.5  # the loss is (1 - w) * cross-entropy + w * T^2 * KL(teacher || student)
    distill_temperature: float = 4.0  # T, the softmax temperature of teacher and student in the KL term
    # "" = online (the teacher sees every augmented batch); a TTA mode (none, flip, shift, affine) = offline: the
    # teacher's soft targets are computed once, on the un-augmented training images averaged over that mode's views
    distill_offline: str = ""
    # offline only: a file of those soft targets computed elsewhere (see fit.write_soft_targets); the teachers'
    # files are then not needed ("" = compute them here)
    distill_targets: str = ""
    early_stopping: int = 0  # patience in epochs; 0 = off
    monitor: str = "val_acc"
    seed: int = 0
    # speed
    # bf16 autocast, fp32, or auto: bf16 where the CPU (or GPU) computes bf16 natively, else fp32; a run saves the
    # precision it resolved to (see hardware.resolve_precision)
    precision: str = "auto"
    channels_last: bool = True
    threads: int = 0  # 0 = auto: the cores not busy at start (see fit.auto_threads)
    eval_batch_size: int = 512
    # stop this call cleanly (resumable) before an epoch that would end past this many seconds; 0 = no limit
    time_limit: float = 0.0

    def __post_init__(self) -> None:
        self._check_types()
        self._check_ranges()
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} = {getattr(self, name)!r} is not one of {', '.join(allowed)}")
        if isinstance(self.augment, str) and self.augment not in AUGMENT_PRESETS:
            raise ValueError(f"augment preset {self.augment!r} unknown; presets: {', '.join(AUGMENT_PRESETS)}")
        self.augment_config()  # validates option names
        for name in ("epochs", "batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        self._check_synthetic()
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.sam_adaptive and not self.sam_rho:
            raise ValueError("sam_adaptive needs sam_rho > 0 (e.g. 0.5)")
        if not 0 <= self.distill_weight <= 1:
            raise ValueError(f"distill_weight must be in [0, 1], got {self.distill_weight}")
        if isinstance(self.teachers, str):
            self.teachers = [self.teachers]
        if self.distill_offline and self.distill_offline not in TTA_MODES:
            raise ValueError(f"distill_offline = {self.distill_offline!r} is not one of '' (online), "
                             f"{', '.join(TTA_MODES)}")
        if self.distill_offline and not self.teachers:
            raise ValueError(f"distill_offline = {self.distill_offline!r} needs teachers")
        if self.distill_targets and not self.distill_offline:
            raise ValueError("distill_targets (soft targets computed elsewhere) needs distill_offline, the views "
                             "they were computed over")
        if self.size_start != 0 and self.size_start < PROGRESSIVE_MULTIPLE:
            raise ValueError(f"size_start must be 0 (off) or >= {PROGRESSIVE_MULTIPLE}, got {self.size_start}")
        if self.size_start and not 1 <= self.size_ramp_epochs <= self.epochs:
            raise ValueError(f"size_ramp_epochs must be in [1, epochs={self.epochs}] with size_start set, "
                             f"got {self.size_ramp_epochs}")
        if self.label_mode != "majority" and self.labels in ("", "fer2013"):
            raise ValueError(f"label_mode {self.label_mode!r} needs vote distributions: use it with labels = 'ferplus'")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")

    def _check_types(self) -> None:
        """ValueError naming the option whose value has the wrong type (``lr = "0.1"`` in a TOML file)."""
        kinds: dict[str, tuple[tuple[type, ...], str]] = {
            "int": ((int,), "a whole number"), "float": ((int, float), "a number"), "bool": ((bool,), "true or false"),
            "str": ((str,), "a string"), "str | None": ((str, type(None)), "a string"),
            "str | dict[str, Any]": ((str, dict), "a preset name or a table of options"),
            "dict[str, Any]": ((dict,), "a table of options"), "list[str]": ((list, str), "a list of names")}
        for f in fields(self):  # the annotations are strings (postponed evaluation)
            if f.name == "synthetic":
                continue  # _check_synthetic says what it takes
            value, (allowed, words) = getattr(self, f.name), kinds.get(str(f.type), ((object,), ""))
            if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
                raise ValueError(f"{f.name} must be {words}, got {value!r}")

    def _check_ranges(self) -> None:
        """ValueError for a number outside its range (NaN is outside every range)."""
        import math

        def at_least(name: str, low: float, strict: bool = False) -> None:
            v = getattr(self, name)
            if not (math.isfinite(v) and (v > low if strict else v >= low)):
                raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} {low}, got {v}")

        at_least("lr", 0, strict=True)
        at_least("distill_temperature", 0, strict=True)
        for name in ("weight_decay", "warmup_epochs", "mixup", "cutmix", "sam_rho", "time_limit", "momentum",
                     "plateau_patience", "early_stopping", "offline_copies", "size_start", "size_ramp_epochs"):
            at_least(name, 0)
        # two-sided ranges (which NaN fails too); ema_decay, distill_weight, val_fraction: checked below
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if not 0 <= self.momentum <= 1:
            raise ValueError(f"momentum must be in [0, 1], got {self.momentum}")
        if not 0 < self.plateau_factor < 1:
            raise ValueError(f"plateau_factor must be in (0, 1), got {self.plateau_factor}")
        if not 0 <= self.threads <= MAX_THREADS:
            raise ValueError(f"threads must be in [0, {MAX_THREADS}] (0: the cores not busy at start), "
                             f"got {self.threads}")

    def _check_synthetic(self) -> None:
        """ValueError unless ``synthetic`` holds arguments that make_synthetic() takes."""
        import inspect

        from ferlab.data.synthetic import make_synthetic

        if not isinstance(self.synthetic, dict):
            raise ValueError(f"synthetic must be a table of make_synthetic() arguments, e.g. "
                             f'{{"n_train": 700}}, got {self.synthetic!r}')
        params = inspect.signature(make_synthetic).parameters
        unknown = sorted(set(self.synthetic) - set(params))
        if unknown:
            raise ValueError(f"unknown synthetic option(s) {unknown}; known: {', '.join(params)}")

    def augment_config(self) -> AugmentConfig:
        if isinstance(self.augment, str):
            return AUGMENT_PRESETS[self.augment]
        return AugmentConfig.from_dict(self.augment)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown training option(s) {unknown}")
        return cls(**d)

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> TrainConfig:
        """Read a TOML or JSON config; ``overrides`` (e.g. from the command line) win."""
        path = Path(path)
        if path.is_dir():
            raise ValueError(f"config file {path} is a folder; name a .toml or .json file")
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
            d = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        except UnicodeDecodeError:
            raise ValueError(f"{path}: not a text file (a config is TOML or JSON)") from None
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: cannot parse config: {e}") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path}: a config is a table of options, got {type(d).__name__}")
        d.update(overrides)
        try:
            return cls.from_dict(d)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None


# One line of help per field: the `ferlab train` flags (--FIELD-NAME) and the config reference use it.
FIELD_HELP: dict[str, str] = {
    "model": "registered model name (see `ferlab models`)",
    "model_args": "model argument KEY=VALUE (VALUE read as JSON when it parses; repeatable)",
    "init": "weight initialisation: default (PyTorch's), xavier (uniform, as Keras), he (kaiming normal)",
    "init_from": "warm start: begin from this checkpoint's weights (run directory, .safetensors or shipped name; "
                 "the same model and model arguments); classifier rows of classes it lacks start fresh",
    "data": "data path (fer2013.csv[.gz], icml_face_data.csv, train.csv/test.csv dir, image folders); "
            "none: the embedded synthetic faces",
    "skip_bad": "skip malformed rows or unreadable images instead of stopping, and report how many",
    "val_fraction": "validation part carved (stratified) from train when the data has no validation split",
    "split_seed": "seed of that carving",
    "synthetic": "options of the embedded synthetic data as JSON, e.g. '{\"n_train\": 2000, \"seed\": 1}' (used "
                 "when there is no data path)",
    "labels": "label source: fer2013 (the data's own labels) or ferplus (FER+ crowd votes, 8 classes; a "
              "fer2013new.csv beside the data or in a sibling ferplus/ folder, or give its path)",
    "label_mode": "how FER+ votes train: majority (the top emotion), probability (a label drawn from the votes per "
                  "batch) or crossentropy (the vote distribution as a soft target)",
    "normalize": "input normalisation: none (0..255), unit ([0, 1]), image (per-image standardisation), dataset "
                 "(the training split's mean and std)",
    "augment": "online augmentation: a preset (none, flip, keras, standard) or JSON options "
               "(see ferlab.transforms.AugmentConfig)",
    "offline_copies": "offline expansion: augmented copies of each training image made before training",
    "size_start": "progressive resizing: the first epoch's image side, e.g. 32 (0: off; needs global pooling)",
    "size_ramp_epochs": "with size_start: the epoch from which images are full size (the side grows linearly)",
    "epochs": "number of epochs",
    "batch_size": "batch size (the global batch under torchrun)",
    "optimizer": "sgd (Nesterov) | adam | adamw",
    "lr": "(peak) learning rate",
    "momentum": "SGD momentum",
    "weight_decay": "weight decay",
    "schedule": "learning-rate schedule: onecycle | cosine | plateau | none",
    "warmup_epochs": "warm-up epochs of the onecycle and cosine schedules",
    "plateau_patience": "plateau schedule: epochs without improvement before the rate drops",
    "plateau_factor": "plateau schedule: factor of each drop",
    "label_smoothing": "label smoothing of the cross-entropy",
    "mixup": "mixup Beta alpha, e.g. 0.2 (0: off)",
    "cutmix": "CutMix Beta alpha, e.g. 1.0 (0: off; with mixup: one of them per batch)",
    "ema_decay": "EMA of the weights per step, e.g. 0.999; validation and checkpoints then use the averaged "
                 "weights (0: off)",
    "sam_rho": "sharpness-aware minimisation: the radius rho of the worst-case weight perturbation each step's "
               "gradient is taken at, e.g. 0.05 (0: off; a second forward and backward pass per batch)",
    "sam_adaptive": "with sam_rho: adaptive SAM (ASAM), the radius relative to each weight's size (rho e.g. 0.5)",
    "teachers": "distil from this checkpoint (run directory, .safetensors, shipped model or ensemble name); "
                "repeatable: the teachers' mean prediction is the target",
    "distill_weight": "with teachers: weight w of the distillation loss, (1 - w) on the labels",
    "distill_temperature": "with teachers: softmax temperature T of teacher and student",
    "distill_offline": "with teachers: compute the soft targets once, on the un-augmented training images averaged "
                       "over these TTA views (none | flip | shift | affine), instead of on every augmented batch: "
                       "far cheaper, blind to the augmentation ('': online)",
    "distill_targets": "with distill_offline: read the soft targets from this file (written for the same teachers, "
                       "views, temperature and training images) instead of computing them; the teachers' files "
                       "need not be present",
    "early_stopping": "patience in epochs (0: off)",
    "monitor": "val_acc | val_loss: selects checkpoints, early stopping, the plateau schedule",
    "seed": "random seed (weights, shuffling, augmentation)",
    "precision": "auto (bf16 autocast where the CPU or GPU computes bf16 natively: AVX512-BF16 or AMX; else "
                 "fp32) | bf16 | fp32",
    "channels_last": "channels_last memory layout (faster on CPUs)",
    "threads": "torch threads (0: auto, the cores not busy with other work at start, re-checked every 10 s as "
               "the run goes)",
    "eval_batch_size": "batch size of validation and prediction",
    "time_limit": "seconds this call may train: it stops before an epoch that would end later (judged by the "
                  "recent epochs), with the run resumable by --resume (0: no limit)",
}
# fields whose flag is not --FIELD-NAME
FLAG_NAMES: dict[str, str] = {"model_args": "--model-arg", "teachers": "--teacher"}


def _parse_augment(v: str) -> str | dict:
    return json.loads(v) if v.lstrip().startswith("{") else v


def _parse_key_values(items: list[str]) -> dict[str, Any]:
    """--model-arg KEY=VALUE items -> a dict (VALUE read as JSON when it parses)."""
    out: dict[str, Any] = {}
    for s in items:
        if "=" not in s:
            raise ValueError(f"--model-arg expects KEY=VALUE, got {s!r}")
        k, v = s.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


@dataclass(frozen=True)
class ConfigFlag:
    """The command-line flag of one TrainConfig field."""

    flag: str
    field: str
    kwargs: dict[str, Any]  # for argparse's add_argument
    convert: Callable[[Any], Any] = lambda v: v  # the parsed value -> the field's value

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(self.flag, dest=self.field, default=None, **self.kwargs)


def config_flags() -> list[ConfigFlag]:
    """One flag per TrainConfig field, typed from its annotation, with its help and default."""
    default = TrainConfig()
    out = []
    for f in fields(TrainConfig):
        if f.name not in FIELD_HELP:
            raise KeyError(f"TrainConfig.{f.name} has no help text in FIELD_HELP")
        flag = FLAG_NAMES.get(f.name, "--" + f.name.replace("_", "-"))
        value = getattr(default, f.name)
        shown = "" if value in ({}, [], None, "") else f" (default {value})"
        help_ = FIELD_HELP[f.name] + shown
        kind = str(f.type)
        if kind == "bool":
            out.append(ConfigFlag(flag, f.name, {"action": argparse.BooleanOptionalAction, "help": help_}))
        elif f.name == "model_args":
            out.append(ConfigFlag(flag, f.name, {"action": "append", "metavar": "KEY=VALUE", "help": help_},
                                  _parse_key_values))
        elif kind.startswith("list"):
            out.append(ConfigFlag(flag, f.name, {"action": "append", "metavar": "SPEC", "help": help_}, list))
        elif kind.startswith("dict"):
            out.append(ConfigFlag(flag, f.name, {"type": json.loads, "metavar": "JSON", "help": help_}))
        elif f.name == "augment":
            out.append(ConfigFlag(flag, f.name, {"type": _parse_augment, "help": help_}))
        else:
            typ = {"int": int, "float": float}.get(kind, str)
            kw: dict[str, Any] = {"type": typ, "help": help_}
            if f.name in CHOICES:
                kw["choices"] = CHOICES[f.name]
            out.append(ConfigFlag(flag, f.name, kw))
    return out


def resolve_config(cfg: TrainConfig, device: str = "cpu") -> tuple[TrainConfig, str]:
    """(``cfg`` with ``precision = "auto"`` resolved for ``device``, a line saying which precision and why).

    The resolved precision is what the run saves and resumes with: it is part of what the run learns.
    """
    precision, why = hardware.resolve_precision(cfg.precision, device)
    line = f"precision {precision} ({why})"
    warning = hardware.slow_bf16_warning(precision, device)
    if warning:
        line += f"; warning: {warning}"
    return (dataclasses.replace(cfg, precision=precision) if precision != cfg.precision else cfg), line
