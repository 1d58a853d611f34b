"""``train_one_epoch``'s guards: a non-finite loss stops the epoch before it reaches the weights."""

from __future__ import annotations

import pytest
import torch

from ferlab.models import create_model
from ferlab.train.engine import train_one_epoch
from ferlab.transforms import AUGMENT_PRESETS, Normalizer


def test_a_non_finite_loss_stops_the_epoch_naming_the_batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, 1, 48, 48), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 7, (64,), generator=g)
    net = create_model("fer-mobile", num_classes=7)
    with torch.no_grad():
        net.fc.bias[0] = float("nan")  # every logit row, so every loss, is NaN
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(FloatingPointError, match=r"loss is nan at batch 0; lower the learning rate"):
        train_one_epoch(net, torch.optim.SGD(net.parameters(), lr=0.1), x, y, batch_size=32,
                        aug=AUGMENT_PRESETS["standard"], normalizer=Normalizer("unit"), g=g, precision="fp32",
                        progress=False)
    for p, q in zip(before, net.parameters(), strict=True):  # no optimiser step was taken
        assert torch.equal(p.nan_to_num(), q.nan_to_num())


def test_a_cpu_batch_bound_for_a_gpu_is_copied_from_pinned_memory_without_blocking(monkeypatch):
    """A copy from pageable memory would wait for the GPU's queued work at every batch."""
    from ferlab.inference.predict import to_device

    calls = []

    class Pinned:
        def to(self, device, non_blocking=False):
            calls.append((device, non_blocking))
            return "on the GPU"

    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: calls.append("pin") or Pinned())
    assert to_device(torch.zeros(2, 3), torch.device("cuda")) == "on the GPU"
    assert calls == ["pin", (torch.device("cuda"), True)]
    x = torch.zeros(2, 3)
    assert to_device(x, torch.device("cpu")) is x and calls == ["pin", (torch.device("cuda"), True)]
