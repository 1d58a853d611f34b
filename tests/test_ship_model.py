"""Shipping a run: bench/ship_model.py, `ferlab models --pretrained` and `ferlab evaluate --pretrained`.

Everything ships into a temporary weights folder (FERLAB_WEIGHTS_DIR), never into the package.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ferlab.cli import main
from ferlab.evaluate import evaluate_checkpoints

REPO = Path(__file__).resolve().parents[1]


def _ship_module():
    spec = importlib.util.spec_from_file_location("ship_model", REPO / "bench/ship_model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _ship(run: Path, name: str, docs: Path, *extra: str) -> None:
    assert _ship_module().main([str(run), "--name", name, "--docs-dir", str(docs), "--hardware", "test CPU",
                                *extra]) == 0


def _cli_json(capsys, argv: list[str]):
    capsys.readouterr()
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_ship_then_list_and_evaluate_by_name(trained_tiny_run, weights, tmp_path, capsys):
    docs = tmp_path / "docs"
    _ship(trained_tiny_run, "tiny-fp32", docs, "--config", "configs/fer-resnet-s.toml", "--default")
    shipped = weights / "tiny-fp32.safetensors"
    # fp32: the shipped weights are the run's best weights, bit for bit
    best, ours = load_file(trained_tiny_run / "best.safetensors"), load_file(shipped)
    assert best.keys() == ours.keys() and all(torch.equal(best[k], ours[k]) for k in best)

    listed = _cli_json(capsys, ["models", "--pretrained", "--json"])
    assert [e["name"] for e in listed] == ["tiny-fp32"]
    entry = listed[0]
    assert entry["roles"] == ["default"] and entry["model"] == "fer-resnet-s" and entry["dtype"] == "float32"
    assert entry["size_bytes"] == shipped.stat().st_size
    assert entry["sha256"] == hashlib.sha256(shipped.read_bytes()).hexdigest()
    assert entry["hardware"] == "test CPU" and entry["config"] == "configs/fer-resnet-s.toml"

    # the stated numbers are what `ferlab evaluate --pretrained` prints (and, fp32, what the run scores)
    for split, tta, key in (("test", False, "plain"), ("val", True, "tta")):
        argv = ["evaluate", "--pretrained", "tiny-fp32", "--split", split, "--json"] + (["--tta"] if tta else [])
        report = _cli_json(capsys, argv)
        assert report["accuracy"] == entry["accuracy"][split][key]
        assert report["n"] == entry["n"][split]
    run_report = evaluate_checkpoints([trained_tiny_run], split="test", progress=False)
    assert run_report["accuracy"] == entry["accuracy"]["test"]["plain"]
    assert 0.5 < entry["accuracy"]["test"]["plain"] <= 1.0, "the tiny run learned; the numbers are not chance"

    # positional shipped name and --pretrained are the same thing; together they form an ensemble
    by_position = _cli_json(capsys, ["evaluate", "tiny-fp32", "--split", "test", "--json", "--out",
                                     str(tmp_path / "e")])
    assert by_position["accuracy"] == entry["accuracy"]["test"]["plain"]
    both = _cli_json(capsys, ["evaluate", str(trained_tiny_run), "--pretrained", "tiny-fp32", "--split", "test",
                              "--json", "--out", str(tmp_path / "e2")])
    assert both["ensemble"] and [m["accuracy"] for m in both["members"]] == [entry["accuracy"]["test"]["plain"]] * 2

    card = (docs / "tiny-fp32.md").read_text()
    assert f"{entry['accuracy']['test']['plain']:.2%}" in card and f"{entry['accuracy']['val']['tta']:.2%}" in card
    for needle in ("Per-class results", "Confusion matrix", "Known limits", "label", "demographic",
                   "test CPU", "configs/fer-resnet-s.toml", "tiny-fp32-confusion.png", "| Disgust |"):
        assert needle in card, needle
    assert (docs / "tiny-fp32-confusion.png").stat().st_size > 1000

    capsys.readouterr()
    assert main(["models", "--pretrained"]) == 0
    table = capsys.readouterr().out
    row = next(line for line in table.splitlines() if line.startswith("tiny-fp32 "))
    assert " default " in row and f"{entry['accuracy']['test']['tta']:.2%}" in row


@pytest.mark.parametrize("dtype, stored, fraction", [("bf16", "bfloat16", 0.6), ("int8", "int8+float16", 0.3)])
def test_a_smaller_file_and_its_numbers_are_its_own(dtype, stored, fraction, trained_tiny_run, weights, tmp_path,
                                                    capsys):
    from ferlab.checkpoint import INT8_SCALE

    _ship(trained_tiny_run, f"tiny-{dtype}", tmp_path / "docs", "--dtype", dtype)
    (entry,) = _cli_json(capsys, ["models", "--pretrained", "--json"])
    assert entry["name"] == f"tiny-{dtype}" and entry["dtype"] == stored
    assert entry["size_bytes"] < fraction * (trained_tiny_run / "best.safetensors").stat().st_size
    state = {k: v for k, v in load_file(weights / f"tiny-{dtype}.safetensors").items() if not k.endswith(INT8_SCALE)}
    floats = {v.dtype for v in state.values() if v.is_floating_point()}
    if dtype == "bf16":
        assert floats == {torch.bfloat16}
    else:  # conv and linear weights int8, biases and BatchNorm fp16
        assert {v.dtype for v in state.values() if v.dim() >= 2} == {torch.int8} and floats == {torch.float16}
    report = _cli_json(capsys, ["evaluate", "--pretrained", f"tiny-{dtype}", "--split", "test", "--json", "--tta"])
    assert report["accuracy"] == entry["accuracy"]["test"]["tta"]
    run_report = evaluate_checkpoints([trained_tiny_run], split="test", tta=True, progress=False)
    assert abs(report["accuracy"] - run_report["accuracy"]) < 0.05, "it scores about what the run does"


def test_weight_storage_bench_reports_what_evaluate_measures(trained_tiny_run, weights, tmp_path, capsys,
                                                              monkeypatch):
    import importlib.util

    _ship(trained_tiny_run, "tiny-fp16", tmp_path / "docs", "--dtype", "fp16")
    (fp16,) = _cli_json(capsys, ["models", "--pretrained", "--json"])
    # the int8 file the bench writes: the shipped fp16 file stored again as int8
    int8, _, _ = _ship_module().write_shipped("tiny-fp16", "again", tmp_path, "int8")
    monkeypatch.syspath_prepend(str(REPO / "bench"))  # as when run from bench/
    spec = importlib.util.spec_from_file_location("weight_storage", REPO / "bench/weight_storage.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    capsys.readouterr()
    assert bench.main(["--names", "tiny-fp16"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| `tiny-fp16`"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:3] == [f"{fp16['size_bytes'] / 1e6:.2f}", f"{int8.stat().st_size / 1e6:.2f}"]
    for split, (ours, theirs) in zip(("val", "test"), (cells[3:5], cells[5:7]), strict=True):
        report = evaluate_checkpoints([int8], split=split, progress=False)
        assert [ours, theirs] == [f"{fp16['accuracy'][split]['plain']:.2%}", f"{report['accuracy']:.2%}"], split
    changed, n = cells[7].split(" of ")
    assert int(n) == fp16["n"]["val"] + fp16["n"]["test"] and 0 <= int(changed) < int(n)
    assert cells[8] == "(fp32 here)", "the tiny run computes in fp32: no bf16 column to compare"

    # --write: the shelf now holds the int8 file, and the entry says so; the rest of the entry stays
    assert bench.main(["--names", "tiny-fp16", "--write"]) == 0
    (stored,) = _cli_json(capsys, ["models", "--pretrained", "--json"])
    shipped = weights / "tiny-fp16.safetensors"
    now, want = load_file(shipped), load_file(int8)  # the same tensors (the files' metadata names differ)
    assert now.keys() == want.keys() and all(torch.equal(now[k], want[k]) for k in now)
    assert shipped.stat().st_mode & 0o777 == 0o644 and stored["dtype"] == "int8+float16"
    assert stored["size_bytes"] == shipped.stat().st_size < 0.6 * fp16["size_bytes"]
    assert stored["sha256"] == hashlib.sha256(shipped.read_bytes()).hexdigest()
    assert {k: v for k, v in stored.items() if k not in ("dtype", "size_bytes", "sha256")} == \
        {k: v for k, v in fp16.items() if k not in ("dtype", "size_bytes", "sha256")}
    capsys.readouterr()
    assert bench.main(["--names", "tiny-fp16"]) == 0  # int8 already: nothing to compare it with
    assert "shipped as int8 already" in capsys.readouterr().err


def test_unknown_pretrained_name_is_a_clear_error(weights, capsys):
    assert main(["evaluate", "--pretrained", "nope", "--split", "test"]) == 2
    assert "'nope' is neither a file, a run directory nor a shipped model (shipped: none in this build)" in \
        capsys.readouterr().err
    assert main(["evaluate", "--split", "test"]) == 2
    assert "name the checkpoints" in capsys.readouterr().err
    assert main(["models", "--pretrained"]) == 0
    assert "no pretrained models are shipped" in capsys.readouterr().out


@pytest.mark.parametrize("offline", ["", "flip"])
def test_card_of_a_distilled_student_names_its_teacher_and_regularisers(trained_tiny_run, weights, tmp_path, offline):
    from conftest import LEARN_SYNTHETIC

    from ferlab.train.config import TrainConfig
    from ferlab.train.fit import fit

    student = tmp_path / "student"
    fit(TrainConfig(model="fer-mobile-fast", epochs=1, batch_size=64, synthetic=LEARN_SYNTHETIC, augment="flip",
                    precision="fp32", teachers=[str(trained_tiny_run)], distill_weight=0.7, distill_temperature=2.0,
                    mixup=0.3, distill_offline=offline),
        student, progress=False)
    docs = tmp_path / "docs"
    _ship(student, "tiny-student", docs)
    card = (docs / "tiny-student.md").read_text()
    # the teacher by its run's name: a shipped card names no folder of the machine that made it
    assert f"distilled from `{trained_tiny_run.name}` (weight 0.7, temperature 2.0" in card
    assert "the teachers were trained on the same data" in card
    assert ("offline: soft targets predicted once" in card) == bool(offline)
    assert not offline or "averaged over the flip test-time views)" in card
    recipe = next(line for line in card.splitlines() if line.startswith("- optimizer "))
    assert recipe.endswith(", seed 0, mixup 0.3")  # the regularisers that are on, and only those


def test_shipped_file_names_its_data_files_without_local_paths(trained_tiny_run, weights, tmp_path):
    """A run trained on /some/where/fer2013.csv.gz ships naming fer2013.csv.gz only, in its data and its recipe."""
    from safetensors.torch import save_file

    from ferlab.checkpoint import read_meta

    run = tmp_path / "run"
    run.mkdir()
    meta = read_meta(trained_tiny_run / "best.safetensors")
    meta["data"]["path"] = "/home/someone/data/fer2013.csv.gz"
    meta["data"]["source"] = "/home/someone/data/fer2013.csv.gz"
    meta["labels"] = {"source": "ferplus", "file": "/home/someone/data/ferplus/fer2013new.csv", "sha256": "0" * 64}
    meta["train"]["data"] = "/home/someone/data/fer2013.csv.gz"
    meta["train"]["labels"] = "/home/someone/data/ferplus/fer2013new.csv"
    meta["train"]["init_from"] = "/home/someone/runs/warm/best.safetensors"
    meta["train"]["teachers"] = ["/home/someone/runs/teacher", "fer2013-resnet-s"]
    meta["teachers"] = [{"spec": "/home/someone/runs/teacher", "model": "fer-resnet-s"}]
    meta["distill_targets"] = {"file": "/home/someone/.gpu/targets/tiny.safetensors", "sha256": "0" * 64}
    save_file(load_file(trained_tiny_run / "best.safetensors"), str(run / "best.safetensors"),
              metadata={"ferlab": json.dumps(meta)})
    path, shipped, _ = _ship_module().write_shipped(str(run), "tiny-paths", weights, "fp16")
    on_disk = read_meta(path)
    for m in (shipped, on_disk):
        assert m["data"]["path"] == "fer2013.csv.gz" and m["train"]["data"] == "fer2013.csv.gz"
        assert m["train"]["labels"] == "fer2013new.csv" and m["labels"]["file"] == "fer2013new.csv"
        assert m["data"]["source"] == "fer2013.csv.gz" and m["train"]["teachers"] == ["teacher", "fer2013-resnet-s"]
        assert "/home/someone" not in json.dumps(m)
