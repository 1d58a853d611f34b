"""Knowledge distillation: the loss has its analytic value and gradient, the teacher averages its members,
and inside training the weight w moves the student between the labels (w = 0) and the teacher (w = 1)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_SYNTHETIC, tiny_config

from ferlab.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ferlab.models import create_model
from ferlab.train.config import TrainConfig
from ferlab.train.distill import SoftTargets, Teacher, distillation_loss, offline_soft_targets, stale_teachers
from ferlab.train.engine import train_one_epoch
from ferlab.train.fit import SOFT_TARGETS, fit, read_history, write_soft_targets
from ferlab.transforms import AUGMENT_PRESETS, Normalizer

CLASSES = ["Angry", "Disgust", "Fear", "Happy", "Sad", "Surprise", "Neutral"]


def save_teacher(path, seed: int, normalize: dict | None = None, classes=CLASSES, size=(48, 48), name="fer-mobile"):
    torch.manual_seed(seed)
    model = create_model(name).eval()
    meta = {"model": {"name": name, "args": {}, "num_classes": 7, "in_chans": 1},
            "preprocess": {"normalize": normalize or {"mode": "unit", "mean": 0.0, "std": 1.0},
                           "input_size": list(size)},
            "class_names": list(classes), "data": {"fingerprint": "fp"},
            "split": {"val_carved": False, "val_fraction": 0.1, "split_seed": 0}}
    save_checkpoint(path, model, meta)
    return model


def test_loss_is_zero_at_the_teacher_and_has_the_analytic_gradient():
    torch.manual_seed(0)
    t, s, temp = torch.randn(5, 7), torch.randn(5, 7, requires_grad=True), 3.0
    p = (t / temp).softmax(1)
    assert distillation_loss(t, p, temp).abs().item() < 1e-6
    loss = distillation_loss(s, p, temp)
    assert loss.item() > 0
    loss.backward()
    # d/ds [T^2 KL(p || softmax(s/T))] averaged over the batch = T (softmax(s/T) - p) / B
    expected = temp * ((s.detach() / temp).softmax(1) - p) / len(s)
    torch.testing.assert_close(s.grad, expected)


def test_teacher_is_the_mean_of_its_members_softmax(tmp_path):
    a = save_teacher(tmp_path / "a.safetensors", 0)
    b = save_teacher(tmp_path / "b.safetensors", 1, normalize={"mode": "dataset", "mean": 0.5, "std": 0.25})
    teacher = Teacher([str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")], 2.0,
                      precision="fp32", channels_last=False)
    x01 = torch.rand(4, 1, 48, 48)
    with torch.no_grad():
        expected = ((a(x01) / 2).softmax(1) + (b((x01 - 0.5) / 0.25) / 2).softmax(1)) / 2  # each its own normaliser
    torch.testing.assert_close(teacher(x01), expected)
    assert not any(p.requires_grad for p in teacher.parameters())


def test_incompatible_teachers_are_refused(tmp_path):
    save_teacher(tmp_path / "c.safetensors", 0, classes=list("abcdefg"))
    with pytest.raises(CheckpointError, match="classes"):
        Teacher([str(tmp_path / "c.safetensors")], 4.0).check_compatible(CLASSES, (48, 48))
    save_teacher(tmp_path / "s.safetensors", 0, size=(64, 64))
    with pytest.raises(CheckpointError, match="input size"):
        Teacher([str(tmp_path / "s.safetensors")], 4.0).check_compatible(CLASSES, (48, 48))
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        Teacher([str(tmp_path / "missing.safetensors")], 4.0)


@pytest.mark.parametrize("bad", [{"distill_weight": 1.5}, {"distill_weight": -0.1}, {"distill_temperature": 0.0}])
def test_bad_distillation_values_are_errors(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        TrainConfig(**bad)


def one_epoch(labels: torch.Tensor, images: torch.Tensor, teacher: Teacher | None, w: float) -> dict:
    torch.manual_seed(0)
    student = create_model("fer-mobile")
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    train_one_epoch(student, opt, images, labels, batch_size=16, aug=AUGMENT_PRESETS["standard"],
                    normalizer=Normalizer("unit"), g=torch.Generator().manual_seed(0), label_smoothing=0.1,
                    teacher=teacher, distill_weight=w, precision="fp32", channels_last=False, progress=False)
    return student.state_dict()


def test_the_weight_moves_the_student_from_the_labels_to_the_teacher(tmp_path):
    save_teacher(tmp_path / "t.safetensors", 3)
    teacher = Teacher([str(tmp_path / "t.safetensors")], 4.0, precision="fp32", channels_last=False)
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (48, 1, 48, 48), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 7, (48,), generator=g)
    other = (labels + 1) % 7

    def same(a: dict, b: dict) -> bool:
        return all(torch.equal(a[k], b[k]) for k in a)

    # w = 1: the labels no longer matter; w = 0: the teacher no longer matters
    assert same(one_epoch(labels, images, teacher, 1.0), one_epoch(other, images, teacher, 1.0))
    assert same(one_epoch(labels, images, teacher, 0.0), one_epoch(labels, images, None, 0.5))
    assert not same(one_epoch(labels, images, teacher, 0.5), one_epoch(labels, images, None, 0.5))
    assert not same(one_epoch(labels, images, teacher, 0.5), one_epoch(other, images, teacher, 0.5))


def test_distilled_run_records_its_teacher_and_resumes(tmp_path, trained_tiny_run):
    cfg = tiny_config(model="fer-mobile", epochs=2, teachers=[str(trained_tiny_run)], distill_weight=0.7)
    summary = fit(cfg, tmp_path / "student", progress=False, stop_after=1, log=lambda _: None)
    assert not summary["finished"]
    meta = json.loads((tmp_path / "student/config.json").read_text())
    assert meta["train"]["teachers"] == [str(trained_tiny_run)] and meta["train"]["distill_weight"] == 0.7
    assert meta["teachers"][0]["model"] == "fer-resnet-s"
    assert fit(cfg, tmp_path / "student", resume=True, progress=False, log=lambda _: None)["finished"]


def test_progressive_resizing_refuses_a_teacher_that_cannot_take_the_small_images(tmp_path):
    save_teacher(tmp_path / "vgg.safetensors", 0, name="r002-vgg")  # a fixed dense head: 48 x 48 only
    cfg = tiny_config(epochs=2, size_start=32, size_ramp_epochs=1, teachers=[str(tmp_path / "vgg.safetensors")])
    with pytest.raises(ValueError, match=r"teacher .*vgg.safetensors does not accept 32x32 inputs"):
        fit(cfg, tmp_path / "student", progress=False, log=lambda _: None)


def test_offline_soft_targets_are_the_teachers_mean_over_the_views(tmp_path):
    save_teacher(tmp_path / "t.safetensors", 3)
    teacher = Teacher([str(tmp_path / "t.safetensors")], 2.0, precision="fp32", channels_last=False)
    images = torch.randint(0, 256, (10, 1, 48, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    x01 = images.float() / 255
    with torch.no_grad():
        expected = (teacher(x01) + teacher(x01.flip(-1))) / 2  # the image and its mirror
    probs = teacher.soft_targets(images, "flip", batch_size=4)  # batches of 4, 4, 2
    torch.testing.assert_close(probs, expected)
    torch.testing.assert_close(probs.sum(1), torch.ones(10))


def test_offline_targets_of_a_mixed_batch_are_mixed_with_its_weights():
    torch.manual_seed(0)
    probs = torch.randn(6, 7).softmax(1)
    targets = SoftTargets(probs, 2.0)
    idx, perm, lam = torch.tensor([4, 1, 5]), torch.tensor([2, 0, 1]), 0.3
    mixed = lam * probs[idx] + 0.7 * probs[idx[perm]]  # (3, 7)
    student = 2.0 * mixed.log()  # logits whose softmax at T = 2 is the mixed target: zero loss
    assert targets.loss(student, idx=idx, perm=perm, lam=lam).abs().item() < 1e-6
    assert targets.loss(student, idx=idx).item() > 1e-3  # unmixed, the same logits miss the targets
    with pytest.raises(ValueError, match=r"\(N, K\)"):
        SoftTargets(torch.ones(7), 2.0)


def test_without_augmentation_offline_distillation_trains_as_the_online_teacher(tmp_path):
    """The online teacher predicts the batch the student sees; with no augmentation and no mixing, that is the
    un-augmented image, so both ways give the student the same targets and the same weights."""
    save_teacher(tmp_path / "t.safetensors", 3)
    teacher = Teacher([str(tmp_path / "t.safetensors")], 4.0, precision="fp32", channels_last=False)
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (48, 1, 48, 48), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 7, (48,), generator=g)
    offline = SoftTargets(teacher.soft_targets(images, "none"), 4.0)

    def run(t) -> dict:
        torch.manual_seed(0)
        student = create_model("fer-mobile")
        opt = torch.optim.SGD(student.parameters(), lr=0.1)
        train_one_epoch(student, opt, images, labels, batch_size=16, aug=AUGMENT_PRESETS["none"],
                        normalizer=Normalizer("unit"), g=torch.Generator().manual_seed(0), teacher=t,
                        distill_weight=1.0, precision="fp32", channels_last=False, progress=False)
        return student.state_dict()

    a, b = run(teacher), run(offline)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    uniform = SoftTargets(torch.full((48, 7), 1 / 7), 4.0)
    assert not all(torch.allclose(a[k], c, rtol=1e-4, atol=1e-5) for k, c in run(uniform).items())


def test_offline_run_caches_its_targets_and_resumes_without_the_teacher_pass(tmp_path, trained_tiny_run, monkeypatch):
    cfg = tiny_config(model="fer-mobile", epochs=2, teachers=[str(trained_tiny_run)], distill_offline="flip")
    logs: list[str] = []
    assert not fit(cfg, tmp_path / "student", progress=False, stop_after=1, log=logs.append)["finished"]
    assert any("offline distillation: soft targets of" in m and "(flip views)" in m for m in logs)
    cache = tmp_path / "student" / SOFT_TARGETS
    assert cache.is_file()
    assert json.loads((tmp_path / "student/config.json").read_text())["train"]["distill_offline"] == "flip"

    def no_teacher_pass(*_, **__):
        raise AssertionError("the resumed run recomputed the cached soft targets")

    monkeypatch.setattr(Teacher, "soft_targets", no_teacher_pass)
    assert fit(cfg, tmp_path / "student", resume=True, progress=False, log=lambda _: None)["finished"]


def test_stale_or_corrupt_soft_target_caches(tmp_path, trained_tiny_run):
    teacher = Teacher([str(trained_tiny_run)], 4.0, precision="fp32", channels_last=False)
    images = torch.randint(0, 256, (8, 1, 48, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    cache = tmp_path / "soft.safetensors"
    first = offline_soft_targets(teacher, images, "none", cache, data_fingerprint="fp")
    again = offline_soft_targets(teacher, images, "none", cache, data_fingerprint="fp")
    torch.testing.assert_close(first.probs, again.probs)
    other = offline_soft_targets(teacher, images, "flip", cache, data_fingerprint="fp")  # other views: recomputed
    assert not torch.allclose(first.probs, other.probs)
    cache.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read the soft targets"):
        offline_soft_targets(teacher, images, "none", cache, data_fingerprint="fp")


def test_a_teacher_retrained_in_place_is_not_served_stale_targets(tmp_path, trained_tiny_run):
    model, meta = load_checkpoint(trained_tiny_run)
    path = tmp_path / "teacher.safetensors"
    save_checkpoint(path, model, meta)
    images = torch.randint(0, 256, (8, 1, 48, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    cache = tmp_path / "soft.safetensors"

    def targets() -> torch.Tensor:
        teacher = Teacher([str(path)], 4.0, precision="fp32", channels_last=False)
        return offline_soft_targets(teacher, images, "none", cache, data_fingerprint="fp").probs

    before = targets()
    with torch.no_grad():
        for prm in model.parameters():
            prm.add_(0.05 * torch.randn_like(prm))
    save_checkpoint(path, model, meta)  # same path, other weights
    assert not torch.allclose(before, targets())
    assert not list(tmp_path.glob(".soft.safetensors.*"))  # written atomically: no temporary file left


def test_targets_written_here_train_a_student_elsewhere_without_the_teachers_files(tmp_path, trained_tiny_run):
    """A file of soft targets stands in for the teachers (a GPU window carries it instead of their weights): the
    student trains exactly as the run that computed the targets itself, and records where they came from."""
    import shutil

    teacher = tmp_path / "teacher"
    shutil.copytree(trained_tiny_run, teacher)
    cfg = tiny_config(model="fer-mobile", epochs=2, teachers=[str(teacher)], distill_offline="flip")
    fit(cfg, tmp_path / "here", progress=False, log=lambda _: None)
    targets = write_soft_targets(cfg, tmp_path / "targets.safetensors", progress=False, log=lambda _: None)
    assert stale_teachers(targets) == []
    shutil.rmtree(teacher)  # elsewhere: the teacher's files are not there
    assert len(stale_teachers(targets)) == 1
    logs: list[str] = []
    fit(tiny_config(model="fer-mobile", epochs=2, teachers=[str(teacher)], distill_offline="flip",
                    distill_targets=str(targets)), tmp_path / "elsewhere", progress=False, log=logs.append)
    assert [r["val_acc"] for r in read_history(tmp_path / "here")] == \
        [r["val_acc"] for r in read_history(tmp_path / "elsewhere")]
    assert any(f"their soft targets read from {targets}" in m for m in logs)
    here, there = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("here", "elsewhere"))
    assert there["teachers"] == here["teachers"] and there["teachers"][0]["model"] == "fer-resnet-s"
    assert there["distill_targets"]["file"] == str(targets) and len(there["distill_targets"]["teacher_sha256"]) == 1


@pytest.mark.parametrize("change, match", [({"distill_temperature": 2.0}, "temperature 4.0 .this run: 2.0"),
                                           ({"distill_offline": "none"}, "tta 'flip' .this run: 'none'"),
                                           ({"teachers": ["other"]}, "teachers"),
                                           ({"synthetic": {**TINY_SYNTHETIC, "seed": 5}}, "data_fingerprint")])
def test_soft_targets_for_another_run_are_refused(tmp_path, trained_tiny_run, change, match):
    cfg = tiny_config(model="fer-mobile", epochs=1, teachers=[str(trained_tiny_run)], distill_offline="flip")
    targets = write_soft_targets(cfg, tmp_path / "t.safetensors", progress=False, log=lambda _: None)
    other = tiny_config(**{**cfg.to_dict(), **change, "distill_targets": str(targets)})
    with pytest.raises(CheckpointError, match=f"t.safetensors: these soft targets were computed for other .*{match}"):
        fit(other, tmp_path / "student", progress=False, log=lambda _: None)
    with pytest.raises(CheckpointError, match="no such soft-targets file"):
        fit(tiny_config(**{**cfg.to_dict(), "distill_targets": str(tmp_path / "missing")}), tmp_path / "s2",
            progress=False, log=lambda _: None)


@pytest.mark.parametrize("bad, match", [({"distill_offline": "mirror", "teachers": ["t"]}, "distill_offline"),
                                        ({"distill_offline": "flip"}, "needs teachers"),
                                        ({"teachers": ["t"], "distill_targets": "t.safetensors"},
                                         "distill_targets .* needs distill_offline")])
def test_bad_offline_distillation_settings_are_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**bad)
