"""Checkpoints: metadata round trip, and corrupt or hostile files give clear errors without unpickling."""

from __future__ import annotations

import json
import os
import pickle
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ferlab.checkpoint import (
    CheckpointError,
    atomic_write,
    load_checkpoint,
    load_state,
    read_meta,
    save_checkpoint,
    save_state,
    state_for_saving,
)
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


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_atomic_writes_get_the_permissions_of_a_plain_write(tmp_path, umask):
    old = os.umask(umask)
    try:
        (tmp_path / "plain.txt").write_text("x")
        atomic_write(tmp_path / "atomic.txt", lambda tmp: Path(tmp).write_text("y"))
        save_checkpoint(tmp_path / "w.safetensors", create_model("fer-resnet-xs"), meta_for("fer-resnet-xs"))
    finally:
        os.umask(old)
    want = stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode)
    assert want == 0o666 & ~umask
    for name in ("atomic.txt", "w.safetensors"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == want, name
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []  # no temporary file left behind


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


def _edited(meta: dict, **changes) -> dict:
    """``meta`` as save_checkpoint writes it, with top-level ``changes`` (a value of None drops the key)."""
    out = {"format": "ferlab-checkpoint", "version": 1, **meta, **changes}
    return {k: v for k, v in out.items() if v is not None}


@pytest.mark.parametrize("case,changes,expected", [
    ("version-str", {"version": "1"}, "version must be an integer"),
    ("model-empty", {"model": {}}, "model.name must be a string"),
    ("model-list", {"model": []}, "model must be an object"),
    ("no-num-classes", {"model": {"name": "fer-resnet-s", "in_chans": 1}}, "model.num_classes"),
    ("in-chans-str", {"model": {"name": "fer-resnet-s", "num_classes": 7, "in_chans": "1"}}, "model.in_chans"),
    ("preprocess-empty", {"preprocess": {}}, "preprocess must be an object holding a normalize"),
    ("class-names-short", {"class_names": list("abcde")}, "5 class_names for a model of 7 classes"),
    ("class-names-ints", {"class_names": list(range(7))}, "class_names must be a list of strings"),
])
def test_malformed_metadata_with_real_weights_names_the_file(tmp_path, case, changes, expected):
    path = tmp_path / f"{case}.safetensors"
    meta = _edited(meta_for("fer-resnet-s"), **changes)
    save_file(state_for_saving(create_model("fer-resnet-s")), str(path), metadata={"ferlab": json.dumps(meta)})
    with pytest.raises(CheckpointError, match=f"{case}.safetensors: malformed ferlab metadata .*{expected}"):
        read_meta(path)
    with pytest.raises(CheckpointError, match=f"{case}.safetensors: malformed ferlab metadata .*{expected}"):
        load_checkpoint(path)


@pytest.mark.parametrize("case,model,expected", [
    ("unknown-name", {"name": "no-such-model", "num_classes": 7, "in_chans": 1}, "unknown model 'no-such-model'"),
    ("bad-args", {"name": "fer-resnet-s", "num_classes": 7, "in_chans": 1, "args": {"bogus": 1}},
     r"model fer-resnet-s takes no option\(s\) bogus"),
])
def test_bad_model_arguments_are_a_checkpoint_error(tmp_path, case, model, expected):
    path = tmp_path / f"{case}.safetensors"
    meta = _edited(meta_for("fer-resnet-s"), model=model)
    save_file(state_for_saving(create_model("fer-resnet-s")), str(path), metadata={"ferlab": json.dumps(meta)})
    read_meta(path)  # the shape is sound; only building the model fails
    with pytest.raises(CheckpointError, match=f"{case}.safetensors: malformed ferlab metadata .*{expected}"):
        load_checkpoint(path)


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
    with pytest.raises(CheckpointError, match="holds objects other than tensors") as err:
        load_state(p)
    # the message says the file is refused, and never repeats torch's advice to load it unsafely
    assert "refused" in str(err.value) and "weights_only" not in str(err.value)
    save_state(tmp_path / "ok.pt", {"epoch": 3, "t": torch.ones(2)})
    assert load_state(tmp_path / "ok.pt")["epoch"] == 3


@pytest.mark.parametrize("kind", ["torch-zip", "raw-pickle"])
def test_a_pickle_given_as_a_checkpoint_is_refused_as_a_pickle(tmp_path, kind):
    p = tmp_path / ("model.pt" if kind == "torch-zip" else "model.pkl")
    if kind == "torch-zip":
        torch.save({"w": torch.zeros(2)}, p)
    else:
        p.write_bytes(pickle.dumps({"w": [0.0, 0.0]}, protocol=4))
    with pytest.raises(CheckpointError, match="pickles are refused") as err:
        load_checkpoint(p)
    assert "header too large" not in str(err.value) and "safetensors" in str(err.value)


def _int8_file(tmp_path, model, meta, edit=None):
    from ferlab.checkpoint import quantize_int8

    state = quantize_int8(state_for_saving(model))
    if edit:
        edit(state)
    path = tmp_path / "q.safetensors"
    save_file(state, str(path), metadata={"ferlab": json.dumps({"format": "ferlab-checkpoint", "version": 1, **meta})})
    return path, state


def test_int8_weights_round_trip_within_half_a_step(tmp_path):
    from ferlab.checkpoint import INT8_SCALE

    torch.manual_seed(0)
    model = create_model("fer-resnet-s").eval()
    with torch.no_grad():
        model.stem[0].weight[3].zero_()  # an all-zero output channel
    path, state = _int8_file(tmp_path, model, meta_for("fer-resnet-s"))
    loaded, _ = load_checkpoint(path)
    ref, got = model.state_dict(), loaded.state_dict()
    quantized = [k for k, v in state.items() if v.dtype == torch.int8]
    assert quantized and all(ref[k].dim() >= 2 for k in quantized), "conv and linear weights are int8"
    assert not any(k.endswith(INT8_SCALE) for k in got), "the scales are not model tensors"
    for k, w in ref.items():
        if k in quantized:
            step = state[k + INT8_SCALE].view((-1,) + (1,) * (w.dim() - 1))  # (out, 1, ...)
            assert (got[k] - w).abs().le(step / 2 + 1e-7).all(), k  # rounded to the nearest step
            assert state[k].abs().amax() == 127, "each channel's largest weight uses the full range"
        else:
            assert torch.equal(got[k], w), k  # biases and BatchNorm untouched here (ship_model casts them)
    assert torch.equal(got["stem.0.weight"][3], torch.zeros_like(got["stem.0.weight"][3])), "zero stays zero"
    x = torch.rand(8, 1, 48, 48)
    assert torch.allclose(model(x), loaded(x), atol=0.05), "int8 weights predict what the float ones do"


@pytest.mark.parametrize("case, edit, expected", [
    ("no scale", lambda s: s.pop("fc.weight.int8_scale"), "int8 tensor 'fc.weight' has no scale"),
    ("orphan scale", lambda s: s.update({"fc.bias.int8_scale": torch.ones(7)}), "has no int8 tensor"),
    ("short scale", lambda s: s.update({"fc.weight.int8_scale": torch.ones(3)}), r"floating scale of shape \(7,\)"),
    ("int scale", lambda s: s.update({"fc.weight.int8_scale": torch.ones(7, dtype=torch.int8)}), "floating scale"),
    ("nan scale", lambda s: s["fc.weight.int8_scale"].fill_(float("nan")), "is not finite"),
])
def test_broken_int8_files_name_the_tensor(tmp_path, case, edit, expected):
    model = create_model("fer-resnet-s").eval()
    path, _ = _int8_file(tmp_path, model, meta_for("fer-resnet-s"), edit)
    with pytest.raises(CheckpointError, match=expected) as err:
        load_checkpoint(path)
    assert str(path) in str(err.value), case


def test_a_checkpoint_that_cannot_be_read_says_so(tmp_path, monkeypatch):
    import builtins

    path = tmp_path / "m.safetensors"
    save_checkpoint(path, create_model("fer-resnet-s"), meta_for("fer-resnet-s"))
    real_open = builtins.open

    def no_permission(file, *a, **k):
        if str(file) == str(path):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *a, **k)

    monkeypatch.setattr(builtins, "open", no_permission)
    with pytest.raises(CheckpointError, match="m.safetensors: cannot read \\(Permission denied\\)"):
        read_meta(path)
