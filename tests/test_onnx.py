"""ONNX export and the ONNX Runtime backend: same outputs as PyTorch fp32 (within 1e-4), self-contained files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ferlab.checkpoint import load_checkpoint, save_checkpoint
from ferlab.cli import main
from ferlab.inference.backends import OnnxBackend, TorchBackend
from ferlab.inference.export import untrained_meta
from ferlab.models import create_model
from ferlab.transforms import Normalizer

TOL = 1e-4


def make_checkpoint(path: Path, name: str, normalize: str = "dataset", seed: int = 0, **model_args) -> Path:
    """A checkpoint of an untrained ``name`` made to behave like a trained one: BatchNorm statistics and affine
    parameters drawn at random (so folding them matters) and the head scaled so that logits spread like a trained
    model's (std about 4 on faces; so that a 1e-4 tolerance means something)."""
    torch.manual_seed(seed)
    model = create_model(name, **model_args).eval()
    meta = untrained_meta(name, model, model_args)
    meta["preprocess"]["normalize"] = Normalizer(normalize, 0.51, 0.25).state()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
        x = torch.randint(0, 256, (16, 1, 48, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
        logits = model(Normalizer(**meta["preprocess"]["normalize"])(x.float() / 255))  # (16, 7)
        head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
        scale = 4.0 / logits.std().clamp_min(1e-6)
        head.weight.mul_(scale)
        head.bias.mul_(scale)
    save_checkpoint(path, model, meta)
    return path


@pytest.fixture(scope="module")
def faces() -> np.ndarray:
    from ferlab.data.source import open_data

    data = open_data(None, synthetic={"n_train": 40, "n_val": 8, "n_test": 8, "seed": 3})
    return data.images[:37, None]  # (37, 1, 48, 48) uint8 synthetic faces, an odd batch


@pytest.mark.parametrize("name,normalize,model_args", [
    ("fer-resnet-s", "dataset", {}), ("fer-resnet-s", "image", {}), ("r002-vgg", "dataset", {}),
    ("mlp-matched", "none", {}), ("fer-resnet-xs", "dataset", {"input_scale": 2.0})])
def test_onnx_runtime_equals_pytorch(name, normalize, model_args, faces, tmp_path, capsys):
    ckpt = make_checkpoint(tmp_path / f"{name}.safetensors", name, normalize, **model_args)
    out = tmp_path / "model.onnx"
    assert main(["export", "--onnx", str(ckpt), "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    onnx_be, torch_be = OnnxBackend(out, threads=1), TorchBackend.from_module(*load_checkpoint(ckpt))
    noise = np.random.default_rng(0).integers(0, 256, (64, 1, 48, 48), dtype=np.uint8)
    for x in (noise, faces, faces[:1]):
        want = torch_be.logits(x)  # (B, 7)
        assert 1 < want.std() < 20, "logits should spread like a trained model's"
        got_logits, got_probs = onnx_be.session.run(["logits", "probabilities"], {"pixels": x})
        assert got_logits.shape == want.shape
        assert np.abs(got_logits - want).max() < TOL
        assert np.abs(got_probs - torch.from_numpy(want).softmax(1).numpy()).max() < TOL


@pytest.mark.parametrize("tta", ["none", "affine"])
def test_an_empty_batch_gives_no_rows(tmp_path, faces, tta):
    ckpt = make_checkpoint(tmp_path / "e.safetensors", "fer-resnet-xs")
    out = tmp_path / "e.onnx"
    assert main(["export", "--onnx", str(ckpt), "--tta", tta, "--out", str(out)]) == 0
    onnx_be = OnnxBackend(out, threads=1)
    logits, probs = onnx_be.session.run(["logits", "probabilities"], {"pixels": faces[:0]})
    assert logits.shape == probs.shape == (0, 7)  # not (7, 7): a frame without faces
    want = TorchBackend.from_module(*load_checkpoint(ckpt), tta=tta).logits(faces)
    assert np.abs(onnx_be.session.run(["logits"], {"pixels": faces})[0] - want).max() < TOL


def test_onnx_file_is_self_contained(tmp_path):
    import onnx

    ckpt = make_checkpoint(tmp_path / "ckpt.safetensors", "fer-resnet-s")
    out = tmp_path / "m.onnx"
    assert main(["export", "--onnx", str(ckpt), "--out", str(out)]) == 0
    proto = onnx.load(str(out))
    props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(props["class_names"]) == ["Angry", "Disgust", "Fear", "Happy", "Sad", "Surprise", "Neutral"]
    meta = json.loads(props["ferlab"])
    assert meta["model"]["name"] == "fer-resnet-s" and meta["preprocess"]["normalize"]["mode"] == "dataset"
    inp = proto.graph.input[0]
    assert inp.name == "pixels" and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert inp.type.tensor_type.shape.dim[0].dim_param == "batch"  # dynamic batch axis
    # the backend needs only the file: the checkpoint may be gone
    ckpt.unlink()
    be = OnnxBackend(out)
    assert be.meta["model"]["name"] == "fer-resnet-s" and be.input_size == (48, 48)


def test_recognizer_picks_and_builds_the_onnx_backend(tmp_path, faces):
    from ferlab import Recognizer

    ckpt = make_checkpoint(tmp_path / "r.safetensors", "r002-vgg")
    out = tmp_path / "r.onnx"
    assert main(["export", "--onnx", str(ckpt), "--out", str(out)]) == 0
    from_file = Recognizer(out, threads=1)  # .onnx: the onnx backend, chosen automatically
    in_memory = Recognizer(ckpt, backend="onnx", threads=1)  # exported on the fly, nothing written
    plain = Recognizer(ckpt)
    assert (from_file.backend.name, in_memory.backend.name, plain.backend.name) == ("onnx", "onnx", "torch")
    want = plain.classify(faces)
    assert np.abs(from_file.classify(faces) - want).max() < TOL
    assert np.abs(in_memory.classify(faces) - want).max() < TOL


def test_bad_onnx_inputs_are_clear_errors(tmp_path):
    import onnx

    from ferlab import Recognizer

    fake = tmp_path / "fake.onnx"
    fake.write_text("not a model")
    with pytest.raises(ValueError, match="fake.onnx: not a loadable ONNX model"):
        OnnxBackend(fake)
    ckpt = make_checkpoint(tmp_path / "c.safetensors", "mlp-matched")
    out = tmp_path / "c.onnx"
    assert main(["export", "--onnx", str(ckpt), "--out", str(out)]) == 0
    proto = onnx.load(str(out))
    del proto.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(proto, str(bare))
    with pytest.raises(ValueError, match="without ferlab metadata"):
        OnnxBackend(bare)
    with pytest.raises(ValueError, match="onnx backend"):
        Recognizer(out, backend="torch")
    with pytest.raises(ValueError, match="torch backend only"):
        Recognizer(out, precision="bf16")
    with pytest.raises(FileNotFoundError):
        OnnxBackend(tmp_path / "missing.onnx")


def test_empty_or_garbage_onnx_files_name_the_file(tmp_path):
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(bytes(range(256)) * 4)
    for path in (empty, garbage):
        with pytest.raises(ValueError, match=f"{path.name}: not a loadable ONNX model"):
            OnnxBackend(path)
    with pytest.raises(ValueError, match="<onnx bytes>: not a loadable ONNX model"):
        OnnxBackend(b"")


@pytest.mark.parametrize("key,value", [("ferlab", "{not json"), ("class_names", "[1, 2"),
                                       ("ferlab", "[1]"), ("class_names", "[1, 2]"),
                                       ("class_names", '["a", "b"]'),  # two names for seven outputs
                                       ("ferlab", '{"inference": "x", "model": {"name": "m"}}'),
                                       ("ferlab", '{"inference": {"tta": "none", "members": []}}')])
def test_damaged_ferlab_metadata_in_onnx_names_the_file(tmp_path, key, value):
    import onnx

    ckpt = make_checkpoint(tmp_path / "c.safetensors", "mlp-matched")
    out = tmp_path / "c.onnx"
    assert main(["export", "--onnx", str(ckpt), "--out", str(out)]) == 0
    proto = onnx.load(str(out))
    (prop,) = [p for p in proto.metadata_props if p.key == key]
    prop.value = value
    damaged = tmp_path / "damaged.onnx"
    onnx.save(proto, str(damaged))
    with pytest.raises(ValueError, match="damaged.onnx: damaged ferlab metadata in ONNX model"):
        OnnxBackend(damaged)


def test_export_cli_names_and_errors(tmp_path, monkeypatch, capsys):
    from ferlab.recognize.cli import default_onnx_name

    run = tmp_path / "my-run"
    run.mkdir()
    make_checkpoint(run / "best.safetensors", "mlp-matched")
    assert default_onnx_name(str(run)) == Path("my-run.onnx")
    assert default_onnx_name(str(run / "best.safetensors")) == Path("my-run.onnx")
    monkeypatch.chdir(tmp_path)
    assert main(["export", "--onnx", str(run)]) == 0
    assert (tmp_path / "my-run.onnx").is_file()
    assert main(["export", "--onnx", str(tmp_path / "nowhere")]) == 2
    assert "no such checkpoint" in capsys.readouterr().err
    assert main(["export", "--onnx", str(run), "--out", "x.pt"]) == 2
    (tmp_path / "adir.onnx").mkdir()
    (tmp_path / "afile").write_text("x")
    for out, message in (("adir.onnx", "adir.onnx is a directory"), ("afile/x.onnx", "afile is a file, not a folder")):
        capsys.readouterr()
        assert main(["export", "--onnx", str(run), "--out", out]) == 2
        assert message in capsys.readouterr().err
    for opset, tta in (("9", "none"), ("99", "none"), ("15", "affine")):
        assert main(["export", "--onnx", str(run), "--opset", opset, "--tta", tta]) == 2
        assert f"ONNX opset {opset} is not supported" in capsys.readouterr().err


def test_both_backends_refuse_faces_of_another_size(tmp_path, faces):
    ckpt = make_checkpoint(tmp_path / "c.safetensors", "fer-mobile")
    out = tmp_path / "c.onnx"
    assert main(["export", "--onnx", str(ckpt), "--out", str(out)]) == 0
    for backend in (TorchBackend.from_spec(str(ckpt)), OnnxBackend(out)):
        assert backend.probabilities(faces[:3]).shape == (3, 7)
        for wrong in (np.zeros((2, 1, 64, 64), np.uint8), faces[:2, 0]):
            with pytest.raises(ValueError, match=r"takes gray faces \(batch, 1, 48, 48\)"):
                backend.probabilities(wrong)


@pytest.mark.parametrize("opset", [13, 17])
def test_export_opset_is_the_one_asked_for(tmp_path, capsys, opset):
    import onnx

    ckpt = tmp_path / "best.safetensors"
    make_checkpoint(ckpt, "fer-mobile")
    out = tmp_path / f"m{opset}.onnx"
    assert main(["export", "--onnx", str(ckpt), "--out", str(out), "--opset", str(opset)]) == 0
    assert f"opset {opset}" in capsys.readouterr().out
    domains = {o.domain: o.version for o in onnx.load(str(out)).opset_import}
    assert domains[""] == opset  # the default (ai.onnx) domain
