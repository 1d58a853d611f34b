"""Checkpoints: metadata round trip, and corrupt or hostile files give clear errors without unpickling."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from ferlab.checkpoint import CheckpointError, load_checkpoint, load_state, read_meta, save_checkpoint, save_state
from ferlab.models import create_model


def meta_for(name: str) -> dict:
    return {"model": {"name": name, "args": {}, "num_classes": 7, "in_chans": 1},
            "preprocess": {"normalize": {"mode": "unit", "mean": 0.0, "std": 1.0}}, "class_names": list("abcdefg")}


def test_round_trip(tmp_path):
    model = create_model("fer-resnet-s").eval()
    save_checkpoint(tmp_path / "m.safetensors", model, meta_for("fer-resnet-s"))
    loaded, meta = load_checkpoint(tmp_path / "m.safetensors")
    x = torch.rand(2, 1, 48, 48)
    assert torch.equal(model(x), loaded(x))
    assert meta["class_names"] == list("abcdefg") and read_meta(tmp_path / "m.safetensors") == meta


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="no best.safetensors"):
        load_checkpoint(tmp_path)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        load_checkpoint(bad)


def test_damaged_or_incomplete_metadata_names_the_file(tmp_path):
    tensors = {"w": torch.zeros(1)}
    cases = {"garbled": "{not json", "a-list": "[1, 2]", "old-format": json.dumps({"format": "other"}),
             "incomplete": json.dumps({"format": "ferlab-checkpoint", "version": 1, "model": {}})}
    expected = {"garbled": "damaged ferlab metadata", "a-list": "unsupported checkpoint format list",
                "old-format": "unsupported checkpoint format other", "incomplete": "no preprocess, class_names"}
    for name, raw in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(path), metadata={"ferlab": raw})
        with pytest.raises(CheckpointError, match=f"{name}.safetensors: .*{expected[name]}"):
            read_meta(path)


def test_weights_of_another_model_are_refused(tmp_path):
    save_checkpoint(tmp_path / "m.safetensors", create_model("fer-resnet-s"), meta_for("fer-mobile"))
    with pytest.raises(CheckpointError, match="do not fit"):
        load_checkpoint(tmp_path / "m.safetensors")


class Boom:
    def __reduce__(self):
        return (exec, ("raise SystemExit('pickle executed')",))


def test_hostile_training_state_is_not_unpickled(tmp_path):
    p = tmp_path / "last.pt"
    with open(p, "wb") as f:
        pickle.dump({"epoch": Boom()}, f)
    with pytest.raises(CheckpointError, match="cannot load training state safely"):
        load_state(p)
    save_state(tmp_path / "ok.pt", {"epoch": 3, "t": torch.ones(2)})
    assert load_state(tmp_path / "ok.pt")["epoch"] == 3
