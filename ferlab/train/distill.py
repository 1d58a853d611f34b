"""Knowledge distillation: a frozen teacher (one checkpoint or an ensemble) and the soft-target loss.

The student learns from ``(1 - w) * cross-entropy(labels) + w * T^2 * KL(teacher_T || student_T)``, where
``_T`` is a softmax at temperature ``T`` (Hinton et al. 2015) and the teacher's probabilities are the mean of
its members'. The teacher sees the very batch the student sees (augmented and mixed), each member through its
own normalisation, so it need not share the student's preprocessing. Offline distillation
(:class:`SoftTargets`) predicts the un-augmented training images once instead, for the cost of plain training.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from ferlab.checkpoint import CheckpointError, atomic_write, resolve
from ferlab.data.cache import sha256_file
from ferlab.inference.loader import load_members
from ferlab.inference.predict import autocast, batches, layout, member_weights, model_device, to_device, to_unit
from ferlab.train.provenance import overlap_warnings
from ferlab.transforms import tta_views


class Teacher(nn.Module):
    """Frozen checkpoints whose mean softmax at temperature ``temperature`` are the soft targets."""

    def __init__(self, specs: Sequence[str], temperature: float, *, precision: str = "bf16",
                 channels_last: bool = True) -> None:
        super().__init__()
        if not specs:
            raise ValueError("a teacher needs at least one checkpoint")
        if temperature <= 0:
            raise ValueError(f"distillation temperature must be > 0, got {temperature}")
        ensemble = load_members(list(specs))  # a shipped ensemble gives its members, with their weights
        loaded = ensemble.members
        members = [m.module.requires_grad_(False) for m in loaded]
        normalizers = [m.normalizer for m in loaded]
        metas = [m.meta for m in loaded]
        self.requested = list(specs)  # as the config names them (a shipped ensemble: its name)
        self.loaded = loaded
        self.members = nn.ModuleList(members).eval()  # never put in training mode: the student's train() skips it
        self.normalizers = normalizers
        self.metas = metas
        self.specs = [m.source for m in loaded]
        self.weights = [float(w) for w in member_weights(ensemble.weights, len(loaded))]  # (M,), summing to 1
        self.temperature = temperature
        self.precision = precision
        self.channels_last = channels_last

    def check_compatible(self, class_names: Sequence[str], input_size: Sequence[int]) -> None:
        """Raise :class:`CheckpointError` unless every member predicts these classes from this input size."""
        for m in self.loaded:
            if m.class_names != list(class_names):
                raise CheckpointError(f"teacher {m.source}: its classes {m.class_names} are not the "
                                      f"student's {list(class_names)}")
            if list(m.input_size) != list(input_size):
                raise CheckpointError(f"teacher {m.source}: input size {list(m.input_size)} is not the "
                                      f"student's {list(input_size)}")

    def protocol_warnings(self, fingerprints: Collection[str], split: dict[str, Any]) -> list[str]:
        """Why a member might have seen rows the student validates or tests on (empty when none); see
        :func:`ferlab.train.provenance.overlap_warnings`."""
        return [w for spec, meta in zip(self.specs, self.metas, strict=True)
                for w in overlap_warnings(f"teacher {spec}", meta, fingerprints, split)]

    def records(self) -> list[dict[str, Any]]:
        """What a student's metadata records of each member: spec, net, training data and result."""
        return [{"spec": spec, "model": m["model"]["name"], "data_fingerprint": m.get("data", {}).get("fingerprint"),
                 "result": m.get("result")} for spec, m in zip(self.specs, self.metas, strict=True)]

    @torch.no_grad()
    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        """Images (B, 1, H, W) in [0, 1] -> soft targets (B, K): the members' mean softmax at the temperature."""
        probs = None
        x01 = to_device(x01, model_device(self.members[0]))  # one copy for every member (all on one device)
        for model, norm, w in zip(self.members, self.normalizers, self.weights, strict=True):
            x = layout(norm(x01), self.channels_last)  # (B, 1, H, W)
            with autocast(self.precision, x.device):
                p = w * (model(x).float() / self.temperature).softmax(1)  # (B, K)
            probs = p if probs is None else probs + p
        return probs

    def loss(self, student_logits: torch.Tensor, *, x01: torch.Tensor, **_: Any) -> torch.Tensor:
        """The distillation loss of the student's logits (B, K) on the images (B, 1, H, W) in [0, 1] it saw."""
        targets = self(x01).to(student_logits.device)  # (B, K)
        return distillation_loss(student_logits, targets, self.temperature)

    @torch.no_grad()
    def soft_targets(self, images: torch.Tensor, tta: str = "none", *, batch_size: int = 512,
                     progress: bool = False) -> torch.Tensor:
        """Soft targets (N, K) float32 on the CPU for images (N, 1, H, W) uint8: the mean over the members and
        over the test-time views of ``tta`` (see :data:`ferlab.transforms.TTA_MODES`) of the softmax at the
        temperature."""
        out = []
        n_batches = (len(images) + batch_size - 1) // batch_size
        for idx in tqdm(batches(len(images), batch_size), total=n_batches, desc="teacher soft targets",
                        disable=not progress, leave=False, mininterval=1.0, dynamic_ncols=True):
            views = tta_views(to_unit(images[idx]), tta)  # V x (B, 1, H, W) in [0, 1]
            out.append((sum(self(v) for v in views) / len(views)).float().cpu())  # (B, K)
        if not out:
            return torch.empty(0, len(self.metas[0]["class_names"]))
        return torch.cat(out)


class SoftTargets:
    """Offline distillation: the teacher's soft targets for every training image, computed once.

    The online :class:`Teacher` predicts each augmented batch, which costs a teacher forward pass per student
    step (with an ensemble teacher, more than the student's own step). These targets are predicted once on the
    un-augmented images (averaged over test-time views), so an epoch costs what plain training costs; the price
    is that they ignore the batch's augmentation. Mixed batches get the same mix of their images' targets.
    """

    def __init__(self, probs: torch.Tensor, temperature: float) -> None:
        if probs.ndim != 2:
            raise ValueError(f"soft targets must be (N, K), got shape {tuple(probs.shape)}")
        self.probs = probs.float()  # (N, K), rows sum to 1
        self.temperature = temperature

    def loss(self, student_logits: torch.Tensor, *, idx: torch.Tensor, perm: torch.Tensor | None = None,
             lam: float = 1.0, **_: Any) -> torch.Tensor:
        """The distillation loss of the student's logits (B, K) on the images ``idx`` (B,) of the training set,
        mixed (when ``perm`` is given) with their partners ``idx[perm]`` at weight ``lam``."""
        targets = self.probs[idx]  # (B, K)
        if perm is not None:
            targets = lam * targets + (1.0 - lam) * targets[perm]
        return distillation_loss(student_logits, to_device(targets, student_logits.device), self.temperature)

    def save(self, path: Path, key: dict[str, Any], about: dict[str, Any] | None = None) -> None:
        """Write the targets to ``path`` (safetensors) with ``key``, what they were computed from, and ``about``
        (the teachers as configured, their records and protocol warnings: what a run that reads the file in
        place of the teachers records; see :func:`read_distill_targets`)."""
        probs = self.probs.contiguous()
        metadata = {"key": json.dumps(key, sort_keys=True), "about": json.dumps(about or {}, sort_keys=True)}
        atomic_write(Path(path), lambda tmp: save_file({"probs": probs}, tmp, metadata=metadata))

    @classmethod
    def load(cls, path: Path, key: dict[str, Any], temperature: float) -> SoftTargets | None:
        """The targets saved at ``path`` when they were computed from ``key``; None when absent or stale."""
        if not path.is_file():
            return None
        probs, saved, _ = _read_targets(path)
        return cls(probs, temperature) if saved == json.loads(json.dumps(key, sort_keys=True)) else None


def _read_targets(path: Path) -> tuple[torch.Tensor, dict[str, Any], dict[str, Any]]:
    """(probs (N, K), key, about) of a soft-targets file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            probs = f.get_tensor("probs")
        key, about = json.loads(metadata.get("key", "null")), json.loads(metadata.get("about", "{}"))
    except (SafetensorError, OSError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{path}: cannot read the soft targets ({e}); delete the file") from None
    if not isinstance(key, dict) or not isinstance(about, dict):
        raise CheckpointError(f"{path}: the soft targets do not say what they were computed from; delete the file")
    return probs, key, about


def targets_key(teacher: Teacher, tta: str, data_fingerprint: str, images: torch.Tensor) -> dict[str, Any]:
    """What soft targets are computed from: the teachers (their files' bytes: a teacher retrained in place is
    another teacher), the views, the temperature and the training images (N, 1, H, W) uint8."""
    return {"teachers": teacher.specs, "teacher_sha256": [sha256_file(resolve(spec)) for spec in teacher.specs],
            "tta": tta, "temperature": teacher.temperature, **images_key(data_fingerprint, images)}


def images_key(data_fingerprint: str, images: torch.Tensor) -> dict[str, Any]:
    """The part of :func:`targets_key` that names the training images (N, 1, H, W) uint8."""
    return {"data_fingerprint": data_fingerprint, "n": len(images), "images_sum": int(images.sum(dtype=torch.int64))}


def offline_soft_targets(teacher: Teacher, images: torch.Tensor, tta: str, cache: Path | None, *,
                         data_fingerprint: str, batch_size: int = 512, progress: bool = False,
                         warnings: Sequence[str] = ()) -> SoftTargets:
    """The teacher's :class:`SoftTargets` for the training images (N, 1, H, W) uint8, read from ``cache`` when
    it holds them for the same :func:`targets_key`, else computed (and written there, atomically, with the
    teachers' records and the protocol ``warnings`` of the run)."""
    key = targets_key(teacher, tta, data_fingerprint, images)
    if cache is not None and (found := SoftTargets.load(cache, key, teacher.temperature)) is not None:
        return found
    targets = SoftTargets(teacher.soft_targets(images, tta, batch_size=batch_size, progress=progress),
                          teacher.temperature)
    if cache is not None:
        targets.save(cache, key, {"teachers": teacher.requested, "records": teacher.records(),
                                  "warnings": list(warnings)})
    return targets


def read_distill_targets(path: Path, *, teachers: Sequence[str], tta: str, temperature: float,
                         data_fingerprint: str, images: torch.Tensor, num_classes: int
                         ) -> tuple[SoftTargets, dict[str, Any]]:
    """Soft targets computed elsewhere and brought as a file (a run's ``distill_targets``): the teachers' files
    need not be here. Checked against all that can be checked without them: the teachers as configured, the
    views, the temperature, the classes and the training images (N, 1, H, W) uint8. Returns the targets and the
    file's record (its key and what it says of the teachers), for the run's metadata."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such soft-targets file (distill_targets)")
    probs, key, about = _read_targets(path)
    expected = {"teachers": list(teachers), "tta": tta, "temperature": temperature,
                **images_key(data_fingerprint, images)}
    found = {"teachers": about.get("teachers"), **{k: key.get(k) for k in expected if k != "teachers"}}
    wrong = [f"{k} {found[k]!r} (this run: {v!r})" for k, v in expected.items() if found[k] != v]
    if wrong:
        raise CheckpointError(f"{path}: these soft targets were computed for other " + "; ".join(wrong))
    if probs.ndim != 2 or probs.shape != (len(images), num_classes):
        raise CheckpointError(f"{path}: soft targets of shape {tuple(probs.shape)}, this run needs "
                              f"({len(images)}, {num_classes})")
    return SoftTargets(probs, temperature), {"key": key, **about, "sha256": sha256_file(path)}


def stale_teachers(path: Path) -> list[str]:
    """The teachers of the soft-targets file ``path`` whose checkpoint here is missing or differs from the one the
    targets were computed from (empty when all are as they were)."""
    _, key, _ = _read_targets(Path(path))
    stale = []
    for spec, digest in zip(key.get("teachers", []), key.get("teacher_sha256", []), strict=False):
        try:
            same = sha256_file(resolve(spec)) == digest
        except (CheckpointError, OSError):
            same = False
        if not same:
            stale.append(spec)
    return stale


def distillation_loss(student_logits: torch.Tensor, soft_targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(soft_targets || softmax(student_logits / T))``, the batch mean; logits (B, K), targets (B, K)."""
    log_p = F.log_softmax(student_logits.float() / temperature, dim=1)
    return F.kl_div(log_p, soft_targets, reduction="batchmean") * temperature**2
