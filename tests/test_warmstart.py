"""Warm start (init_from): a run begins from a checkpoint's weights, the classifier mapped class by class."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_config, write_fer_dirs

from ferlab.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ferlab.data.ferplus import FERPLUS_CLASS_NAMES
from ferlab.models import create_model
from ferlab.train.config import TrainConfig
from ferlab.train.fit import fit
from ferlab.train.provenance import overlap_warnings
from ferlab.train.warmstart import class_tensors, warm_start

SEVEN = list(FERPLUS_CLASS_NAMES[:7])
SPLIT = {"val_carved": False, "val_fraction": 0.1, "split_seed": 0}


def save_source(path, classes=SEVEN, name="fer-mobile", seed=0, fingerprint="fp", args=None):
    torch.manual_seed(seed)
    model = create_model(name, num_classes=len(classes), **(args or {})).eval()
    meta = {"model": {"name": name, "args": args or {}, "num_classes": len(classes), "in_chans": 1},
            "preprocess": {"normalize": {"mode": "unit", "mean": 0.0, "std": 1.0}, "input_size": [48, 48]},
            "class_names": list(classes), "data": {"fingerprint": fingerprint}, "split": SPLIT}
    save_checkpoint(path, model, meta)
    return load_checkpoint(path)[0]  # what was saved (fp16 rounding included)


def test_class_tensors_are_the_classifiers():
    names = class_tensors("fer-mobile", {}, 7)
    state = create_model("fer-mobile", num_classes=7).state_dict()
    assert names and all(state[n].shape[0] == 7 for n in names)
    assert {n.rsplit(".", 1)[-1] for n in names} == {"weight", "bias"}  # one linear layer


def test_seven_to_eight_classes_copies_every_tensor_and_maps_the_classifier_by_name(tmp_path):
    src = save_source(tmp_path / "src.safetensors")
    # the run's classes in another order, plus Contempt: rows must follow the names, not the positions
    classes = ["Contempt", *reversed(SEVEN)]
    torch.manual_seed(1)
    net = create_model("fer-mobile", num_classes=8)
    fresh = {k: v.clone() for k, v in net.state_dict().items()}
    ws = warm_start(net, str(tmp_path / "src.safetensors"), "fer-mobile", {}, classes)
    assert ws.new_classes == ["Contempt"] and ws.dropped_classes == []
    got, want = net.state_dict(), src.state_dict()
    per_class = class_tensors("fer-mobile", {}, 8)
    for name, t in got.items():
        if name in per_class:
            torch.testing.assert_close(t[0], fresh[name][0])  # Contempt keeps its fresh initialisation
            for i, c in enumerate(classes[1:], start=1):
                torch.testing.assert_close(t[i], want[name][SEVEN.index(c)])
        else:
            torch.testing.assert_close(t, want[name].to(t.dtype))
    assert "Contempt start fresh" in ws.describe()


def test_the_same_classes_start_from_the_checkpoint_exactly(tmp_path):
    src = save_source(tmp_path / "src.safetensors", seed=3)
    net = create_model("fer-mobile", num_classes=7)
    warm_start(net, str(tmp_path / "src.safetensors"), "fer-mobile", {}, SEVEN)
    x = torch.rand(2, 1, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), src(x))


def test_a_source_that_cannot_fit_is_refused(tmp_path):
    save_source(tmp_path / "mobile.safetensors")
    net = create_model("fer-resnet-xs", num_classes=7)
    with pytest.raises(CheckpointError, match="fer-mobile with arguments"):
        warm_start(net, str(tmp_path / "mobile.safetensors"), "fer-resnet-xs", {}, SEVEN)
    save_source(tmp_path / "other.safetensors", classes=list("abcdefg"))
    with pytest.raises(CheckpointError, match="share none"):
        warm_start(create_model("fer-mobile", num_classes=7), str(tmp_path / "other.safetensors"), "fer-mobile",
                   {}, SEVEN)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        warm_start(create_model("fer-mobile", num_classes=7), str(tmp_path / "missing"), "fer-mobile", {}, SEVEN)


def test_overlap_warnings_name_other_data_and_another_carving():
    meta = {"data": {"fingerprint": "a"}, "split": SPLIT}
    assert overlap_warnings("warm start x", meta, {"a", "b"}, SPLIT) == []
    assert "other data" in overlap_warnings("warm start x", meta, {"b"}, SPLIT)[0]
    carved = {**SPLIT, "val_carved": True, "split_seed": 1}
    assert "carved its val part differently" in overlap_warnings("warm start x", meta, {"a"}, carved)[0]


def test_init_from_is_checked_before_training(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        fit(tiny_config(epochs=1, init_from=str(tmp_path / "missing")), tmp_path / "run", progress=False,
            log=lambda _: None)


def test_a_ferplus_run_warm_started_from_a_fer2013_run_records_it_and_resumes_without_it(tmp_path):
    csv, _ = write_fer_dirs(tmp_path / "data", sizes=(200, 60, 60))
    base = dict(model="fer-mobile", batch_size=64, data=str(csv), precision="fp32", augment="none")
    fit(TrainConfig(epochs=1, **base), tmp_path / "fer2013", progress=False, log=lambda _: None)
    cfg = TrainConfig(epochs=2, labels="ferplus", label_mode="crossentropy", init_from=str(tmp_path / "fer2013"),
                      **base)
    log: list[str] = []
    assert not fit(cfg, tmp_path / "ferplus", progress=False, stop_after=1, log=log.append)["finished"]
    assert any("Contempt start fresh" in line for line in log)
    assert not any("warning" in line for line in log)  # the FER2013 run saw the same rows and splits
    record = json.loads((tmp_path / "ferplus/config.json").read_text())["init_from"]
    assert record["spec"] == str(tmp_path / "fer2013") and record["new_classes"] == ["Contempt"]
    (tmp_path / "fer2013/best.safetensors").unlink()  # a resume needs only its own state
    assert fit(cfg, tmp_path / "ferplus", resume=True, progress=False, log=lambda _: None)["finished"]
    _, meta = load_checkpoint(tmp_path / "ferplus/best.safetensors")
    assert meta["init_from"]["spec"] == str(tmp_path / "fer2013")
    assert meta["class_names"] == list(FERPLUS_CLASS_NAMES)
