"""Sharpness-aware minimisation: the perturbation against its closed form on a quadratic, BatchNorm left alone in
the second pass, and SAM inside real (resumable) runs."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config
from test_resume import assert_same_weights, final_weights
from torch import nn

from ferlab.train.config import TrainConfig
from ferlab.train.fit import fit
from ferlab.train.sam import SharpnessAware, frozen_batchnorm_stats


class Quadratic(nn.Module):
    """L(w) = 0.5 * sum(a * w^2): gradient a * w."""

    def __init__(self, w: list[float], a: list[float]) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w, dtype=torch.float64))
        self.register_buffer("a", torch.tensor(a, dtype=torch.float64))

    def loss(self) -> torch.Tensor:
        return 0.5 * (self.a * self.w**2).sum()


def quiet(_: str) -> None:
    pass


@pytest.mark.parametrize("adaptive", [False, True])
def test_the_second_gradient_is_taken_at_the_worst_nearby_point(adaptive):
    w0, a, rho = torch.tensor([3.0, -1.0, 0.5], dtype=torch.float64), torch.tensor([1.0, 4.0, 2.0]), 0.1
    q = Quadratic(w0.tolist(), a.tolist())
    q.loss().backward()
    g = (a * w0).double()  # the gradient at w
    # SAM: e = rho g / |g|; ASAM: e = rho w^2 g / |w g|
    e = rho * w0**2 * g / torch.linalg.norm(w0 * g) if adaptive else rho * g / torch.linalg.norm(g)
    sam = SharpnessAware(rho, adaptive=adaptive)
    with sam.perturbed(q):
        torch.testing.assert_close(q.w.detach(), w0 + e)
        q.w.grad = None
        q.loss().backward()
    assert torch.equal(q.w.detach(), w0)  # back at w exactly
    torch.testing.assert_close(q.w.grad, a.double() * (w0 + e))  # the gradient taken at w + e
    if not adaptive:  # plain SAM moves exactly rho
        assert torch.linalg.norm(e).item() == pytest.approx(rho)


def test_a_step_at_a_minimum_stays_there():
    q = Quadratic([0.0, 0.0], [1.0, 2.0])
    q.loss().backward()  # zero gradient: e must be zero, not NaN
    with SharpnessAware(0.05).perturbed(q):
        assert torch.equal(q.w.detach(), torch.zeros(2, dtype=torch.float64))


def test_weights_come_back_when_the_second_pass_fails():
    q = Quadratic([1.0, 2.0], [1.0, 1.0])
    q.loss().backward()
    with pytest.raises(RuntimeError, match="boom"), SharpnessAware(0.5).perturbed(q):
        raise RuntimeError("boom")
    assert q.w.tolist() == [1.0, 2.0]


def test_sam_needs_a_first_backward_pass():
    q = Quadratic([1.0], [1.0])
    with pytest.raises(RuntimeError, match="loss.backward"), SharpnessAware(0.05).perturbed(q):
        pass


def test_batchnorm_normalises_but_does_not_count_the_batch_twice():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm2d(4, momentum=None)).train()
    x = torch.randn(8, 1, 6, 6)
    net(x)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with frozen_batchnorm_stats(net):
        out = net(x)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert net[1].momentum == 0.1 and net[2].momentum is None
    # still training-mode normalisation: each channel of the output has zero mean over the batch
    torch.testing.assert_close(out.mean((0, 2, 3)), torch.zeros(4), atol=1e-5, rtol=0)
    net(x)  # and outside the context the statistics move again
    assert not torch.equal(net[1].running_mean, before["1.running_mean"])


def test_sam_trains_differently_and_resumes_to_the_same_weights(tmp_path):
    plain = fit(tiny_config(epochs=2), tmp_path / "plain", progress=False, log=quiet)
    cfg = tiny_config(epochs=2, sam_rho=0.05)
    fit(cfg, tmp_path / "ref", progress=False, log=quiet)
    assert plain["finished"]
    first = [(tmp_path / d / "history.csv").read_text().splitlines()[1].split(",") for d in ("plain", "ref")]
    assert first[0][2:6] != first[1][2:6]  # same seed and data: only SAM differs, so validation does
    fit(cfg, tmp_path / "cut", progress=False, stop_after=1, log=quiet)
    fit(cfg, tmp_path / "cut", resume=True, progress=False, log=quiet)
    assert_same_weights(final_weights(tmp_path / "cut"), final_weights(tmp_path / "ref"))


@pytest.mark.parametrize("bad", [{"sam_rho": -0.1}, {"sam_adaptive": True}])
def test_bad_sam_settings_are_errors(bad):
    with pytest.raises(ValueError, match="sam_"):
        TrainConfig(**bad)
    with pytest.raises(ValueError, match="rho"):
        SharpnessAware(0.0)
