"""`ferlab study`: the quick budget end to end, the run cache and resume, the report page in Chromium."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import ARTIFACTS, REPO

from ferlab.cli import main
from ferlab.study.plan import BUDGETS, Budget, Experiment, get_budget, plan_for
from ferlab.train.config import TrainConfig


def _run_cli(argv: list[str]) -> tuple[int, str]:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(argv)
    return rc, buf.getvalue()


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory) -> dict:
    """The quick budget run once through the CLI (one thread), then a second time into the same folder."""
    import torch

    out = tmp_path_factory.mktemp("study") / "quick"
    threads = torch.get_num_threads()  # --threads 1 sets torch's global thread count: restore it afterwards
    try:
        with pytest.MonkeyPatch.context() as mp:  # module scope: keep the parse cache out of the user's folder
            mp.setenv("FERLAB_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "ferlab-cache"))
            argv = ["study", "--budget", "quick", "--out", str(out), "--threads", "1", "--no-progress"]
            first = _run_cli(argv)
            runs_after_first = sorted(p.name for p in (out / "runs").iterdir())
            mtimes = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/best.safetensors")}
            second = _run_cli(argv)
    finally:
        torch.set_num_threads(threads)
    return {"out": out, "first": first, "second": second, "runs": runs_after_first, "mtimes": mtimes}


def _counts(text: str) -> tuple[int, int, int]:
    m = re.search(r"(\d+) runs trained, (\d+) resumed, (\d+) reused", text)
    assert m, text[-2000:]
    return int(m[1]), int(m[2]), int(m[3])


# ----------------------------------------------------------------------------- the quick budget end to end
def test_quick_study_trains_every_run_and_writes_the_report(quick_study):
    rc, text = quick_study["first"]
    n = len(get_budget("quick").experiments)
    assert rc == 0
    assert _counts(text) == (n, 0, 0)
    assert len(quick_study["runs"]) == n  # one run directory per experiment (distinct hashes)
    out = quick_study["out"]
    assert f"report: {out / 'report.html'}" in text
    md = (out / "report.md").read_text()
    for heading in ("## Q1", "## Q2", "## Q3", "## Q4", "## Q5", "## Q6", "## Ensembles", "## Stratified k-fold"):
        assert heading in md
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
        assert (out / link).is_file(), link
    q3 = md.split("## Q3")[1].split("## Q4")[0]
    assert "figures/q3-curves.png" in q3
    assert re.search(r"(Every cell had converged|Not every cell had converged): over (its|the) last \d+ epoch", q3)


def test_second_run_reuses_every_run(quick_study):
    rc, text = quick_study["second"]
    assert rc == 0
    n = len(get_budget("quick").experiments)
    assert _counts(text) == (0, 0, n)
    assert "training in" not in text
    for path, mtime in quick_study["mtimes"].items():
        assert path.stat().st_mtime_ns == mtime  # no checkpoint rewritten


def test_report_numbers_are_the_runs_numbers(quick_study):
    out = quick_study["out"]
    md = (out / "report.md").read_text()
    q1 = md.split("## Q1")[1].split("## Q2")[0]
    for run in (out / "runs").iterdir():
        spec = json.loads((run / "study.json").read_text())
        ev = json.loads((run / "eval.json").read_text())
        if spec["role"] == "q1":
            model = spec["name"].split("/")[1]
            row = next(line for line in q1.splitlines() if line.startswith(f"| {model} |"))
            assert f"{100 * ev['test']['accuracy']:.1f}%" in row
            assert f"{100 * ev['val']['accuracy']:.1f}%" in row
        if spec["role"] == "kfold":  # the held-out fold is part of train, disjoint from val and test
            probs = np.load(run / "probs-fold.npy")
            assert probs.shape == (ev["fold"]["n"], 7)


def test_html_is_self_contained(quick_study):
    page = (quick_study["out"] / "report.html").read_text()
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", page, re.I)
    assert not re.search(r"@import|url\(\s*['\"]?https?:", page, re.I)
    srcs = re.findall(r"<img\b[^>]*\bsrc=\"([^\"]*)\"", page)
    md = (quick_study["out"] / "report.md").read_text()
    assert len(srcs) == len(re.findall(r"!\[", md)) >= 9
    assert all(s.startswith("data:image/png;base64,") for s in srcs)


def test_report_renders_in_chromium(quick_study, browser):
    page_path = quick_study["out"] / "report.html"
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    errors: list[str] = []
    requests: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("request", lambda r: requests.append(r.url))
    try:
        page.goto(page_path.resolve().as_uri(), wait_until="load")
        images = page.evaluate("""() => Array.from(document.images).map(i => ({
            complete: i.complete, w: i.naturalWidth, h: i.naturalHeight, alt: i.alt}))""")
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "study.png"), full_page=True)
    finally:
        page.close()
    assert errors == []
    assert len(images) >= 9
    for img in images:
        assert img["complete"] and img["w"] > 0 and img["h"] > 0, img
    assert all(u.startswith(("file:", "data:")) for u in requests), requests
    assert (ARTIFACTS / "study.png").stat().st_size > 10_000


# ----------------------------------------------------------------------------- plan, cache, resume
def test_full_budget_requires_data(capsys):
    with pytest.raises(ValueError, match="--budget full trains on FER2013: pass --data"):
        plan_for("full")
    assert main(["study", "--budget", "full", "--out", "unused"]) == 2
    err = capsys.readouterr().err
    assert "ferlab study: error: --budget full trains on FER2013: pass --data PATH" in err
    assert not Path("unused").exists()


def test_full_budget_q1_recipes_are_the_shipped_configs():
    q1 = {e.cfg.model: e.cfg for e in get_budget("full").experiments if e.role == "q1"}
    for model, cfg in q1.items():
        assert cfg == TrainConfig.from_file(REPO / "configs" / f"{model}.toml"), model


def test_full_budget_ablation_recipe_is_the_shipped_config():
    exps = {e.name: e.cfg for e in get_budget("full").experiments}
    cfg = TrainConfig.from_file(REPO / "configs" / "r000-cnn1-6ep.toml")
    assert exps["q3/dataset-on/s0"] == cfg
    assert exps["kfold/1-of-5"] == cfg


def test_run_hash_of_a_fixed_config_never_changes():
    """Users' cached study runs are found by this hash: a new TrainConfig field must leave it as it is (add the
    field to HASHED_WHEN_SET with its default). Change these literals only together with CACHE_VERSION."""
    from ferlab.study.runner import CACHE_VERSION, run_hash

    cfg = TrainConfig(model="r002-vgg", epochs=30, seed=1, precision="bf16")  # the default before `auto`
    assert CACHE_VERSION == 1
    assert run_hash(Experiment("q1/x", "q1", cfg), "sha256:0123") == "43610ff7f89fd692"
    assert run_hash(Experiment("f/x", "kfold", cfg, tags={"fold": 2, "k": 5}), "sha256:0123") == "fb94ff2c1912488c"


def test_full_budget_shape():
    assert set(BUDGETS) == {"quick", "full", "long"}  # the CLI's --budget choices (literal: no torch import at parse)
    full = get_budget("full").experiments
    q3 = [e for e in full if e.role == "q3"]
    assert {(e.tags["normalize"], e.tags["augment"]) for e in q3} == {
        (n, a) for n in ("none", "unit", "image", "dataset") for a in ("off", "on")}
    assert sorted({e.tags["seed"] for e in q3}) == [0, 1] and len(q3) == 16
    assert [e.tags["fold"] for e in full if e.role == "kfold"] == list(range(5))
    (mlp,) = [e for e in full if e.role == "q2"]
    assert mlp.cfg.model_args == {"target": mlp.tags["matched_to"]}
    assert len({e.name for e in full}) == len(full)
    for budget in BUDGETS.values():  # every plan builds valid configs for both data modes
        assert len(plan_for(budget, "x.csv")) == len(budget.experiments)


def test_long_budget_is_the_full_one_with_the_ablation_at_full_length():
    full, long = ({e.name: e for e in get_budget(b).experiments} for b in ("full", "long"))
    assert full.keys() == long.keys()
    for name, e in long.items():
        if e.role in ("q1", "q2"):
            assert e == full[name]  # the same runs: a study's cache and --adopt serve both budgets
        else:
            assert e.cfg.model == "r000-cnn1" and e.cfg.model_args == {}  # the report's net, dropout on
            assert e.cfg.epochs == 100 and e.tags == full[name].tags


def test_run_hash_covers_what_is_learnt_only():
    from ferlab.study.runner import run_hash

    e = get_budget("quick").experiments[0]
    h = run_hash(e, "fp1")
    assert run_hash(dataclasses.replace(e, cfg=dataclasses.replace(e.cfg, threads=1, data="else")), "fp1") == h
    assert run_hash(e, "fp2") != h
    assert run_hash(dataclasses.replace(e, cfg=dataclasses.replace(e.cfg, lr=1e-3)), "fp1") != h
    fold = dataclasses.replace(e, role="kfold", tags={"fold": 0, "k": 3})
    assert run_hash(fold, "fp1") != run_hash(dataclasses.replace(fold, tags={"fold": 1, "k": 3}), "fp1")


TINY_SYN = {"n_train": 140, "n_val": 70, "n_test": 70, "seed": 3}


def _tiny_budget(**cfg_over) -> Budget:
    cfg = TrainConfig(**{"model": "mlp-matched", "model_args": {"target": 20_815, "depth": 1}, "epochs": 3,
                         "batch_size": 32, "synthetic": TINY_SYN, "augment": "none", "precision": "fp32", **cfg_over})
    return Budget("tiny", "one MLP", (Experiment("q2/mlp", "q2", cfg),), synthetic=TINY_SYN)


def test_interrupted_run_resumes(tmp_path):
    from ferlab.data.synthetic import make_synthetic
    from ferlab.study.runner import run_hash, run_study
    from ferlab.train.fit import fit

    budget = _tiny_budget()
    (exp,) = budget.experiments
    run_dir = tmp_path / "out" / "runs" / run_hash(exp, make_synthetic(**TINY_SYN).fingerprint)
    fit(exp.cfg, run_dir, progress=False, stop_after=1, log=lambda s: None)  # interrupted after epoch 1
    lines: list[str] = []
    study = run_study(budget, tmp_path / "out", threads=1, progress=False, log=lines.append)
    assert study.counts == {"trained": 0, "resumed": 1, "reused": 0}
    assert any("resuming" in line for line in lines)
    (res,) = study.results
    assert res.run_dir == run_dir and res.summary["finished"] and len(res.history) == 3
    again = run_study(budget, tmp_path / "out", threads=1, progress=False, log=lines.append)
    assert again.counts == {"trained": 0, "resumed": 0, "reused": 1}
    assert again.results[0].evaluation == res.evaluation


def test_adopt_finished_runs_trained_elsewhere(tmp_path):
    from ferlab.study.runner import run_study
    from ferlab.train.fit import fit

    budget = _tiny_budget()
    (exp,) = budget.experiments
    quiet = {"progress": False, "log": lambda s: None}
    fit(dataclasses.replace(exp.cfg, threads=1), tmp_path / "same", **quiet)  # same recipe, other thread count
    fit(dataclasses.replace(exp.cfg, lr=1e-3), tmp_path / "other", **quiet)  # another recipe
    fit(exp.cfg, tmp_path / "unfinished", stop_after=1, **quiet)
    lines: list[str] = []
    with pytest.raises(ValueError, match="has not finished"):
        run_study(budget, tmp_path / "out", progress=False, log=lines.append, adopt=[tmp_path / "unfinished"])
    study = run_study(budget, tmp_path / "out", progress=False, log=lines.append,
                      adopt=[tmp_path / "other", tmp_path / "same"])
    assert study.counts == {"trained": 0, "resumed": 0, "reused": 1}
    assert any("other: its config or data match no experiment" in line for line in lines)
    assert any("same: adopted as q2/mlp" in line for line in lines)
    assert study.results[0].history == _history_of(tmp_path / "same")


def test_adopt_a_fold_run_trained_where_the_test_rows_never_were(tmp_path):
    """bench/gpu_campaign.py trains k-fold runs from a pack of train + val: the study adopts them as its folds."""
    from ferlab.data.synthetic import make_synthetic
    from ferlab.study.folds import fold_fingerprint, fold_indices, write_fold
    from ferlab.study.runner import run_study
    from ferlab.train.fit import fit

    cfg = _tiny_budget().experiments[0].cfg
    budget = Budget("tiny-k", "2 folds", tuple(Experiment(f"kfold/{i + 1}-of-2", "kfold", cfg, {"fold": i, "k": 2})
                                             for i in range(2)), synthetic=TINY_SYN, kfold=2)
    data = make_synthetic(**TINY_SYN)
    trainval = data.subset(np.flatnonzero(data.split != "test"))  # what the GPU machine holds
    tr, _ = fold_indices(trainval, 2)[1][1]
    path = write_fold(trainval, tmp_path / "f2.ferpack", tr, trainval.indices("val"),
                      fold_fingerprint(data.fingerprint, 2, 1))
    quiet = {"progress": False, "log": lambda s: None}
    fit(dataclasses.replace(cfg, data=str(path), synthetic={}), tmp_path / "fold2", **quiet)
    fit(dataclasses.replace(cfg, data=str(path), synthetic={}, lr=1e-3), tmp_path / "other", **quiet)
    lines: list[str] = []
    study = run_study(budget, tmp_path / "out", progress=False, log=lines.append,
                      adopt=[tmp_path / "fold2", tmp_path / "other"])
    assert any("fold2: adopted as kfold/2-of-2" in line for line in lines)
    assert any("other: its config or data match no experiment" in line for line in lines)
    assert study.counts == {"trained": 1, "resumed": 0, "reused": 1}  # fold 1 trained here, fold 2 adopted
    (r1, r2) = study.results
    assert r2.status == "reused" and r2.history == _history_of(tmp_path / "fold2")
    assert r1.meta["data"]["fingerprint"] == fold_fingerprint(data.fingerprint, 2, 0)  # trained here: the same ids
    assert 0 <= r2.acc("fold") <= 1 and r2.evaluation["fold"]["n"] == len(fold_indices(data, 2)[1][1][1])


def test_an_auto_precision_experiment_adopts_a_run_of_either_precision(tmp_path):
    """A GPU resolves "auto" to bf16, a CPU without bf16 instructions to fp32: either run is the experiment."""
    from ferlab.study.runner import run_study
    from ferlab.train.fit import fit

    budget = _tiny_budget(precision="auto")
    (exp,) = budget.experiments
    fit(dataclasses.replace(exp.cfg, precision="fp32"), tmp_path / "fp32", progress=False, log=lambda s: None)
    lines: list[str] = []
    study = run_study(budget, tmp_path / "out", progress=False, log=lines.append, adopt=[tmp_path / "fp32"])
    assert any("fp32: adopted as q2/mlp" in line for line in lines), lines
    assert study.counts["reused"] == 1


def test_a_fold_run_interrupted_on_older_fold_data_trains_afresh(tmp_path):
    from ferlab.data.synthetic import make_synthetic
    from ferlab.study.folds import fold_indices, write_fold
    from ferlab.study.runner import run_hash, run_study
    from ferlab.train.fit import fit

    cfg = _tiny_budget().experiments[0].cfg
    budget = Budget("tiny-k", "2 folds", tuple(Experiment(f"kfold/{i + 1}-of-2", "kfold", cfg, {"fold": i, "k": 2})
                                             for i in range(2)), synthetic=TINY_SYN, kfold=2)
    data = make_synthetic(**TINY_SYN)
    tr, _ = fold_indices(data, 2)[1][0]
    old = write_fold(data, tmp_path / "old.ferpack", tr, data.indices("val"), "0123456789abcdef")
    run_dir = tmp_path / "out" / "runs" / run_hash(plan_for(budget)[0], data.fingerprint)
    fit(dataclasses.replace(cfg, data=str(old), synthetic={}), run_dir, progress=False, stop_after=1,
        log=lambda s: None)
    lines: list[str] = []
    study = run_study(budget, tmp_path / "out", progress=False, log=lines.append)
    assert any("its fold data changed" in line for line in lines)
    assert study.counts == {"trained": 2, "resumed": 0, "reused": 0}
    assert study.results[0].meta["data"]["fingerprint"] != "0123456789abcdef"


def test_cli_adopt_reaches_the_study_before_any_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FERLAB_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")  # a run directory whose summary.json never came
    for run, message in ((tmp_path / "missing", "missing: not a run directory"),
                         (tmp_path / "half", "half: the run has not finished")):
        assert main(["study", "--budget", "quick", "--out", str(tmp_path / "out"), "--adopt", str(run),
                     "--no-progress"]) == 2
        assert message in capsys.readouterr().err
    assert not list((tmp_path / "out").glob("runs/*/best.safetensors"))  # refused before training anything


def _history_of(run_dir: Path) -> list[dict[str, float]]:
    from ferlab.train.fit import read_history

    return read_history(run_dir)


def test_fold_files_hold_the_folds(tmp_path):
    from ferlab.data.source import open_data
    from ferlab.data.synthetic import make_synthetic
    from ferlab.study.folds import fold_fingerprint, fold_indices, write_fold

    data = make_synthetic(n_train=70, n_val=21, n_test=14, seed=5)
    base, folds = fold_indices(data, 3)
    held = np.concatenate([ho for _, ho in folds])
    assert sorted(held.tolist()) == base["train"].tolist()  # the held-out folds partition train
    for tr, ho in folds:
        assert not set(tr) & set(ho) and len(tr) + len(ho) == len(base["train"])
        assert np.bincount(data.labels[ho], minlength=7).min() >= 1  # stratified: every class in every fold
    tr, ho = folds[1]
    fp = fold_fingerprint(data.fingerprint, 3, 1)
    assert len({fp, fold_fingerprint(data.fingerprint, 3, 0), fold_fingerprint("other", 3, 1),
                fold_fingerprint(data.fingerprint, 3, 1, split_seed=1)}) == 4
    path = write_fold(data, tmp_path / "f.ferpack", tr, base["val"], fp)
    loaded = open_data(str(path), progress=False)
    assert loaded.fingerprint == fp and not len(loaded.indices("test"))  # no test rows: training never needs them
    for split, idx in (("train", tr), ("val", base["val"])):
        rows = loaded.indices(split)
        np.testing.assert_array_equal(loaded.images[rows], data.images[idx])
        np.testing.assert_array_equal(loaded.labels[rows], data.labels[idx])


def test_folds_are_the_same_without_the_test_rows(tmp_path):
    """A GPU machine holds FER2013's Training and PublicTest only: its folds must be the study's, row for row."""
    from ferlab.data.source import open_data
    from ferlab.data.synthetic import make_synthetic
    from ferlab.study.folds import fold_indices, write_fold

    data = make_synthetic(n_train=70, n_val=21, n_test=14, seed=5)
    trainval = data.subset(np.flatnonzero(data.split != "test"))
    for i, ((tr, _), (tr2, _)) in enumerate(zip(fold_indices(data, 3)[1], fold_indices(trainval, 3)[1],
                                                 strict=True)):
        a = open_data(str(write_fold(data, tmp_path / f"a{i}.ferpack", tr, data.indices("val"), "fp")),
                      progress=False)
        b = open_data(str(write_fold(trainval, tmp_path / f"b{i}.ferpack", tr2, trainval.indices("val"), "fp")),
                      progress=False)
        np.testing.assert_array_equal(a.images, b.images)
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_array_equal(a.split, b.split)


def test_the_overfitting_sentence_names_a_larger_gap_only_when_there_is_one():
    from ferlab.study.report import gap_sentence

    assert "neither shows overfitting" in gap_sentence(-0.001, -0.12)  # both at or below val: no claim
    assert "-0.1 points for the MLP and -12.0 for the CNN" in gap_sentence(-0.001, -0.12)
    assert "about the same gap" in gap_sentence(0.051, 0.048)
    assert gap_sentence(0.02, 0.09).endswith("is the CNN's.") and gap_sentence(0.09, -0.02).endswith("the MLP's.")


def test_late_gain_measures_the_last_fifth_of_a_curve():
    from ferlab.study.report import late_gain

    assert late_gain([50, 60, 70, 71, 71.2, 71.3, 71.3, 71.4, 71.4, 71.9]) == pytest.approx((0.5, 2))  # 71.9 - 71.4
    assert late_gain([50, 60, 70, 80, 90]) == pytest.approx((10.0, 1))
    assert late_gain([70, 72, 71, 69, 68]) == pytest.approx((0.0, 1))  # a falling tail gains nothing
    assert late_gain([60]) == (0.0, 1)


def test_wilson_interval_and_comparison_wording():
    from ferlab.study.report import compare_phrase, wilson95

    lo, hi = wilson95(0.0, 13)
    assert lo == 0.0 and hi == pytest.approx(1.96**2 / (13 + 1.96**2))  # closed form at p = 0
    lo, hi = wilson95(0.5, 100)
    assert (lo + hi) / 2 == pytest.approx(0.5) and hi - lo == pytest.approx(2 * 1.96 * 0.05 / (1 + 1.96**2 / 100)
                                                                           * np.sqrt(1 + 1.96**2 / 100), rel=1e-6)
    assert "within" in compare_phrase(0.01, 0.05, "A", "B")
    assert compare_phrase(-0.10, 0.05, "A", "B").startswith("B is 10.0 points more accurate than A")


def test_time_estimates_come_from_the_generated_calibration(monkeypatch, tmp_path):
    import json

    from ferlab.study import plan

    cal = plan.calibration()
    assert cal["command"].startswith("python bench/train_speed.py --study-calibration") and cal["cpu"]
    for budget in ("full", "long"):  # every recipe of the FER2013 budgets is measured
        for e in plan.plan_for(plan.get_budget(budget), "fer2013.csv.gz"):
            assert plan.model_key(e.cfg.model, e.cfg.model_args) in cal["images_per_s"], e.name
    fake = tmp_path / "throughput.json"
    fake.write_text(json.dumps({**cal, "images_per_s": {"fer-resnet-s": 100.0}, "two_core_speedup": 2.0}))
    monkeypatch.setattr(plan, "CALIBRATION", fake)
    plan.calibration.cache_clear()
    try:
        assert plan.images_per_second("fer-resnet-s") == 100.0
        assert plan.images_per_second("fer-resnet-s", cores=2) == 200.0
    finally:
        plan.calibration.cache_clear()
