"""The inference layer: one loader, one TTA + ensemble path, the same probabilities through every entry point.

A shipped ensemble of two small nets (FERLAB_WEIGHTS_DIR) with affine TTA must give the same probabilities through
``Recognizer``, ``ferlab predict``, ``ferlab serve``, the ONNX export and ``ferlab evaluate``.
"""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import confusion_matrix

from ferlab.checkpoint import load_checkpoint, save_checkpoint
from ferlab.data.source import data_for, split_rows
from ferlab.inference.loader import Ensemble, LoadedModel, load_model

ENSEMBLE = "tiny-ensemble"


@pytest.fixture
def shelf(weights, trained_tiny_run):
    """A shelf of two different nets (member a: the trained run; b: its weights perturbed) and their ensemble."""
    shutil.copy(trained_tiny_run / "best.safetensors", weights / "a.safetensors")
    model, meta = load_checkpoint(trained_tiny_run)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p) * p.std().nan_to_num())
    save_checkpoint(weights / "b.safetensors", model, meta)
    sizes = {n: (weights / f"{n}.safetensors").stat().st_size for n in "ab"}
    (weights / "manifest.json").write_text(json.dumps({
        "tiny-a": {"file": "a.safetensors", "model": "fer-resnet-s", "roles": ["default"], "size_bytes": sizes["a"]},
        "tiny-b": {"file": "b.safetensors", "model": "fer-resnet-s", "size_bytes": sizes["b"]},
        ENSEMBLE: {"kind": "ensemble", "members": ["tiny-a", "tiny-b"], "roles": ["most-accurate"]},
    }))
    return weights


@pytest.fixture
def faces(trained_tiny_run):
    """(test faces (N, 1, 48, 48) uint8, labels (N,)) of the runs' own synthetic split."""
    meta = load_checkpoint(trained_tiny_run)[1]
    data = data_for(meta, None, progress=False)
    idx = split_rows(data, meta, "test")
    return data.images[idx][:, None], data.labels[idx]


def test_the_loader_takes_every_kind_of_spec(shelf, trained_tiny_run):
    ens = load_model(ENSEMBLE)
    assert isinstance(ens, Ensemble) and [m.source for m in ens.members] == ["tiny-a", "tiny-b"]
    for spec in (trained_tiny_run, trained_tiny_run / "best.safetensors", "tiny-a"):
        m = load_model(spec)
        assert isinstance(m, LoadedModel) and m.input_size == (48, 48) and len(m.class_names) == 7
        assert m.normalizer.mode == m.meta["preprocess"]["normalize"]["mode"] and not m.module.training
    with pytest.raises(ValueError, match="an exported .onnx graph only predicts .* name the checkpoint or shipped"):
        load_model("model.onnx")


@pytest.mark.slow
def test_recognizer_evaluate_and_the_loader_agree_on_an_ensemble_with_affine_tta(shelf, faces):
    from ferlab import Recognizer
    from ferlab.evaluate import evaluate_checkpoints

    x, y = faces
    rec = Recognizer(ENSEMBLE, tta="affine")
    assert (rec.tta, rec.model_name, rec.weights) == ("affine", "ensemble of 2", ENSEMBLE)
    got = rec.classify(x)  # (N, 7)
    want = load_model(ENSEMBLE).probabilities(torch.from_numpy(x), tta="affine", precision="fp32")
    assert np.abs(got - want).max() < 1e-5
    members = [load_model(n).probabilities(torch.from_numpy(x), tta="affine", precision="fp32")
               for n in ("tiny-a", "tiny-b")]
    assert np.abs(got - (members[0] + members[1]) / 2).max() < 1e-5  # the mean of the members' probabilities
    assert (members[0].argmax(1) != members[1].argmax(1)).any()  # the members differ: the mean is not one of them
    assert np.abs(Recognizer(ENSEMBLE).classify(x) - got).max() > 1e-3  # the views change the answer
    report = evaluate_checkpoints([ENSEMBLE], split="test", tta="affine", progress=False, precision="fp32")
    assert report["ensemble"] and [m["checkpoint"] for m in report["members"]] == ["tiny-a", "tiny-b"]
    assert report["confusion"] == confusion_matrix(y, got.argmax(1), labels=range(7)).tolist()
    assert report["accuracy"] == float((got.argmax(1) == y).mean())


def test_predict_cli_gives_the_ensembles_probabilities(shelf, faces, tmp_path, capsys):
    import cv2

    from ferlab import Recognizer
    from ferlab.cli import main

    x, _ = faces
    paths = []
    for i in range(6):
        paths.append(tmp_path / f"face{i}.png")
        cv2.imwrite(str(paths[-1]), x[i, 0])
    out = tmp_path / "faces.json"
    argv = ["predict", *map(str, paths), "--crops", "--model", ENSEMBLE, "--tta", "affine", "--json", "--out",
            str(out), "--no-progress"]
    assert main(argv) == 0
    summary = capsys.readouterr().err
    assert "model ensemble of 2, weights tiny-ensemble, TTA affine (36 forward passes a face)" in summary
    rows = json.loads(out.read_text())
    got = np.array([[r["probabilities"][c] for c in rows[0]["probabilities"]] for r in rows])  # (6, 7)
    want = Recognizer(ENSEMBLE, tta="affine").classify(x[:6])
    assert np.abs(got - want).max() < 1e-5


def test_serve_gives_the_ensembles_probabilities(shelf, faces):
    import cv2
    from test_serve import LiveServer

    from ferlab import Recognizer
    from ferlab.serve.app import create_app

    x, _ = faces
    rec = Recognizer(ENSEMBLE, tta="affine", detector="none", margin=0.0)
    with LiveServer(create_app(rec, explain_method=None)) as srv:
        status, info_raw = srv.request("GET", "/api/info")[0], srv.request("GET", "/api/info")[2]
        assert status == 200 and json.loads(info_raw)["tta"] == "affine"
        for i in range(3):
            status, answer = srv.post_file(cv2.imencode(".png", x[i, 0])[1].tobytes())
            assert status == 200 and answer["model"] == "ensemble of 2" and answer["tta"] == "affine"
            got = np.array(list(answer["faces"][0]["probabilities"].values()))
            assert np.abs(got - rec.classify(x[i : i + 1])[0]).max() < 1e-5


@pytest.mark.slow
def test_an_ensemble_exports_as_one_onnx_graph_equal_to_pytorch(shelf, faces, tmp_path):
    from ferlab import Recognizer
    from ferlab.cli import main
    from ferlab.inference.backends import OnnxBackend

    x, _ = faces
    out = tmp_path / "ens.onnx"
    assert main(["export", "--onnx", ENSEMBLE, "--tta", "affine", "--out", str(out)]) == 0
    backend = OnnxBackend(out)
    assert (backend.tta, backend.n_members) == ("affine", 2)
    want = Recognizer(ENSEMBLE, tta="affine").classify(x)
    got = Recognizer(str(out)).classify(x)  # the file's own TTA mode
    assert np.abs(got - want).max() < 1e-4
    in_memory = Recognizer(ENSEMBLE, backend="onnx", tta="affine").classify(x)
    assert np.abs(in_memory - want).max() < 1e-4
    with pytest.raises(ValueError, match="exported with test-time augmentation 'affine', not 'none'"):
        Recognizer(str(out), tta="none")


def test_models_pretrained_json_lists_kinds_members_and_roles(shelf, capsys):
    from ferlab.cli import main

    assert main(["models", "--pretrained", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows[ENSEMBLE]["kind"] == "ensemble" and rows[ENSEMBLE]["members"] == ["tiny-a", "tiny-b"]
    assert rows[ENSEMBLE]["roles"] == ["most-accurate"] and rows["tiny-a"]["kind"] == "single"
    assert rows[ENSEMBLE]["size_bytes"] == rows["tiny-a"]["size_bytes"] + rows["tiny-b"]["size_bytes"]
    assert rows["tiny-a"]["speed"] == "standard" and rows["tiny-a"]["mflops"] == pytest.approx(284.4, abs=0.1)
    assert rows[ENSEMBLE]["speed"] == "heavy"
    assert rows[ENSEMBLE]["mflops"] == pytest.approx(2 * rows["tiny-a"]["mflops"], abs=0.2)
    assert main(["models", "--pretrained"]) == 0
    assert "most-accurate" in capsys.readouterr().out


def test_an_old_name_still_loads_with_a_warning_naming_the_new_one(weights, trained_tiny_run):
    shutil.copy(trained_tiny_run / "best.safetensors", weights / "s.safetensors")
    (weights / "manifest.json").write_text(json.dumps({"fer2013-resnet-s": {"file": "s.safetensors"}}))
    with pytest.warns(FutureWarning, match="now called 'fer2013-resnet-s'"):
        m = load_model("fer-resnet-s-90ep-mixup-fer2013")
    assert m.source == "fer2013-resnet-s"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_model("fer2013-resnet-s")


def test_combine_weighs_members_and_refuses_bad_weights():
    from ferlab.inference.predict import combine

    a, b = np.array([[1.0, 0.0]], np.float32), np.array([[0.0, 1.0]], np.float32)
    assert combine([a, b]).tolist() == [[0.5, 0.5]]
    assert combine([a, b], [3, 1]).tolist() == [[0.75, 0.25]]  # 3 picks of a, 1 of b
    assert combine([a, b], [0.3, 0.1]).tolist() == combine([a, a, a, b]).tolist()  # any scale; repeats = weights
    for bad in ([1], [1, 0], [1, -2], [1, float("nan")]):
        with pytest.raises(ValueError, match="an ensemble of 2 needs 2 positive, finite member weights"):
            combine([a, b], bad)


@pytest.fixture
def weighted_shelf(shelf):
    """The shelf's ensemble with member weights 3 (tiny-a) and 1 (tiny-b)."""
    manifest = json.loads((shelf / "manifest.json").read_text())
    manifest[ENSEMBLE]["weights"] = [3, 1]
    (shelf / "manifest.json").write_text(json.dumps(manifest))
    return shelf


@pytest.mark.slow
def test_a_weighted_ensemble_weighs_its_members_everywhere(weighted_shelf, faces, tmp_path):
    from ferlab import Recognizer
    from ferlab.cli import main
    from ferlab.evaluate import evaluate_checkpoints
    from ferlab.inference.loader import load_members
    from ferlab.train.distill import Teacher

    x, y = faces
    pa, pb = (load_model(n).probabilities(torch.from_numpy(x), precision="fp32", calibrated=False)
              for n in ("tiny-a", "tiny-b"))
    want = 0.75 * pa + 0.25 * pb  # (N, 7)
    assert np.abs(want - (pa + pb) / 2).max() > 1e-3  # the weights change the answer
    ens = load_model(ENSEMBLE)
    assert ens.weights == [3.0, 1.0]
    assert np.abs(Recognizer(ENSEMBLE).classify(x) - want).max() < 1e-5
    # naming a model three times is the same ensemble, with that model loaded once
    named = load_members(["tiny-a", "tiny-b", "tiny-a", "tiny-a"])
    assert [m.source for m in named.members] == ["tiny-a", "tiny-b"] and named.weights == [3.0, 1.0]
    assert np.abs(named.probabilities(torch.from_numpy(x), precision="fp32") - want).max() < 1e-5
    both = load_members([ENSEMBLE, "tiny-a"])  # the ensemble's weights (3/4, 1/4) x 2 members, plus tiny-a once
    assert both.weights == [2.5, 0.5]
    assert load_members(["tiny-a", "tiny-b"]).weights is None  # equal weights: the plain mean
    report = evaluate_checkpoints([ENSEMBLE], split="test", progress=False, precision="fp32")
    assert [m["weight"] for m in report["members"]] == [0.75, 0.25]
    assert report["accuracy"] == float((want.argmax(1) == y).mean())
    teacher = Teacher([ENSEMBLE], temperature=1.0, precision="fp32", channels_last=False)
    soft = teacher(torch.from_numpy(x).float() / 255.0).numpy()
    assert np.abs(soft - want).max() < 1e-5
    out = tmp_path / "weighted.onnx"
    assert main(["export", "--onnx", ENSEMBLE, "--out", str(out)]) == 0
    assert np.abs(Recognizer(str(out)).classify(x) - want).max() < 1e-4


def test_a_shipped_file_named_by_its_path_or_copied_keeps_its_calibration(monkeypatch, tmp_path, trained_tiny_run):
    from ferlab import pretrained
    from ferlab.inference.loader import load_model

    monkeypatch.delenv("FERLAB_WEIGHTS_DIR", raising=False)
    name = "fer2013-fast"
    path = pretrained.pretrained_path(name)
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(path.read_bytes())
    expected = load_model(name).calibration
    assert expected and all(load_model(str(p)).calibration == expected for p in (path, copy))
    assert load_model(str(trained_tiny_run)).calibration == {}  # not on the shelf: none
