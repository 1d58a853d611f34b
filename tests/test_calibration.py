"""Temperature scaling: the fit recovers a known temperature, ECE has its analytic values, and a shipped
temperature changes confidences but never a prediction (single nets, ensembles, torch and ONNX alike)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from ferlab.inference.backends import OnnxBackend, TorchBackend
from ferlab.inference.calibration import (
    ece,
    fit_temperature,
    nll,
    reliability,
    scaled_probabilities,
    temperature_for,
)
from ferlab.inference.loader import load_model


def test_fit_recovers_the_temperature_that_made_the_logits_overconfident():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 1.5, (20000, 7))  # calibrated scores: labels drawn from softmax(z)
    p = scaled_probabilities(z, 1.0)
    labels = (p.cumsum(1) > rng.random((len(z), 1))).argmax(1)
    t = fit_temperature(3.0 * z, labels)  # the same scores, three times too confident
    assert t == pytest.approx(3.0, rel=0.08)
    assert nll(3.0 * z, labels, t) < min(nll(3.0 * z, labels, 1.0), nll(3.0 * z, labels, t * 1.2),
                                         nll(3.0 * z, labels, t / 1.2))


def test_scaling_keeps_every_argmax_and_rejects_bad_temperatures():
    z = np.random.default_rng(1).normal(0, 3, (500, 8))
    for t in (0.3, 1.0, 2.5):
        p = scaled_probabilities(z, t)
        assert np.array_equal(p.argmax(1), z.argmax(1))
        assert np.allclose(p.sum(1), 1, atol=1e-5)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        scaled_probabilities(z, 0.0)
    with pytest.raises(ValueError, match="need scores"):
        fit_temperature(z, np.zeros(3, int))


def test_ece_has_its_analytic_values():
    labels = np.zeros(10, int)
    probs = np.tile([0.8, 0.2], (10, 1))  # confidence 0.8 everywhere
    hits = probs.copy()
    hits[:2] = [0.2, 0.8]  # 8 of 10 right at 0.8 confidence: perfectly calibrated
    assert ece(hits, labels) == pytest.approx(0.0, abs=1e-12)
    wrong = probs.copy()
    wrong[:4] = [0.2, 0.8]  # 6 of 10 right at 0.8 confidence: ECE 0.2
    assert ece(wrong, labels) == pytest.approx(0.2)
    rel = reliability(wrong, labels, n_bins=10)
    assert rel.count.sum() == 10 and rel.count[7] == 10  # 0.8 falls in the bin (0.7, 0.8]
    assert rel.accuracy[7] == pytest.approx(0.6)


def test_stored_temperatures_are_read_per_mode():
    cal = {"temperature": {"none": 1.5, "affine": 1.2}}
    assert temperature_for(cal, "none") == 1.5
    assert temperature_for(cal, "affine") == 1.2
    assert temperature_for(cal, "flip") == 1.0  # not fitted for this mode
    assert temperature_for(None, "none") == 1.0
    with pytest.raises(ValueError, match="must be > 0"):
        temperature_for({"temperature": {"none": -1}}, "none")


@pytest.fixture
def calibrated_shelf(weights, tmp_path):
    """Two shipped copies of one checkpoint with temperatures, and their ensemble with its own."""
    from test_onnx import make_checkpoint

    ckpt = make_checkpoint(tmp_path / "a.safetensors", "fer-resnet-s", seed=1)
    make_checkpoint(tmp_path / "b.safetensors", "fer-resnet-s", seed=2)
    for n in ("a", "b"):
        shutil.copy(tmp_path / f"{n}.safetensors", weights / f"{n}.safetensors")
    manifest = {
        "a": {"file": "a.safetensors", "model": "fer-resnet-s", "calibration": {"temperature": {"none": 2.0}}},
        "b": {"file": "b.safetensors", "model": "fer-resnet-s", "calibration": {"temperature": {"none": 0.5}}},
        "ab": {"kind": "ensemble", "members": ["a", "b"], "calibration": {"temperature": {"none": 1.7}}},
    }
    (weights / "manifest.json").write_text(json.dumps(manifest))
    return ckpt


def test_a_shipped_temperature_reaches_every_path_and_keeps_every_prediction(calibrated_shelf, tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (24, 1, 48, 48), dtype=np.uint8)
    xt = torch.from_numpy(x)
    a = load_model("a")
    raw = a.probabilities(xt, calibrated=False)
    cal = a.probabilities(xt)
    z = np.log(raw)
    assert np.allclose(cal, scaled_probabilities(z, 2.0), atol=1e-5)
    assert np.array_equal(cal.argmax(1), raw.argmax(1))
    assert cal.max(1).mean() < raw.max(1).mean()  # T = 2 softens
    assert np.allclose(load_model(str(calibrated_shelf)).probabilities(xt), raw, atol=1e-6)  # a file: no temperature

    ens = load_model("ab")
    members_mean = (load_model("a").probabilities(xt, calibrated=False)
                    + load_model("b").probabilities(xt, calibrated=False)) / 2
    got = ens.probabilities(xt)
    assert np.array_equal(got.argmax(1), members_mean.argmax(1))  # the stated accuracy is the raw mean's
    assert np.allclose(got, scaled_probabilities(np.log(members_mean), 1.7), atol=1e-5)

    for spec, want in (("a", cal), ("ab", got)):
        torch_be = TorchBackend.from_spec(spec)
        assert np.allclose(torch_be.probabilities(x), want, atol=1e-5)
        onnx_be = OnnxBackend.from_spec(spec, threads=1)
        assert np.abs(onnx_be.probabilities(x) - want).max() < 1e-4
        assert np.abs(onnx_be.logits(x) - torch_be.logits(x)).max() < 1e-4
