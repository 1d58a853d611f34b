"""The GPU campaign rehearsed on the CPU: the data packed in parts, staged, assembled and checked; the smoke check
and calibration; a plan trained inside a budget; the results packed, brought back and unpacked into run folders
that ``ferlab evaluate`` scores on the source data."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, write_fer_dirs

SCRIPT = REPO / "bench" / "gpu_campaign.py"


def _campaign():
    if "gpu_campaign" not in sys.modules:  # its dataclasses look their module up there
        spec = importlib.util.spec_from_file_location("gpu_campaign", SCRIPT)
        sys.modules["gpu_campaign"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["gpu_campaign"])
    return sys.modules["gpu_campaign"]


def run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO)


PLAN = """
[[run]]
name = "s16"
config = "configs/fer-resnet-s16-20ep.toml"
epochs = "fit"

[[run]]
name = "ferplus-xs"
config = "configs/fer-resnet-s16-120ep-ferplus.toml"
set = { model = "fer-resnet-xs" }
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    return write_fer_dirs(tmp_path_factory.mktemp("data"))


def test_rehearsal_end_to_end(data, tmp_path):
    csv, _ = data
    gpu, store, plan = tmp_path / ".gpu", tmp_path / "store", tmp_path / "plan.toml"
    plan.write_text(PLAN)
    res = run("pack", "--data", str(csv), "--out", str(gpu))
    assert res.returncode == 0, res.stderr
    assert "packed 380 rows (train 300, val 80)" in res.stdout  # PrivateTest stays here
    assert sorted(p.name for p in (gpu / "part2").iterdir()) == ["fer2013-trainval.ferpack.2", "fer2013new.csv",
                                                                 "manifest.json"]
    res = run("stage", str(gpu / "part1"), str(gpu / "part2"), "--store", str(store))  # call 1 carries both parts
    assert res.returncode == 0 and "assembled" in res.stdout and "checksums ok" in res.stdout, res.stderr
    res = run("stage", str(gpu / "part1"), str(gpu / "part2"), "--store", str(store))  # call 2, the machine warm
    assert res.returncode == 0 and res.stdout.count("already staged") == 2, res.stdout + res.stderr
    assert "already assembled" in res.stdout

    res = run("smoke", "--dry-run", "--plan", str(plan), "--out", str(tmp_path / "out1"), "--store", str(store))
    assert res.returncode == 0, res.stdout + res.stderr
    calibration = json.loads((store / "calibration.json").read_text())
    assert set(calibration["images_per_s"]) == {"s16", "ferplus-xs"} and calibration["concurrency"] == 2
    assert all(v > 0 for v in calibration["images_per_s"].values())
    assert [p.name for p in (tmp_path / "out1").iterdir()] == ["calibration.json"]  # little comes back

    out = tmp_path / "out2"
    res = run("run", "--dry-run", "--plan", str(plan), "--out", str(out), "--store", str(store), "--budget", "300")
    assert res.returncode == 0, res.stdout + res.stderr
    back = sorted(p.name for p in out.iterdir())
    assert back == ["campaign.json", "results.tar.gz.1"]
    campaign = json.loads((out / "campaign.json").read_text())
    assert campaign["data"] == "fer2013-trainval.ferpack"
    assert {n: (r["returncode"], r["epochs_run"], r["finished"]) for n, r in campaign["runs"].items()} == {
        "s16": (0, 2, True), "ferplus-xs": (0, 2, True)}

    res = run("unpack", *map(str, sorted(out.glob("results.tar.gz.*"))), "--to", str(tmp_path / "runs"))
    assert res.returncode == 0, res.stderr
    for name, labels in (("s16", "source"), ("ferplus-xs", "ferplus")):
        folder = tmp_path / "runs" / name
        assert {"best.safetensors", "config.json", "history.csv", "summary.json", "train.log"} <= {
            p.name for p in folder.iterdir()}
        ev = subprocess.run([sys.executable, "-m", "ferlab", "evaluate", str(folder), "--data", str(csv),
                             "--split", "val", "--json", "--no-progress"], capture_output=True, text=True, cwd=REPO)
        assert ev.returncode == 0, ev.stderr
        report = json.loads(ev.stdout)
        # the pack stood for the CSV: the run counts as trained on the same data
        assert report["labels"] == labels and report["members"][0]["same_data_as_training"]


def test_parts_staged_over_two_calls(data, tmp_path):
    gpu, store = tmp_path / ".gpu", tmp_path / "store"
    assert run("pack", "--data", str(data[0]), "--out", str(gpu)).returncode == 0
    res = run("stage", str(gpu / "part1"), "--store", str(store))  # a tree too large for both: one part a call
    assert res.returncode == 0 and "waiting for fer2013-trainval.ferpack.2" in res.stdout, res.stderr
    res = run("stage", str(gpu / "part2"), "--store", str(store))
    assert res.returncode == 0 and "assembled" in res.stdout and "checksums ok" in res.stdout, res.stderr


def test_a_window_of_one_call_checks_and_times_the_nets_before_training(data, tmp_path):
    gpu, store, plan = tmp_path / ".gpu", tmp_path / "store", tmp_path / "plan.toml"
    plan.write_text(PLAN.split("\n\n[[run]]")[0])  # the first run alone
    assert run("pack", "--data", str(data[0]), "--out", str(gpu)).returncode == 0
    assert run("stage", str(gpu / "part1"), str(gpu / "part2"), "--store", str(store)).returncode == 0
    out = tmp_path / "out"
    res = run("run", "--smoke", "--dry-run", "--plan", str(plan), "--out", str(out), "--store", str(store),
              "--budget", "300", "--calibration-epochs", "2")
    assert res.returncode == 0 and "no calibration in" in res.stdout, res.stdout + res.stderr
    assert res.stdout.index("ok: evaluation") < res.stdout.index("no calibration in") < res.stdout.index("s16: ")
    campaign = json.loads((out / "campaign.json").read_text())
    assert set(campaign["smoke"]) == {"augmentation", "train (stopped after epoch 1 by its time limit)",
                                      "resume (epoch 2)", "evaluation", "waits_per_batch"}
    assert campaign["smoke"]["waits_per_batch"] == 0.0  # trained on the CPU, which nothing waits for
    calibration = campaign["calibration"]
    assert calibration["measured_by"] == "run" and calibration["images_per_s"]["s16"] > 0
    assert json.loads((store / "calibration.json").read_text()) == calibration  # a retry on this machine reuses it
    assert campaign["runs"]["s16"]["finished"] and sorted(p.name for p in out.iterdir()) == [
        "campaign.json", "results.tar.gz.1"]


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                          capture_output=True, text=True).stdout


def test_weights_a_plan_does_not_load_are_set_aside_and_restored(tmp_path):
    repo, gpu = tmp_path / "repo", tmp_path / "repo" / ".gpu"
    weights = repo / "ferlab" / "weights"
    weights.mkdir(parents=True)
    (repo / ".gitignore").write_text("/.gpu/\n")
    manifest = {"a": {"file": "a.safetensors"}, "b": {"file": "b.safetensors"}, "c": {"file": "c.safetensors"},
                "ens": {"kind": "ensemble", "members": ["a", "b"]}}
    (weights / "manifest.json").write_text(json.dumps(manifest))
    for name, size in (("a", 1000), ("b", 2000), ("c", 300_000)):
        (weights / f"{name}.safetensors").write_bytes(bytes(size))
    git(repo, "init", "-q")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "weights")
    (gpu / "part1").mkdir(parents=True)
    (gpu / "part1" / "pack.1").write_bytes(bytes(5000))
    plan = tmp_path / "plan.toml"  # a student distilled from the ensemble: its members travel, c does not
    plan.write_text('[[run]]\nname = "kd"\nconfig = "configs/fer-resnet-s16-20ep.toml"\nset = { teachers = ["ens"] }\n')
    where = ["--repo", str(repo), "--aside", str(gpu / "aside")]

    res = run("aside", "--plan", str(plan), "--gpu", str(gpu), *where)
    assert res.returncode == 0 and "the window is one call" in res.stdout, res.stdout + res.stderr
    assert "kept, the plan loads them: a.safetensors, b.safetensors" in res.stdout
    assert sorted(p.name for p in weights.iterdir()) == ["a.safetensors", "b.safetensors", "manifest.json"]
    assert "ferlab/weights/c.safetensors" not in git(repo, "ls-files")  # so it does not travel
    assert _campaign().tracked_bytes(repo) == sum(len(p.read_bytes()) for p in (
        repo / ".gitignore", weights / "manifest.json", weights / "a.safetensors", weights / "b.safetensors"))
    res = run("aside", "--plan", str(plan), "--gpu", str(gpu), *where)
    assert res.returncode != 0 and "run `restore` first" in res.stderr  # never twice

    (gpu / "part2").mkdir()
    with open(gpu / "part2" / "pack.2", "wb") as f:  # a part too large to travel beside the others
        f.truncate(64 * 2**20)
    assert run("restore", *where).returncode == 0
    res = run("aside", "--plan", str(plan), "--gpu", str(gpu), *where)
    assert res.returncode == 0 and "each call carries one part" in res.stdout, res.stdout + res.stderr

    res = run("restore", *where)
    assert res.returncode == 0 and "restored 1 weights file(s)" in res.stdout, res.stdout + res.stderr
    assert "matches the last commit" in res.stdout
    assert git(repo, "status", "--porcelain") == ""
    assert (weights / "c.safetensors").stat().st_size == 300_000


KD_PLAN = """
[[run]]  # the fast student distilled offline (flip views) from a teacher that stays here
name = "kd"
config = "configs/fer-mobile-fast-kd-ens.toml"
set = { teachers = ["TEACHER"] }
epochs = "fit"
"""


def test_soft_targets_travel_in_place_of_the_teachers(data, tmp_path, trained_tiny_run):
    import shutil

    csv, _ = data
    gpu, store, plan, teacher = tmp_path / ".gpu", tmp_path / "store", tmp_path / "plan.toml", tmp_path / "teacher"
    shutil.copytree(trained_tiny_run, teacher)
    plan.write_text(KD_PLAN.replace("TEACHER", str(teacher)))
    assert run("pack", "--data", str(csv), "--out", str(gpu)).returncode == 0
    res = run("targets", "--plan", str(plan), "--data", str(csv), "--out", str(gpu / "targets"), "--no-progress")
    assert res.returncode == 0 and f"kd: soft targets of {teacher} in" in res.stdout, res.stdout + res.stderr
    assert run("stage", str(gpu / "part1"), str(gpu / "part2"), "--store", str(store)).returncode == 0
    shutil.rmtree(teacher)  # the GPU machine: the pack and the targets, no teacher
    out = tmp_path / "out"
    res = run("run", "--dry-run", "--plan", str(plan), "--out", str(out), "--store", str(store), "--targets",
              str(gpu / "targets"), "--budget", "300", "--calibration-epochs", "2")
    assert res.returncode == 0 and "kd: soft targets from" in res.stdout, res.stdout + res.stderr
    assert "no calibration in" in res.stdout  # timed without the teacher: offline targets cost nothing an epoch
    assert json.loads((out / "campaign.json").read_text())["runs"]["kd"]["finished"]
    assert run("unpack", *map(str, out.glob("results.tar.gz.*")), "--to", str(tmp_path / "runs")).returncode == 0
    meta = json.loads((tmp_path / "runs" / "kd" / "config.json").read_text())
    assert meta["teachers"][0]["spec"] == str(teacher) and meta["distill_targets"]["sha256"]


def test_a_run_whose_soft_targets_travel_loads_no_teacher(tmp_path):
    c = _campaign()
    manifest = {"a": {"file": "a.safetensors"}, "b": {"file": "b.safetensors"},
                "ens": {"kind": "ensemble", "members": ["a", "b"]}}
    online = c.PlannedRun("online", "configs/fer-resnet-s16-20ep.toml", {"teachers": ["a"]})
    offline = c.PlannedRun("kd", "configs/fer-mobile-fast-kd-ens.toml", {"teachers": ["ens"]})
    targets = tmp_path / "targets"
    assert c.weights_needed([online, offline], manifest, targets) == {"a.safetensors", "b.safetensors"}
    targets.mkdir()
    (targets / "kd.safetensors").write_bytes(b"targets")
    assert c.weights_needed([online, offline], manifest, targets) == {"a.safetensors"}
    assert c.weights_needed([offline], manifest, targets) == set()
    assert c.use_targets([online, offline], targets)[1].overrides["distill_targets"] == str(
        (targets / "kd.safetensors").resolve())
    assert "distill_targets" not in online.overrides


def test_soft_targets_inside_the_repository_are_named_by_its_relative_path(monkeypatch, tmp_path):
    """Runs start in the repository: the recipe that comes back from the GPU machine names the targets file by
    the path it has in every checkout, not by the GPU machine's folders."""
    c = _campaign()
    offline = c.PlannedRun("kd", str(c.REPO / "configs/fer-mobile-fast-kd-ens.toml"), {"teachers": ["ens"]})
    monkeypatch.setattr(c, "REPO", tmp_path)
    targets = tmp_path / ".gpu" / "targets"
    targets.mkdir(parents=True)
    (targets / "kd.safetensors").write_bytes(b"targets")
    assert c.use_targets([offline], targets)[0].overrides["distill_targets"] == str(
        Path(".gpu") / "targets" / "kd.safetensors")


def test_a_damaged_part_is_refused(data, tmp_path):
    gpu = tmp_path / ".gpu"
    assert run("pack", "--data", str(data[0]), "--out", str(gpu), "--parts", "3").returncode == 0
    part = gpu / "part2" / "fer2013-trainval.ferpack.2"
    raw = bytearray(part.read_bytes())
    raw[10] ^= 1
    part.write_bytes(bytes(raw))
    res = run("stage", str(gpu / "part2"), "--store", str(tmp_path / "store"))
    assert res.returncode != 0 and "checksum mismatch (damaged in transfer?)" in res.stderr


def test_privatetest_never_travels(data, tmp_path):
    plan = tmp_path / "plan.toml"
    plan.write_text(PLAN)
    res = run("run", "--dry-run", "--plan", str(plan), "--out", str(tmp_path / "o"), "--store", str(tmp_path / "s"),
              "--data", str(data[0]))
    assert res.returncode != 0 and "holds test (PrivateTest) rows" in res.stderr


def test_fitted_epochs():
    c = _campaign()
    run_ = c.PlannedRun("r", "configs/fer-resnet-s16-20ep.toml", min_epochs=10, max_epochs=300)
    # 0.8 x (445 - 45) s x 1,000 images/s / 28,709 images an epoch = 11.1
    assert c.fitted_epochs(run_, 1000.0, 445.0) == 11
    assert c.fitted_epochs(c.PlannedRun("r", "x", min_epochs=12), 1000.0, 445.0) == 0  # too few: not started
    assert c.fitted_epochs(c.PlannedRun("r", "x", max_epochs=5, min_epochs=1), 1000.0, 445.0) == 5
    assert c.fitted_epochs(c.PlannedRun("r", "x", epochs=7), 1000.0, 445.0) == 7
    assert c.fitted_epochs(run_, None, 445.0) == 10  # no calibration: the least the plan allows


def test_a_history_cut_mid_write_reads_as_no_epoch_yet(tmp_path):
    from ferlab.train.fit import HISTORY_FIELDS, write_history

    row = {"epoch": 1, "lr": 1e-3, "train_loss": 1.5, "train_acc": 0.4, "val_loss": 1.4, "val_acc": 0.45,
           "seconds": 3.0, "images_per_s": 9000.0, "size": 48}
    write_history(tmp_path, [row, {**row, "epoch": 2}], plot=False)
    assert _campaign().last_epoch(tmp_path)["epoch"] == 2
    text = (tmp_path / "history.csv").read_text()
    assert text.splitlines()[0] == ",".join(HISTORY_FIELDS) and not (tmp_path / "curves.png").exists()
    (tmp_path / "history.csv").write_text(text[: text.rindex("\n", 0, -1) + 5])  # the last row cut short
    assert _campaign().last_epoch(tmp_path) is None  # a progress line, not an error that ends the campaign


@pytest.mark.parametrize("text, message", [
    ('[[run]]\nname = "a"\n', "needs name and config"),
    ('[[run]]\nname = "a"\nconfig = "configs/fer-resnet-s.toml"\nepoch = 3\n', "unknown: epoch"),
    ('[[run]]\nname = "a"\nconfig = "configs/fer-resnet-s.toml"\nset = { optimizer = "rmsprop" }\n',
     "run a: .*optimizer = .rmsprop. is not one of"),
    ('[[run]]\nname = "a"\nconfig = "configs/none.toml"\n', "does not exist"),
    ('[[run]]\nname = "a"\nconfig = "configs/fer-resnet-s.toml"\nepochs = "long"\n', "epochs must be"),
    ('[[run]]\nname = "a"\nconfig = "configs/fer-resnet-s.toml"\n' * 2, "distinct names"),
    ('[[study]]\nbudget = "long"\nruns = "q3/*/s0"\n', "runs a list of patterns"),
    ('[[study]]\nbudget = 3\n', "budget is a name"),
    ('[[study]]\nbudget = "huge"\n', "unknown budget 'huge'"),
    ('[[study]]\nruns = ["q3/*"]\n', "needs budget"),
])
def test_bad_plans_fail_before_training(tmp_path, text, message):
    plan = tmp_path / "plan.toml"
    plan.write_text(text)
    with pytest.raises(SystemExit, match=message):
        _campaign().read_plan(plan)


@pytest.mark.parametrize("plan", sorted((REPO / "configs" / "gpu").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_plans_read(plan):
    runs = _campaign().read_plan(plan)
    assert runs and all(r.train_config().epochs >= 1 for r in runs)


STUDY_PLAN = """
[[study]]  # the quick budget's Q3 and k-fold runs train 2 epochs, as a rehearsal does: the study can adopt them
budget = "quick"
runs = ["q3/image-on/s0", "kfold/2-of-3"]
"""


def test_study_runs_trained_on_the_gpu_are_adopted_by_the_study(data, tmp_path):
    import dataclasses

    from ferlab.study.plan import get_budget
    from ferlab.study.runner import run_study

    csv, _ = data
    gpu, store, plan = tmp_path / ".gpu", tmp_path / "store", tmp_path / "plan.toml"
    plan.write_text(STUDY_PLAN)
    assert [r.name for r in _campaign().read_plan(plan)] == ["study-quick-q3-image-on-s0", "study-quick-kfold-2-of-3"]
    assert run("pack", "--data", str(csv), "--out", str(gpu), "--parts", "1").returncode == 0
    assert run("stage", str(gpu / "part1"), "--store", str(store)).returncode == 0
    res = run("run", "--dry-run", "--plan", str(plan), "--out", str(tmp_path / "out"), "--store", str(store))
    assert res.returncode == 0, res.stdout + res.stderr
    res = run("unpack", *map(str, sorted((tmp_path / "out").glob("results.tar.gz.*"))), "--to",
              str(tmp_path / "runs"))
    assert res.returncode == 0 and "ferlab study --budget quick" in res.stdout, res.stderr
    budget = get_budget("quick")
    chosen = tuple(e for e in budget.experiments if e.name in ("q3/image-on/s0", "kfold/2-of-3"))
    lines: list[str] = []
    study = run_study(dataclasses.replace(budget, experiments=chosen), tmp_path / "study", data=str(csv),
                      progress=False, log=lines.append,
                      adopt=[tmp_path / "runs" / name for name in ("study-quick-q3-image-on-s0",
                                                                   "study-quick-kfold-2-of-3")])
    assert study.counts == {"trained": 0, "resumed": 0, "reused": 2}, lines  # nothing retrained here
    assert {r.experiment.name for r in study.results} == {"q3/image-on/s0", "kfold/2-of-3"}
    fold = next(r for r in study.results if r.experiment.role == "kfold")
    assert fold.evaluation["fold"]["n"] > 0  # scored here on its held-out fold and on test


def test_a_plan_whose_checkpoints_cannot_come_back_is_refused(tmp_path):
    plan = tmp_path / "plan.toml"
    plan.write_text('[[study]]\nbudget = "long"\n')  # 24 nets of 2-4 MB
    with pytest.raises(SystemExit, match="more than can come back"):
        _campaign().read_plan(plan)
    plan.write_text('[[study]]\nbudget = "long"\nruns = ["q9/*"]\n')
    with pytest.raises(SystemExit, match="no experiment of budget long matches q9"):
        _campaign().read_plan(plan)
