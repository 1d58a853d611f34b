"""Ensemble selection: greedy forward selection on val with known answers, and bench/ensemble.py end to end."""

from __future__ import annotations

import importlib.util
import re

import numpy as np
import pytest
import torch
from conftest import REPO
from safetensors.torch import load_file

from ferlab.checkpoint import load_checkpoint, read_meta, resolve, save_checkpoint
from ferlab.ensemble import greedy_selection
from ferlab.evaluate import evaluate_checkpoints
from ferlab.models import create_model


def one_hot(pred: list[int], k: int = 3) -> np.ndarray:
    return np.eye(k)[pred] * 0.9 + 0.1 / k  # (N, K) confident probabilities


def test_greedy_selection_adds_the_best_candidate_and_stops_when_nothing_helps():
    y = np.array([0, 1, 2, 0])
    weak = one_hot([0, 0, 0, 0])  # 2/4
    strong = one_hot([0, 1, 2, 1])  # 3/4
    fixer = np.array([[0.1, 0.1, 0.8], [0.2, 0.6, 0.2], [0.1, 0.1, 0.8], [0.98, 0.01, 0.01]])  # 3/4, sure of row 3
    steps = greedy_selection([weak, strong, fixer], y)
    assert [s.added for s in steps] == [1, 2]  # strong first (tie with fixer: the earlier), then fixer: 4/4
    assert [s.val_acc for s in steps] == [0.75, 1.0]
    assert steps[-1].members == (1, 2)
    assert [s.added for s in greedy_selection([weak, strong, fixer], y, max_members=1)] == [1]
    # a candidate that cannot raise the accuracy is never added
    assert [s.added for s in greedy_selection([strong, weak], y)] == [0]
    with pytest.raises(ValueError, match="no candidates"):
        greedy_selection([], y)
    for replacement in (False, True):
        with pytest.raises(ValueError, match="max_members must be at least 1, got 0"):
            greedy_selection([weak, strong], y, max_members=0, replacement=replacement)


def test_selection_with_replacement_weights_a_member_by_picking_it_again():
    y = np.array([0, 0, 0, 1])
    a = np.array([[0.6, 0.4]] * 4)  # 3/4: wrong on row 3 by a small margin
    b = np.array([[0.35, 0.65], [0.9, 0.1], [0.9, 0.1], [0.1, 0.9]])  # 3/4: wrong on row 0
    # a + b is 3/4 (row 0 lost), so without replacement the selection stops at a
    assert [s.added for s in greedy_selection([a, b], y)] == [0]
    # 2a + b is right everywhere: a is picked twice (the tie a+a = a+b goes to the earlier), then b
    steps = greedy_selection([a, b], y, replacement=True)
    assert [s.added for s in steps] == [0, 0, 1]
    assert steps[-1].members == (0, 0, 1) and steps[-1].val_acc == 1.0
    # the shortest prefix with the best accuracy is kept: two picks never beat a alone
    assert [s.members for s in greedy_selection([a, b], y, max_members=2, replacement=True)] == [(0,)]


def test_bench_ensemble_prints_the_val_chosen_ensemble_and_a_command_that_reproduces_it(tmp_path, trained_tiny_run,
                                                                                          capsys):
    # a second candidate: the tiny run with its weights perturbed
    src = resolve(trained_tiny_run)
    state = load_file(str(src))
    g = torch.Generator().manual_seed(0)
    noisy = {k: v + 0.05 * v.std() * torch.randn(v.shape, generator=g) if k.endswith("weight") and v.dim() > 1
             else v for k, v in state.items()}  # conv and linear weights only
    meta = read_meta(src)
    model = create_model("fer-resnet-s")
    model.load_state_dict(noisy)
    save_checkpoint(tmp_path / "noisy.safetensors", model, meta)

    spec = importlib.util.spec_from_file_location("bench_ensemble", REPO / "bench/ensemble.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    candidates = [str(trained_tiny_run), str(tmp_path / "noisy.safetensors")]
    assert bench.main(candidates) == 0
    out = capsys.readouterr().out
    assert "members chosen on val only" in out
    chosen = re.search(r"PrivateTest \(test\) ([\d.]+)%", out)
    reproduce = out.strip().splitlines()[-1]
    assert reproduce.startswith("reproduce: ferlab evaluate ") and chosen
    specs = [s for s in reproduce.removeprefix("reproduce: ferlab evaluate ").split() if not s.startswith("--")
             and s != "test"]
    assert set(specs) <= set(candidates) and specs
    acc = evaluate_checkpoints(specs, split="test", progress=False)["accuracy"]
    assert f"{acc:.2%}" == f"{chosen.group(1)}%"


def test_bench_ensemble_cache_gives_the_same_selection_without_predicting_again(tmp_path, trained_tiny_run, capsys,
                                                                                 monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_ensemble", REPO / "bench/ensemble.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    copy = tmp_path / "copy.safetensors"  # a second candidate: the same weights, other bytes in the header
    model, meta = load_checkpoint(trained_tiny_run)
    save_checkpoint(copy, model, {**meta, "note": "copy"})
    argv = [str(trained_tiny_run), str(copy), "--replacement", "--cache", str(tmp_path / "cache")]
    assert bench.main(argv) == 0
    first = capsys.readouterr().out
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2

    def no_prediction(*args, **kwargs):
        raise AssertionError("predicted again despite the cache")

    monkeypatch.setattr("ferlab.inference.loader.LoadedModel.view_logits", no_prediction)
    assert bench.main(argv) == 0
    assert capsys.readouterr().out == first


def test_a_member_whose_data_changed_is_flagged_even_without_data(tmp_path, trained_tiny_run):
    model, meta = load_checkpoint(trained_tiny_run)
    other = tmp_path / "other.safetensors"  # as if trained on another version of the file
    save_checkpoint(other, model, {**meta, "data": {**meta["data"], "fingerprint": "0" * 16}})
    members = evaluate_checkpoints([trained_tiny_run, other], split="test", progress=False)["members"]
    assert [m["same_data_as_training"] for m in members] == [True, False]


def test_an_ensemble_of_runs_with_differently_carved_val_parts_is_refused(tmp_path, trained_tiny_run):
    model, meta = load_checkpoint(trained_tiny_run)
    paths = []
    for seed in (0, 1):  # each member held out its own val rows: one member's val rows trained the other
        paths.append(tmp_path / f"seed{seed}.safetensors")
        save_checkpoint(paths[-1], model, {**meta, "split": {**meta["split"], "val_carved": True, "split_seed": seed}})
    with pytest.raises(ValueError, match="seed1.safetensors: its val part was carved with fraction .* and seed 1"):
        evaluate_checkpoints(paths, split="val", progress=False)


def test_the_ensemble_averages_its_members_probabilities(tmp_path, trained_tiny_run):
    from ferlab.data.source import data_for, split_rows
    from ferlab.inference.loader import load_model

    model, meta = load_checkpoint(trained_tiny_run)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():  # a second, clearly different member
            p.add_(0.5 * torch.randn_like(p) * p.std().nan_to_num())
    other = tmp_path / "other.safetensors"
    save_checkpoint(other, model, meta)
    report = evaluate_checkpoints([trained_tiny_run, other], split="test", progress=False)
    data = data_for(meta, None, progress=False)
    idx = split_rows(data, meta, "test")
    x = torch.from_numpy(data.images[idx]).unsqueeze(1)
    probs = [load_model(p).probabilities(x, progress=False) for p in (trained_tiny_run, other)]
    y = data.labels[idx]
    assert (probs[0].argmax(1) != probs[1].argmax(1)).any()  # the members disagree somewhere
    assert [m["accuracy"] for m in report["members"]] == [float((p.argmax(1) == y).mean()) for p in probs]
    assert report["accuracy"] == float(((probs[0] + probs[1]).argmax(1) == y).mean())


def test_classification_metrics_known_answer():
    from ferlab.evaluate import classification_metrics

    labels = np.array([0, 0, 1, 2])
    probs = np.eye(3)[[0, 1, 1, 0]]  # predictions 0, 1, 1, 0
    m = classification_metrics(labels, probs, ["a", "b", "c"])
    assert m["n"] == 4 and m["accuracy"] == 0.5
    assert m["confusion"] == [[1, 1, 0], [0, 1, 0], [1, 0, 0]]  # rows: true class; columns: predicted
    assert m["per_class"]["a"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert m["per_class"]["b"] == pytest.approx({"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 1})
    assert m["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert m["macro_f1"] == pytest.approx((0.5 + 2 / 3) / 3)
    assert m["most_confused"] == [{"true": "c", "predicted": "a", "rate": 1.0, "count": 1},
                                  {"true": "a", "predicted": "b", "rate": 0.5, "count": 1}]


def test_bench_ensemble_selects_on_uncalibrated_probabilities_as_the_shipped_ensemble_averages_them(
        tmp_path, trained_tiny_run, weights):
    import json
    import shutil

    from ferlab.data.source import data_for
    from ferlab.inference.loader import load_model

    shutil.copy(resolve(trained_tiny_run), weights / "a.safetensors")
    calibration = {"temperature": {"none": 0.25, "flip": 0.25, "shift": 0.25, "affine": 0.25}, "fit_on": "val"}
    (weights / "manifest.json").write_text(json.dumps({"tiny-a": {"file": "a.safetensors",
                                                                   "calibration": calibration}}))
    spec = importlib.util.spec_from_file_location("bench_ensemble", REPO / "bench/ensemble.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    data = data_for(read_meta(trained_tiny_run), None, progress=False)
    _, rows, shipped = bench.predict("tiny-a", data, "none")
    _, _, run = bench.predict(str(trained_tiny_run), data, "none")
    x = torch.from_numpy(data.images[rows["val"]]).unsqueeze(1)
    calibrated = load_model("tiny-a").probabilities(x)
    assert np.abs(calibrated - shipped["val"]).max() > 1e-2  # the temperature would change what is averaged
    assert np.abs(shipped["val"] - run["val"]).max() < 1e-6  # the shipped file weighs as its run does
