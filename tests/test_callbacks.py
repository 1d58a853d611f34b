import math

import pytest
import torch

from ferlab.train.callbacks import BestCheckpoint, EarlyStopping
from ferlab.train.config import TrainConfig
from ferlab.train.optim import build_optimizer, build_schedule


def test_early_stopping_waits_patience_epochs():
    es = EarlyStopping(patience=2)
    decisions = [es.update(v, e) for e, v in enumerate([0.5, 0.6, 0.6, 0.55, 0.7, 0.69, 0.68])]
    assert decisions == [False, False, False, True, False, False, True]
    assert es.best == 0.7 and es.best_epoch == 4


def test_early_stopping_off_and_min_mode():
    es = EarlyStopping(patience=0)
    assert not any(es.update(1.0, e) for e in range(50))
    es = EarlyStopping(patience=1, mode="min")
    assert [es.update(v, e) for e, v in enumerate([1.0, 0.9, 0.95])] == [False, False, True]


def test_improves_is_pure_and_nan_never_improves():
    es = EarlyStopping(patience=3, min_delta=0.01)
    es.update(0.5, 0)
    before = es.state_dict()
    assert es.improves(0.52) and not es.improves(0.505) and not es.improves(math.nan)
    assert es.state_dict() == before


def test_state_dict_round_trip_continues_identically():
    values = [0.3, 0.4, 0.35, 0.45, 0.44, 0.43, 0.42]
    full = EarlyStopping(patience=3)
    ref = [full.update(v, e) for e, v in enumerate(values)]
    a = EarlyStopping(patience=3)
    first = [a.update(v, e) for e, v in enumerate(values[:3])]
    b = EarlyStopping(patience=3)
    b.load_state_dict(a.state_dict())
    assert first + [b.update(v, e + 3) for e, v in enumerate(values[3:])] == ref


def test_best_checkpoint():
    bc = BestCheckpoint("max")
    assert [bc.update(v, e) for e, v in enumerate([0.1, 0.3, 0.2, 0.3, 0.4])] == [True, True, False, False, True]
    assert bc.best_epoch == 4
    with pytest.raises(ValueError):
        BestCheckpoint("maximum")


def lrs(cfg: TrainConfig, steps_per_epoch: int = 10, metrics=None) -> list[float]:
    model = torch.nn.Linear(2, 2)
    opt = build_optimizer(model, cfg)
    sched = build_schedule(opt, cfg, steps_per_epoch)
    out = []
    for epoch in range(cfg.epochs):
        for _ in range(steps_per_epoch):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step_batch()
        sched.step_epoch(metrics[epoch] if metrics else 0.0)
    return out


def test_onecycle_warms_up_to_peak_then_anneals():
    lr = lrs(TrainConfig(epochs=10, lr=0.1, schedule="onecycle", warmup_epochs=2))
    peak = max(range(len(lr)), key=lr.__getitem__)
    assert abs(lr[peak] - 0.1) < 1e-3 and 15 <= peak <= 25
    assert lr[0] < 0.01 and lr[-1] < 1e-3


def test_cosine_with_warmup():
    lr = lrs(TrainConfig(epochs=10, lr=0.1, schedule="cosine", warmup_epochs=1))
    assert lr[0] < 0.01 and abs(max(lr) - 0.1) < 1e-2 and lr[-1] < 0.01
    lr = lrs(TrainConfig(epochs=10, lr=0.1, schedule="cosine", warmup_epochs=0))
    assert lr[0] == pytest.approx(0.1) and lr[-1] < 0.01
    for epochs in (1, 2):  # a warm-up as long as the run is capped at 30% of it, as one-cycle's: the rate anneals
        lr = lrs(TrainConfig(epochs=epochs, lr=0.1, schedule="cosine", warmup_epochs=2))
        assert abs(max(lr) - 0.1) < 1e-2 and lr[-1] < 0.01


def test_plateau_halves_after_patience():
    cfg = TrainConfig(epochs=6, lr=0.1, schedule="plateau", plateau_patience=1, plateau_factor=0.5)
    lr = lrs(cfg, steps_per_epoch=1, metrics=[0.5, 0.5, 0.5, 0.5, 0.5, 0.6])
    assert lr == pytest.approx([0.1, 0.1, 0.1, 0.05, 0.05, 0.025])


def test_schedule_state_survives_weights_only_round_trip(tmp_path):
    cfg = TrainConfig(epochs=4, lr=0.1, schedule="onecycle")
    model = torch.nn.Linear(2, 2)
    opt = build_optimizer(model, cfg)
    sched = build_schedule(opt, cfg, 5)
    for _ in range(7):
        opt.step()
        sched.step_batch()
    torch.save({"s": sched.state_dict(), "o": opt.state_dict()}, tmp_path / "s.pt")
    state = torch.load(tmp_path / "s.pt", weights_only=True)
    opt2 = build_optimizer(model, cfg)
    sched2 = build_schedule(opt2, cfg, 5)
    opt2.load_state_dict(state["o"])
    sched2.load_state_dict(state["s"])
    for _ in range(5):
        opt.step()
        sched.step_batch()
        opt2.step()
        sched2.step_batch()
        assert opt.param_groups[0]["lr"] == opt2.param_groups[0]["lr"]


def test_bad_config_values_are_clear_errors():
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="rmsprop")
    with pytest.raises(ValueError, match="augment preset"):
        TrainConfig(augment="heavy")
    with pytest.raises(ValueError, match="unknown training option"):
        TrainConfig.from_dict({"epoch": 3})
