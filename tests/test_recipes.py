"""Training levers beyond the basics: mixup/CutMix and the EMA of the weights, inside real runs."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import REPO, tiny_config
from safetensors.torch import load_file
from test_resume import assert_same_weights, final_weights

from ferlab.checkpoint import LAST_STATE, load_state
from ferlab.study.plan import Experiment
from ferlab.study.runner import run_hash
from ferlab.train.config import TrainConfig
from ferlab.train.fit import fit, read_history


def quiet(_: str) -> None:
    pass


def test_mixed_training_runs_and_mixes(tmp_path):
    def first_epoch(**kw) -> list[str]:
        name = "-".join(map(str, kw.values())) or "plain"
        summary = fit(tiny_config(epochs=1, **kw), tmp_path / name, progress=False, log=quiet)
        assert summary["finished"]
        return (tmp_path / name / "history.csv").read_text().splitlines()[1].split(",")

    plain, mixed = first_epoch(), first_epoch(mixup=0.2, cutmix=1.0)
    # same seed and data: only the mixing differs, so the training loss and accuracy do
    assert float(mixed[2]) != float(plain[2]) and float(mixed[3]) != float(plain[3])


def test_ema_weights_are_validated_checkpointed_and_resumed(tmp_path):
    cfg = tiny_config(epochs=2, ema_decay=0.9)
    fit(cfg, tmp_path / "ref", progress=False, log=quiet)
    state = load_state(tmp_path / "ref" / LAST_STATE)
    ema = {k.removeprefix("module."): v for k, v in state["ema"].items() if k.startswith("module.")}
    raw = state["model"]
    assert ema.keys() == raw.keys()
    assert any(not torch.allclose(ema[k].float(), raw[k].float()) for k in raw)  # the average lags the weights
    summary = json.loads((tmp_path / "ref/summary.json").read_text())
    if summary["best_epoch"] == 2:  # the last epoch was the best: the checkpoint holds the EMA weights
        best = load_file(tmp_path / "ref/best.safetensors")
        for k, v in best.items():
            assert torch.allclose(v.float(), ema[k].float()), k
    # an interrupted EMA run resumes to the same averaged weights
    fit(cfg, tmp_path / "cut", progress=False, stop_after=1, log=quiet)
    fit(cfg, tmp_path / "cut", resume=True, progress=False, log=quiet)
    assert_same_weights(load_state(tmp_path / "cut" / LAST_STATE)["ema"], state["ema"])
    assert_same_weights(final_weights(tmp_path / "cut"), raw)


def test_progressive_resizing_trains_small_then_full_and_resumes(tmp_path):
    """Epochs 1-2 at 32x32, 3 at 40x40, then 48x48; the schedule is in the history and survives a resume."""
    cfg = tiny_config(epochs=4, size_start=32, size_ramp_epochs=3)
    lines: list[str] = []
    fit(cfg, tmp_path / "ref", progress=False, log=lines.append)
    sizes = [int(row["size"]) for row in read_history(tmp_path / "ref")]
    assert sizes == [32, 32, 40, 48]
    assert sum("at 32x32" in line for line in lines) == 2 and sum("at 40x40" in line for line in lines) == 1
    fit(cfg, tmp_path / "cut", progress=False, stop_after=2, log=quiet)
    fit(cfg, tmp_path / "cut", resume=True, progress=False, log=quiet)
    assert [int(row["size"]) for row in read_history(tmp_path / "cut")] == sizes
    assert_same_weights(final_weights(tmp_path / "cut"), final_weights(tmp_path / "ref"))
    # off (the default), every epoch trains at full size
    fit(tiny_config(epochs=1), tmp_path / "plain", progress=False, log=quiet)
    assert [int(row["size"]) for row in read_history(tmp_path / "plain")] == [48]


def test_progressive_resizing_needs_a_net_that_takes_smaller_images(tmp_path):
    with pytest.raises(ValueError, match=r"r002-vgg does not accept 32x32 inputs.*progressive resizing"):
        fit(tiny_config(model="r002-vgg", epochs=2, size_start=32, size_ramp_epochs=1), tmp_path / "run",
            progress=False, log=quiet)


def test_ema_off_changes_nothing_in_the_state(tmp_path):
    fit(tiny_config(epochs=1), tmp_path / "run", progress=False, log=quiet)
    assert "ema" not in load_state(tmp_path / "run" / LAST_STATE)


@pytest.mark.parametrize("bad", [{"mixup": -0.1}, {"cutmix": -1.0}, {"ema_decay": 1.0}, {"ema_decay": -0.5},
                                 {"size_start": 4}, {"size_start": 32, "size_ramp_epochs": 0},
                                 {"size_start": 32, "size_ramp_epochs": 31}])
def test_bad_values_are_errors(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        TrainConfig(**bad)


def test_new_fields_at_their_defaults_keep_old_study_hashes():
    """Runs cached before mixup/CutMix/EMA/distillation/warm starts existed keep their hashes; setting one changes
    the hash."""
    import hashlib

    from ferlab.study.runner import CACHE_VERSION, NOT_HASHED

    # the fields added after cache version 1, with a non-default value each
    added = {"mixup": 0.5, "cutmix": 0.5, "ema_decay": 0.5, "teachers": ["runs/t"], "distill_weight": 0.7,
             "distill_temperature": 2.0, "size_start": 32, "size_ramp_epochs": 1, "distill_offline": "flip",
             "labels": "ferplus", "label_mode": "crossentropy", "init_from": "runs/t", "sam_rho": 0.05,
             "sam_adaptive": True}
    exp = Experiment("x", "q1", TrainConfig(model="r000-cnn1", precision="bf16"))  # the default before `auto`
    old = {k: v for k, v in exp.cfg.to_dict().items() if k not in NOT_HASHED + tuple(added)}
    blob = json.dumps({"v": CACHE_VERSION, "cfg": old, "data": "fp", "fold": {}}, sort_keys=True)
    assert run_hash(exp, "fp") == hashlib.sha256(blob.encode()).hexdigest()[:16]
    # a field only valid with another one set
    needs = {"size_start": {"size_ramp_epochs": 1}, "distill_offline": {"teachers": ["runs/t"]},
             "label_mode": {"labels": "ferplus"}, "sam_adaptive": {"sam_rho": 0.5}}
    for field, value in added.items():
        changed = Experiment("x", "q1", TrainConfig(model="r000-cnn1", precision="bf16",
                                                    **{field: value, **needs.get(field, {})}))
        assert run_hash(changed, "fp") != run_hash(exp, "fp"), field


def test_the_recipes_are_there():
    assert len(list((REPO / "configs").glob("*.toml"))) >= 20


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_config_parses(path):
    """Each runnable recipe under configs/ is a valid config for a registered model; teachers and warm starts are
    shipped names or the run directory of another recipe here (runs/NAME for configs/NAME.toml)."""
    from ferlab.models import list_models
    from ferlab.pretrained import pretrained_entry, pretrained_path

    cfg = TrainConfig.from_file(path)
    assert cfg.model in list_models()
    if cfg.init_from and not cfg.init_from.startswith("runs/"):  # a shipped net of the same architecture
        assert pretrained_entry(cfg.init_from)["model"] == cfg.model, cfg.init_from
    for teacher in [*cfg.teachers, *([cfg.init_from] if cfg.init_from else [])]:
        if teacher.startswith("runs/"):
            assert (REPO / "configs" / f"{teacher[len('runs/'):]}.toml").is_file(), teacher
        else:
            assert pretrained_path(teacher).is_file(), teacher
