"""End-to-end: the ferlab command on the embedded data, and its error messages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import LEARN_SYNTHETIC, TINY_SYNTHETIC

from ferlab.cli import main

SYN = json.dumps(TINY_SYNTHETIC)
LEARN = json.dumps(LEARN_SYNTHETIC)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("cli") / "run"
    rc = main(["train", "--model", "fer-resnet-s", "--epochs", "4", "--batch-size", "64", "--optimizer", "adamw",
               "--lr", "0.002", "--schedule", "cosine", "--augment", "flip", "--synthetic", LEARN, "--out", str(run),
               "--no-progress"])
    assert rc == 0
    return run


def test_train_writes_a_complete_run_directory(trained_run):
    for name in ("config.json", "best.safetensors", "last.pt", "history.csv", "curves.png", "summary.json"):
        assert (trained_run / name).is_file(), name
    meta = json.loads((trained_run / "config.json").read_text())
    assert meta["model"]["name"] == "fer-resnet-s"
    assert meta["preprocess"]["normalize"]["mode"] == "dataset" and meta["preprocess"]["normalize"]["std"] > 0
    assert meta["data"]["fingerprint"] and meta["split"]["text"]
    assert meta["class_names"][3] == "Happy"
    assert len((trained_run / "history.csv").read_text().splitlines()) == 5


def test_evaluate_json_beats_chance(trained_run, capsys):
    capsys.readouterr()
    assert main(["evaluate", str(trained_run), "--split", "test", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n"] == LEARN_SYNTHETIC["n_test"]
    assert report["accuracy"] > 0.3  # chance is ~0.14; the tiny run must have learned something
    assert len(report["confusion"]) == 7 and sum(map(sum, report["confusion"])) == report["n"]
    assert (trained_run / "eval-test" / "confusion.png").is_file()


def test_ensemble_of_two_checkpoints(trained_run, tmp_path, capsys):
    other = tmp_path / "other"
    assert main(["train", "--model", "r000-cnn1", "--epochs", "2", "--batch-size", "64", "--synthetic", SYN,
                 "--optimizer", "adam", "--lr", "0.001", "--out", str(other), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(trained_run), str(other), "--split", "val", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ensemble"] and len(report["members"]) == 2
    assert {m["model"] for m in report["members"]} == {"fer-resnet-s", "r000-cnn1"}


def test_models_json_lists_every_model(capsys):
    from ferlab.models import list_models

    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == list_models()
    assert all(r["mflops"] > 0 and r["keras_total"] >= r["trainable"] > 0 for r in rows)


def test_models_pretrained_pattern_filters_the_shelf(capsys):
    from ferlab.pretrained import list_pretrained

    assert main(["models", "--pretrained", "--json", "--pattern", "ferplus*"]) == 0
    names = [r["name"] for r in json.loads(capsys.readouterr().out)]
    shipped = [e["name"] for e in list_pretrained()]
    assert names == [n for n in shipped if n.startswith("ferplus")] and len(names) < len(shipped)
    assert main(["models", "--pretrained", "--pattern", "nothing*"]) == 0
    assert "no shipped model matches 'nothing*'" in capsys.readouterr().out


def test_models_pattern_filters_by_name_and_version_prints_the_package_version(capsys):
    from fnmatch import fnmatch

    from ferlab import __version__
    from ferlab.models import list_models

    assert main(["models", "--json", "--pattern", "r00*"]) == 0
    names = [r["name"] for r in json.loads(capsys.readouterr().out)]
    assert names and names == [n for n in list_models() if fnmatch(n, "r00*")] and len(names) < len(list_models())
    assert main(["models", "--json", "--pattern", "no-such-net*"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"ferlab {__version__}"


def test_missing_data_path_is_a_clear_error(tmp_path, capsys):
    rc = main(["train", "--data", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "r"), "--no-progress"])
    assert rc == 2
    assert "nope.csv" in capsys.readouterr().err


def test_unknown_model_is_a_clear_error(tmp_path, capsys):
    rc = main(["train", "--model", "resnet9000", "--synthetic", SYN, "--out", str(tmp_path / "r"), "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "resnet9000" in err and "r002-vgg" in err


def test_resume_of_a_non_run_is_a_clear_error(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["{bad", "{}", '{"train": {"epochs": "ten"}}'])
def test_resume_of_a_damaged_run_config_names_the_file(tmp_path, capsys, text):
    (tmp_path / "config.json").write_text(text)
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert f"{tmp_path / 'config.json'}: damaged run config" in capsys.readouterr().err


def test_output_paths_are_checked_before_the_work(tmp_path, capsys):
    missing = str(tmp_path / "no-such-run")  # would fail on loading, so these errors must come first
    assert main(["predict-csv", missing, "--data", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert f"--out {tmp_path} is a directory" in capsys.readouterr().err
    report = tmp_path / "report.txt"
    report.write_text("not a folder")
    assert main(["evaluate", missing, "--out", str(report)]) == 2
    assert f"--out {report} is a file" in capsys.readouterr().err


def test_predict_csv_on_course_layout(trained_run, tmp_path):
    import torch

    from ferlab.data.source import open_data
    from ferlab.inference.loader import load_model

    faces = open_data(None, synthetic={"n_train": 21, "n_val": 7, "n_test": 7, "seed": 5}).images[:20]  # (20, 48, 48)
    row = lambda img: " ".join(map(str, img.ravel().tolist()))  # noqa: E731
    (tmp_path / "train.csv").write_text("label,feature\n" + "".join(f"{i % 7},{row(faces[i])}\n" for i in range(14)))
    (tmp_path / "test.csv").write_text("id,feature\n" + "".join(f"{100 + i},{row(f)}\n" for i, f in enumerate(faces)))
    model = load_model(trained_run)
    for tta in ("none", "flip"):
        out = tmp_path / f"sub-{tta}.csv"
        assert main(["predict-csv", str(trained_run), "--data", str(tmp_path), "--out", str(out), "--tta", tta]) == 0
        lines = out.read_text().splitlines()
        assert lines[0] == "id,label" and len(lines) == 21
        assert [int(line.split(",")[0]) for line in lines[1:]] == list(range(100, 120))
        want = model.probabilities(torch.from_numpy(faces).unsqueeze(1), tta=tta).argmax(1)
        assert [int(line.split(",")[1]) for line in lines[1:]] == want.tolist()
        assert len(set(want.tolist())) > 1  # a model that says one class for every face would not pass


def test_resume_refuses_changed_options(trained_run, capsys):
    assert main(["train", "--resume", str(trained_run), "--epochs", "50"]) == 2
    assert "--epochs" in capsys.readouterr().err


def test_resume_of_a_finished_run_changes_nothing(trained_run, capsys):
    before = (trained_run / "history.csv").read_text()
    assert main(["train", "--resume", str(trained_run), "--no-progress"]) == 0
    assert (trained_run / "history.csv").read_text() == before
    assert "finished" in capsys.readouterr().out


def test_evaluate_shift_tta(trained_run, capsys):
    capsys.readouterr()
    assert main(["evaluate", str(trained_run), "--split", "val", "--tta", "shift"]) == 0
    assert "(shift TTA)" in capsys.readouterr().out
    report = json.loads((trained_run / "eval-val-tta-shift" / "metrics.json").read_text())
    assert report["tta"] == "shift"
    with pytest.raises(SystemExit):
        main(["evaluate", str(trained_run), "--tta", "crops"])
    assert "invalid choice: 'crops'" in capsys.readouterr().err


def test_evaluate_no_progress_keeps_stderr_clean(trained_run, capsys):
    capsys.readouterr()
    assert main(["evaluate", str(trained_run), "--split", "val", "--tta", "shift"]) == 0
    assert "%|" in capsys.readouterr().err  # the bars, by default
    assert main(["evaluate", str(trained_run), "--split", "val", "--tta", "shift", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "%|" not in captured.err and "(shift TTA)" in captured.out


def test_launcher_preloads_jemalloc_without_decay(tmp_path, monkeypatch):
    import ferlab.cli as cli

    fake = tmp_path / "libjemalloc.so.2"
    fake.write_bytes(b"")
    monkeypatch.setattr(cli, "JEMALLOC", str(fake))
    env = cli.launcher_env({"LD_PRELOAD": "libx.so", "PATH": "/bin"})
    assert env == {"LD_PRELOAD": f"{fake} libx.so", "PATH": "/bin", "MALLOC_CONF": cli.JEMALLOC_CONF}
    assert "dirty_decay_ms:-1" in cli.JEMALLOC_CONF  # the setting that makes jemalloc faster than glibc here
    assert cli.launcher_env({"MALLOC_CONF": "narenas:1"})["MALLOC_CONF"] == "narenas:1"  # the user's own wins
    assert cli.launcher_env({"FERLAB_JEMALLOC": "0"}) is None
    assert cli.launcher_env({"LD_PRELOAD": str(fake)}) is None  # already preloaded: run as is
    monkeypatch.setattr(cli, "JEMALLOC", str(tmp_path / "absent.so"))
    assert cli.launcher_env({}) is None  # not installed: run as is


def test_pretrained_table_columns_stay_aligned_with_long_names(monkeypatch, capsys):
    import ferlab.pretrained

    acc = {"val": {"plain": 0.5, "tta": 0.51, "affine": 0.515}, "test": {"plain": 0.52, "tta": 0.53, "affine": 0.54}}
    rows = [{"name": "a" * 40, "model": "fer-mobile-fast", "params": 10, "size_bytes": 1, "accuracy": acc,
             "kind": "single", "roles": ["fast"]},
            {"name": "short", "model": "fer-resnet-s", "params": 1_000_000, "size_bytes": 1, "accuracy": acc,
             "kind": "single", "roles": ["default", "best-single"]}]
    monkeypatch.setattr(ferlab.pretrained, "list_pretrained", lambda: [dict(r) for r in rows])
    assert main(["models", "--pretrained"]) == 0
    head, _, *lines = capsys.readouterr().out.splitlines()[:4]
    col = head.index("roles")
    for line, r in zip(lines, rows, strict=True):
        assert line[col:].startswith(",".join(r["roles"]) + " "), line  # the roles column starts where its header does
        assert "54.00%" in line and line.index("52.00%") == lines[0].index("52.00%")
        assert line.split()[-4:] == ["-"] * 4  # FER+ agreement, mCA, rule score, ECE: not measured here
    assert "fast " in lines[0] and "standard " in lines[1]  # speed classes from the MFLOPs (33 and 284)


def test_evaluate_writes_files_next_to_a_run_and_for_a_shipped_name_only_with_out(trained_run, tmp_path,
                                                                                  monkeypatch):
    import ferlab.evaluate

    seen = []
    monkeypatch.setattr(ferlab.evaluate, "evaluate_checkpoints", lambda specs, **kw: seen.append(kw["out_dir"]) or {})
    monkeypatch.setattr(ferlab.evaluate, "format_report", lambda report: "")
    monkeypatch.chdir(tmp_path)
    for argv in ([str(trained_run)], ["fer2013-resnet-s"], ["fer2013-resnet-s", "--out", "mine"]):
        assert main(["evaluate", *argv, "--split", "val", "--tta", "shift"]) == 0
    assert seen == [trained_run / "eval-val-tta-shift", None, Path("mine")]


def test_demo_refuses_to_continue_a_demo_run_with_other_options(tmp_path, capsys):
    run = tmp_path / "demo"
    run.mkdir()
    (run / "last.pt").write_bytes(b"")
    (run / "config.json").write_text(json.dumps({"train": {"model": "fer-resnet-s", "epochs": 99}}))
    assert main(["demo", "--out", str(run), "--epochs", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "other training options" in err and "epochs: 99 -> 2" in err and "--out DIR" in err


def test_ferlab_debug_shows_the_traceback_instead_of_one_line(tmp_path, monkeypatch, capsys):
    argv = ["evaluate", str(tmp_path / "missing-run")]
    assert main(argv) == 2 and "missing-run" in capsys.readouterr().err
    monkeypatch.setenv("FERLAB_DEBUG", "1")
    with pytest.raises(Exception, match="missing-run"):
        main(argv)


def test_data_prints_the_layout_and_the_class_counts_of_each_split(tmp_path, capsys):
    pix = " ".join(["7"] * 2304)
    rows = [(0, "Training")] * 3 + [(3, "Training"), (3, "PublicTest"), (6, "PrivateTest"), (6, "PrivateTest")]
    (tmp_path / "fer2013.csv").write_text("emotion,pixels,Usage\n" + "".join(f"{e},{pix},{u}\n" for e, u in rows))
    assert main(["data", str(tmp_path / "fer2013.csv")]) == 0
    out = capsys.readouterr().out
    assert "layout fer2013-csv, 7 images" in out
    lines = {line.split()[0]: [int(v.replace(",", "")) for v in line.split()[1:]] for line in out.splitlines()
             if line.split() and line.split()[0] in ("train", "val", "test")}
    assert lines == {"train": [3, 0, 0, 1, 0, 0, 0, 4], "val": [0, 0, 0, 1, 0, 0, 0, 1],
                     "test": [0, 0, 0, 0, 0, 0, 2, 2]}


def test_every_config_field_is_a_train_flag_with_help():
    from dataclasses import fields

    from ferlab.cli import build_parser
    from ferlab.train.config import FIELD_HELP, TrainConfig, config_flags

    assert [f.field for f in config_flags()] == [f.name for f in fields(TrainConfig)]
    assert set(FIELD_HELP) == {f.name for f in fields(TrainConfig)}
    train = next(a for a in build_parser()._subparsers._group_actions[0].choices.items() if a[0] == "train")[1]
    dests = {a.dest for a in train._actions}
    assert {f.name for f in fields(TrainConfig)} <= dests
    cfg = _train_config_of(["--channels-last", "--eval-batch-size", "64", "--momentum", "0.8", "--no-skip-bad",
                            "--warmup-epochs", "1.5", "--distill-offline", ""])
    assert (cfg.channels_last, cfg.eval_batch_size, cfg.momentum, cfg.skip_bad, cfg.warmup_epochs) == \
        (True, 64, 0.8, False, 1.5)


def _train_config_of(argv):
    from ferlab.cli import _train_config, build_parser

    return _train_config(build_parser().parse_args(["train", *argv]))


def test_train_flags_become_the_run_config(tmp_path):
    from ferlab.cli import _train_config, build_parser

    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text('model = "fer-resnet-s"\nepochs = 7\nlr = 0.5\nmodel_args = { drop = 0.1 }\n')
    args = build_parser().parse_args([
        "train", "--config", str(cfg_file), "--lr", "0.01", "--model-arg", "drop=0.3", "--model-arg", "stem=wide",
        "--teacher", "runs/a", "--teacher", "b.safetensors", "--skip-bad", "--fp32", "--augment", '{"hflip": true}'])
    cfg = _train_config(args)
    # the file's values stay where no flag is given; a flag wins over the file; JSON values are parsed
    assert (cfg.model, cfg.epochs, cfg.lr) == ("fer-resnet-s", 7, 0.01)
    assert cfg.model_args == {"drop": 0.3, "stem": "wide"}
    assert cfg.teachers == ["runs/a", "b.safetensors"]
    assert cfg.skip_bad and cfg.precision == "fp32" and cfg.augment == {"hflip": True}
    bare = _train_config(build_parser().parse_args(["train", "--model", "fer-mobile"]))
    assert (bare.model_args, bare.teachers, bare.skip_bad, bare.precision) == ({}, [], False, "auto")


@pytest.mark.parametrize("argv, message", [
    (["--model-arg", "drop"], "--model-arg expects KEY=VALUE, got 'drop'"),
    (["--resume", "runs/x", "--teacher", "a", "--skip-bad"], "drop --model, --skip-bad, --teacher, --out\n"),
])
def test_train_flag_errors(tmp_path, capsys, argv, message):
    assert main(["train", "--model", "fer-mobile", "--out", str(tmp_path / "r"), *argv]) == 2
    assert message in capsys.readouterr().err


def _write_csv_without_usage(path: Path, n: int = 240) -> None:
    """A Kaggle train.csv-style file (emotion,pixels; no Usage column) of synthetic faces."""
    from ferlab.data.synthetic import make_synthetic

    data = make_synthetic(n, 0, 0, seed=5)
    rows = [f'{lab},"{" ".join(map(str, img.ravel()))}"' for img, lab in zip(data.images, data.labels, strict=True)]
    path.write_text("emotion,pixels\n" + "\n".join(rows) + "\n")


def test_resume_from_another_directory_and_a_hint_that_names_an_existing_split(tmp_path, monkeypatch, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _write_csv_without_usage(tmp_path / "a" / "faces.csv")
    run = tmp_path / "a" / "run"
    monkeypatch.chdir(tmp_path / "a")
    assert main(["train", "--data", "faces.csv", "--model", "r000-cnn1", "--epochs", "1", "--batch-size", "32",
                 "--precision", "fp32", "--out", str(run), "--no-progress"]) == 0
    out = capsys.readouterr().out
    # the data has no test split (no Usage column): the hint names val, which exists
    assert f"next: ferlab evaluate {run} --split val" in out and "--split test" not in out
    saved = json.loads((run / "config.json").read_text())
    assert saved["train"]["data"] == "faces.csv"  # as typed, for display
    assert saved["data"]["path"] == str(tmp_path / "a" / "faces.csv")  # resolved when saved
    monkeypatch.chdir(tmp_path / "b")  # where faces.csv does not exist
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0, capsys.readouterr().err


def test_resume_from_another_directory_finds_a_votes_file_given_relative(tmp_path, monkeypatch, capsys):
    from conftest import write_fer_dirs

    write_fer_dirs(tmp_path / "a", sizes=(120, 40, 20))
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    assert main(["train", "--data", "fer2013/fer2013.csv", "--labels", "ferplus/fer2013new.csv", "--model",
                 "r004-dnn", "--epochs", "2", "--time-limit", "0.01", "--precision", "fp32", "--out", "run",
                 "--no-progress"]) == 0
    assert "stopped" in capsys.readouterr().out  # after its first epoch
    monkeypatch.chdir(tmp_path / "b")  # where neither relative path exists
    assert main(["train", "--resume", str(tmp_path / "a" / "run"), "--no-progress"]) == 0, capsys.readouterr().err
    assert "finished" in capsys.readouterr().out


def test_a_run_trained_with_skip_bad_is_evaluated_on_its_own_data(tmp_path, capsys):
    _write_csv_without_usage(tmp_path / "faces.csv")
    lines = (tmp_path / "faces.csv").read_text().splitlines(keepends=True)
    lines[12] = lines[12].replace(" ", ",", 1)  # a row with a stray field: malformed
    (tmp_path / "faces.csv").write_text("".join(lines))
    run = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "faces.csv"), "--skip-bad", "--model", "r004-dnn", "--epochs", "1",
                 "--precision", "fp32", "--out", str(run), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(run), "--split", "val", "--json"]) == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["n"] > 0
    other = tmp_path / "other.csv"  # other data with a bad row: evaluate's --skip-bad skips it
    _write_csv_without_usage(other)
    other.write_text(other.read_text() + "3,1 2 3\n")
    assert main(["evaluate", str(run), "--data", str(other), "--split", "val", "--skip-bad", "--json"]) == 0
    capsys.readouterr()


@pytest.mark.parametrize("argv, message", [
    (["--eval-batch-size", "0"], "eval_batch_size must be >= 1, got 0"),
    (["--threads", "-1"], "threads must be in [0, 1024]"),
    (["--threads", "100000"], "threads must be in [0, 1024]"),
    (["--label-smoothing", "2"], "label_smoothing must be in [0, 1), got 2"),
    (["--weight-decay", "-1"], "weight_decay must be a finite number >= 0, got -1"),
    (["--warmup-epochs", "nan"], "warmup_epochs must be a finite number >= 0, got nan"),
    (["--time-limit", "nan"], "time_limit must be a finite number >= 0, got nan"),
    (["--momentum", "nan"], "momentum must be a finite number >= 0, got nan"),
    (["--plateau-factor", "0"], "plateau_factor must be in (0, 1), got 0"),
    (["--early-stopping", "-1"], "early_stopping must be a finite number >= 0, got -1"),
    (["--model-arg", "foo=1"], "model fer-resnet-s takes no option(s) foo; its options: drop, input_scale"),
    (["--synthetic", '{"n_trian": 10}'], "unknown synthetic option(s) ['n_trian']; known: n_train"),
    (["--synthetic", "[1]"], "synthetic must be a table of make_synthetic() arguments"),
    (["--augment", '{"fill": "nearst"}'], "fill must be 'nearest' or 'zeros', got 'nearst'"),
    (["--augment", '{"rotation": "10"}'], "rotation must be a number, got '10'"),
    (["--augment", '{"erase_p": 2}'], "erase_p is a probability"),
])
def test_bad_numbers_are_refused_before_any_work(tmp_path, capsys, argv, message):
    assert main(["train", "--out", str(tmp_path / "r"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    with pytest.raises(SystemExit) as ei:  # a usage error: argparse's exit status 2
        main(["evaluate", str(tmp_path), "--batch-size", "0"])
    assert ei.value.code == 2 and "argument --batch-size: must be at least 1, got 0" in capsys.readouterr().err


def test_every_option_of_every_command_has_help_and_max_pixels_has_one_default():
    import argparse

    from ferlab.cli import build_parser
    from ferlab.images import DEFAULT_MAX_PIXELS

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = [f"{name} {'/'.join(a.option_strings) or a.dest}" for name, p in sub.choices.items()
               for a in p._actions if not isinstance(a, argparse._HelpAction) and not (a.help or "").strip()]
    assert missing == []
    assert parser.parse_args(["predict", "x.jpg"]).max_pixels == DEFAULT_MAX_PIXELS
    assert parser.parse_args(["serve"]).max_pixels == DEFAULT_MAX_PIXELS


def test_a_config_file_value_of_the_wrong_type_names_its_option(tmp_path, capsys):
    for text, message in (('lr = "0.1"', "lr must be a number, got '0.1'"),
                          ('epochs = "1"', "epochs must be a whole number, got '1'"),
                          ("skip_bad = 1", "skip_bad must be true or false, got 1")):
        cfg = tmp_path / "c.toml"
        cfg.write_text(text + "\n")
        assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "r")]) == 2
        assert f"{cfg}: {message}" in capsys.readouterr().err
    png = tmp_path / "c.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    assert main(["train", "--config", str(png)]) == 2
    assert "c.png: not a text file" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path)]) == 2
    assert "is a folder; name a .toml or .json file" in capsys.readouterr().err
    (tmp_path / "afile").write_text("x")
    assert main(["train", "--out", str(tmp_path / "afile")]) == 2
    assert "--out" in capsys.readouterr().err


def test_a_diverging_loss_is_a_one_line_error_not_a_traceback(tmp_path, capsys):
    assert main(["train", "--synthetic", '{"n_train": 64, "n_val": 32, "n_test": 32}', "--epochs", "3",
                 "--batch-size", "16", "--optimizer", "sgd", "--lr", "1e4", "--schedule", "none", "--out",
                 str(tmp_path / "r"), "--no-progress", "--threads", "1"]) == 2
    err = capsys.readouterr().err
    assert "error: loss is" in err and "lower the learning rate" in err and "Traceback" not in err


def test_predict_csv_refuses_to_write_over_its_data(trained_tiny_run, tmp_path, capsys):
    data = tmp_path / "test.csv"
    data.write_text("id,feature\n0," + " ".join(["0"] * 2304) + "\n")
    before = data.read_text()
    assert main(["predict-csv", str(trained_tiny_run), "--data", str(data), "--out", str(data)]) == 2
    assert "is the data file" in capsys.readouterr().err and data.read_text() == before
    assert main(["predict-csv", str(trained_tiny_run), "--data", str(tmp_path), "--out", str(data)]) == 2
    assert "is a data file of the folder" in capsys.readouterr().err and data.read_text() == before


@pytest.mark.parametrize(("argv", "message"), [
    (["--webcam", "-1"], "argument --webcam: must be at least 0, got -1"),
    (["x.jpg", "--max-channels", "0"], None),  # not a predict option: argparse's own error
])
def test_predict_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as ei:
        main(["predict", *argv])
    assert ei.value.code == 2 and (message is None or message in capsys.readouterr().err)


@pytest.mark.parametrize(("argv", "message"), [
    (["--threads", "-1"], "threads must be in [0, 1024]"),
    (["--threads", "100000"], "threads must be in [0, 1024]"),
    (["--margin", "inf"], "margin must be a finite number >= 0, got inf"),
    (["--margin", "nan"], "margin must be a finite number >= 0, got nan"),
    (["--min-face", "-5"], "min_face must be >= 1 pixel, got -5"),
    (["--out", "same.json", "--tracks", "same.json"], "--out and --tracks both name same.json"),
    (["--timeline", "t.xyz"], "--timeline t.xyz: name a .png, .jpg, .pdf or .svg file"),
    (["--annotate", "afile"], "--annotate afile is a file"),
])
def test_predict_option_errors_come_before_any_work(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "clip.mp4").write_bytes(b"not read: the options fail first")
    (tmp_path / "afile").write_text("x")
    assert main(["predict", "clip.mp4", "--model", "fer2013-fast", *argv]) == 2
    assert message in capsys.readouterr().err


def test_figure_options_are_checked_before_the_work(trained_tiny_run, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    for argv, message in ((["filters", str(trained_tiny_run), "--layer", "stages.0", "--out", "f.xyz"],
                           "cannot write a figure as '.xyz'"),
                          (["feature-maps", str(trained_tiny_run), "--layer", "stages.0", "--image", "data:val:0",
                            "--out", str(tmp_path / "afile" / "m.png")], "afile is a file, not a folder"),
                          (["explain", str(trained_tiny_run), "--images", "data:val:2", "--out",
                            str(tmp_path / "afile")],
                           "is a file; name a folder")):
        assert main(argv) == 2
        assert message in capsys.readouterr().err
    for flag in ("--steps", "--max-filters"):
        with pytest.raises(SystemExit):
            main(["filters", str(trained_tiny_run), "--layer", "stages.0", flag, "0"])


def test_a_link_to_nothing_in_a_folder_is_reported_not_skipped(tmp_path):
    from ferlab.images import collect_inputs

    (tmp_path / "broken.jpg").symlink_to(tmp_path / "gone.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    assert collect_inputs(tmp_path) == [tmp_path / "broken.jpg"]
    from ferlab.recognize.api import Recognizer

    (result,) = Recognizer("fer2013-fast").predict_many(tmp_path)
    assert "no such file (a link to nothing)" in result.error
