"""The experiment plan of ``ferlab study``, per budget, as data.

A budget is a list of :class:`Experiment` (a :class:`~ferlab.train.config.TrainConfig` plus the question it
answers) and the settings of the analyses that need no training (explanations, filters). The plan names no data
path: :func:`plan_for` puts the user's ``--data`` (or the budget's synthetic set) into every config.

Roles: ``q1`` the CNNs, ``q2`` the parameter-matched MLP, ``q3`` normalisation x augmentation, ``kfold`` stratified
k-fold cross-validation (its runs train on Training minus one fold). Ensembles reuse the q1-q3 runs.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ferlab.train.config import TrainConfig
from ferlab.transforms import NORMALIZE_MODES

ROLES: dict[str, str] = {
    "q1": "Q1: the CNNs",
    "q2": "Q2: a parameter-matched MLP against a CNN",
    "q3": "Q3: normalisation x augmentation",
    "kfold": "stratified k-fold cross-validation",
}

# Q3's augmentation axis: off / on.
AUGMENT_AXIS: dict[str, str] = {"off": "none", "on": "standard"}

# What the time estimates come from, measured on one machine by `bench/train_speed.py --study-calibration` (the
# file names the CPU and the command): one-thread training images/s of the study's models (keys: model, or
# "model(arg=value,...)" for non-default arguments; dropout makes r000-cnn1 slower than its FLOPs say), the forward
# MFLOP/s of one core for models not measured (capped at max_images_per_s), and the 2-thread speed-up.
CALIBRATION = Path(__file__).with_name("throughput.json")


@functools.cache
def calibration() -> dict[str, Any]:
    """The study's throughput calibration (:data:`CALIBRATION`)."""
    return json.loads(CALIBRATION.read_text())


def two_core_speedup() -> float:
    """One run on 2 threads against 1, as calibrated."""
    return float(calibration()["two_core_speedup"])


@dataclass(frozen=True)
class Experiment:
    """One training run of the study: its config and what it is for."""

    name: str  # unique within a budget, e.g. "q3/none-on/s1"
    role: str  # a key of ROLES
    cfg: TrainConfig
    tags: dict[str, Any] = field(default_factory=dict)  # e.g. normalize, augment, seed, fold, k

    @property
    def label(self) -> str:
        """A short human label: the model and the tags."""
        extra = ", ".join(f"{k} {v}" for k, v in self.tags.items() if k not in ("k",))
        return f"{self.cfg.model}" + (f" ({extra})" if extra else "")


@dataclass(frozen=True)
class Budget:
    """A whole study: its experiments and the settings of the analyses run on the trained models."""

    name: str
    description: str
    experiments: tuple[Experiment, ...]
    needs_data: bool = False  # True: --data is required (the plan is sized for FER2013)
    synthetic: dict[str, Any] = field(default_factory=dict)  # used when --data is absent
    kfold: int = 0  # number of folds of the kfold runs
    explain_images: int = 64  # test images scored for faithfulness (deletion/insertion)
    explain_steps: int = 16  # deletion/insertion curve steps
    filter_count: int = 16  # filters visualised (Q6)
    filter_steps: int = 64  # gradient-ascent steps per filter
    notes: tuple[str, ...] = ()


def _q3(base: TrainConfig, seeds: tuple[int, ...], **over: Any) -> list[Experiment]:
    """The normalisation x augmentation grid on ``base`` (with ``over`` applied), one run per seed."""
    return [
        Experiment(f"q3/{norm}-{aug}/s{seed}", "q3",
                   dataclasses.replace(base, normalize=norm, augment=preset, seed=seed, **over),
                   {"normalize": norm, "augment": aug, "seed": seed})
        for norm in NORMALIZE_MODES for aug, preset in AUGMENT_AXIS.items() for seed in seeds
    ]


def _kfold(base: TrainConfig, k: int, **over: Any) -> list[Experiment]:
    return [Experiment(f"kfold/{i + 1}-of-{k}", "kfold", dataclasses.replace(base, **over), {"fold": i, "k": k})
            for i in range(k)]


# ----------------------------------------------------------------------------- quick: the embedded synthetic faces
# Sized so that the whole quick study takes ~1-2 minutes on one core: 14 runs of a few hundred images each.
QUICK_SYNTHETIC = {"n_train": 350, "n_val": 140, "n_test": 210, "difficulty": 0.3, "seed": 0}
# Dropout off in the quick CNNs: on a CPU it costs as much as their convolutions.
_QUICK = TrainConfig(model="r000-cnn1", model_args={"dropout": 0.0}, epochs=3, batch_size=32, lr=3e-3,
                     warmup_epochs=0.5, normalize="dataset", augment="standard", synthetic=QUICK_SYNTHETIC)
_QUICK_K = 3

# ----------------------------------------------------------------------------- full: FER2013
# The Q1 recipes are configs/r002-vgg.toml and configs/fer-resnet-s.toml (tests check they agree).
R002_VGG = TrainConfig(model="r002-vgg", epochs=14, batch_size=128, optimizer="adamw", lr=2e-3, weight_decay=0.01,
                       schedule="onecycle", warmup_epochs=2, label_smoothing=0.0, normalize="dataset",
                       augment={"hflip": True, "crop_pad": 4, "rotation": 10, "zoom": 0.1}, monitor="val_acc",
                       seed=0, precision="auto")
FER_RESNET_S = TrainConfig(model="fer-resnet-s", epochs=30, batch_size=128, optimizer="adamw", lr=2e-3,
                           weight_decay=0.01, schedule="onecycle", warmup_epochs=2, label_smoothing=0.1,
                           normalize="dataset", augment="standard", monitor="val_acc", seed=0, precision="auto")
# Q3 and k-fold: report 000's plain 3-conv CNN (no BatchNorm, so input scaling matters), shortened to 6 epochs and
# without its dropout (2.5x faster on a CPU; over 6 epochs it barely overfits, and the PublicTest checkpoint
# selection guards the rest).
_ABLATION = TrainConfig(model="r000-cnn1", model_args={"dropout": 0.0}, epochs=6, batch_size=128, warmup_epochs=1)
_FULL_K = 5
# ----------------------------------------------------------------------------- long: the ablation at full length
# Q3 and k-fold with report 000's CNN as the report trained it (its dropout on), long enough for every cell to
# converge: 37x the CPU hours of the full budget's ablation, sized for a GPU (bench/gpu_campaign.py trains them there,
# configs/gpu/study-long-1.toml and -2.toml; `--adopt` brings them into the study). Q1 and Q2 are the full
# budget's runs.
LONG_EPOCHS = 100  # 50 still gained 0.6 points over its last 10 epochs with augmentation on (docs/results/study.md)
_LONG_ABLATION = TrainConfig(model="r000-cnn1", epochs=LONG_EPOCHS, batch_size=128, warmup_epochs=2)
# Q1 and Q2 of both FER2013 budgets
_FER2013_Q1_Q2 = (
    Experiment("q1/r002-vgg", "q1", R002_VGG),
    Experiment("q1/fer-resnet-s", "q1", FER_RESNET_S),
    Experiment("q2/mlp-matched", "q2", dataclasses.replace(
        R002_VGG, model="mlp-matched", model_args={"target": "r002-vgg"}), {"matched_to": "r002-vgg"}),
)

BUDGETS: dict[str, Budget] = {
    "quick": Budget(
        name="quick",
        description="the whole study on the embedded synthetic faces in a few minutes: proves the pipeline, "
                    "says nothing about real faces",
        experiments=(
            Experiment("q1/r000-cnn1", "q1", _QUICK),
            Experiment("q1/r000-cnn3", "q1", dataclasses.replace(_QUICK, model="r000-cnn3")),
            Experiment("q2/mlp-matched", "q2", dataclasses.replace(
                _QUICK, model="mlp-matched", model_args={"target": "r000-cnn1"}), {"matched_to": "r000-cnn1"}),
            *_q3(_QUICK, (0,), epochs=2),
            *_kfold(_QUICK, _QUICK_K, epochs=2),
        ),
        synthetic=QUICK_SYNTHETIC,
        kfold=_QUICK_K,
        explain_images=16,
        explain_steps=8,
        filter_count=8,
        filter_steps=24,
        notes=("tiny data, 2-3 epochs and a single seed: differences between runs are mostly noise",
               "the CNNs run without their dropout here, for speed"),
    ),
    "full": Budget(
        name="full",
        description="FER2013: the reports' questions answered with ferlab's own numbers",
        experiments=(
            *_FER2013_Q1_Q2,
            *_q3(_ABLATION, (0, 1)),
            *_kfold(_ABLATION, _FULL_K),
        ),
        needs_data=True,
        kfold=_FULL_K,
        notes=("Q3 and k-fold use r000-cnn1 without its dropout, shortened to 6 epochs (the Q1 nets train 14 and "
               "30), to keep the budget affordable on a CPU; their absolute accuracies are therefore below the Q1 "
               "ones, and augmentation, which pays off over long schedules, is judged on a short one; the long "
               "budget runs them to convergence",),
    ),
    "long": Budget(
        name="long",
        description="FER2013: the full budget with the normalisation x augmentation ablation and the k-fold runs "
                    f"trained to convergence ({LONG_EPOCHS} epochs of report 000's CNN with its dropout)",
        experiments=(
            *_FER2013_Q1_Q2,
            *_q3(_LONG_ABLATION, (0, 1)),
            *_kfold(_LONG_ABLATION, _FULL_K),
        ),
        needs_data=True,
        kfold=_FULL_K,
        notes=(f"Q3 and k-fold train report 000's r000-cnn1 as the report did, dropout included, for {LONG_EPOCHS} "
               "epochs: about 37 times the full budget's ablation hours, meant for a GPU (docs/gpu.md); the Q3 "
               "curves show whether each cell converged",),
    ),
}


def get_budget(name: str) -> Budget:
    """The budget called ``name``."""
    try:
        return BUDGETS[name]
    except KeyError:
        raise ValueError(f"unknown budget {name!r}; choose one of {', '.join(BUDGETS)}") from None


def plan_for(budget: str | Budget, data: str | None = None, threads: int = 0) -> list[Experiment]:
    """The budget's experiments with ``data`` (None: the budget's synthetic faces) and ``threads`` filled in.

    Raises ValueError when the budget needs real data and ``data`` is None.
    """
    b = get_budget(budget) if isinstance(budget, str) else budget
    if b.needs_data and data is None:
        raise ValueError(f"--budget {b.name} trains on FER2013: pass --data PATH (e.g. fer2013.csv.gz); "
                         "--budget quick runs on the embedded synthetic faces")
    return [dataclasses.replace(e, cfg=dataclasses.replace(e.cfg, data=data, threads=threads,
                                                           synthetic=e.cfg.synthetic if data is None else {}))
            for e in b.experiments]


def model_key(model: str, model_args: dict[str, Any] | None = None) -> str:
    """The calibration's key of a model: its name, or "name(arg=value,...)" with non-default arguments."""
    return model + (f"({','.join(f'{k}={v}' for k, v in sorted(model_args.items()))})" if model_args else "")


def images_per_second(model: str, model_args: dict[str, Any] | None = None, cores: int = 1) -> float:
    """Estimated training throughput (images/s) of ``model`` on ``cores`` cores of this project's CPU."""
    key = model_key(model, model_args)
    cal = calibration()
    if key in cal["images_per_s"]:
        speed = float(cal["images_per_s"][key])
    else:
        from ferlab.models import create_model
        from ferlab.models.summary import flops_per_image

        mflops = flops_per_image(create_model(model, **(model_args or {}))) / 1e6
        speed = min(float(cal["max_images_per_s"]), float(cal["core_mflops_per_s"]) / max(mflops, 1e-3))
    return speed * (two_core_speedup() if cores >= 2 else 1.0)


def estimate_seconds(experiments: list[Experiment], sizes: dict[str, int], kfold: int = 0,
                     cores: int = 1) -> dict[str, float]:
    """Estimated training seconds per experiment: epochs x (train images + val images / 3) / throughput.

    ``sizes`` gives the train and val split sizes; kfold runs train on (k-1)/k of train. Evaluation of val each
    epoch costs about a third of training per image (forward only).
    """
    speeds: dict[tuple[str, str], float] = {}
    out: dict[str, float] = {}
    for e in experiments:
        key = (e.cfg.model, repr(sorted(e.cfg.model_args.items())))
        if key not in speeds:
            speeds[key] = images_per_second(e.cfg.model, e.cfg.model_args, cores)
        n_train = sizes["train"] * ((kfold - 1) / kfold if e.role == "kfold" and kfold else 1.0)
        out[e.name] = e.cfg.epochs * (n_train + sizes["val"] / 3) / speeds[key]
    return out


# FER2013's split sizes (Training, PublicTest) for estimates without loading the file.
FER2013_SIZES = {"train": 28_709, "val": 3_589, "test": 3_589}
