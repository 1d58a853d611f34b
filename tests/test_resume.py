"""A run killed at any moment and resumed ends where an uninterrupted run would."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import TINY_SYNTHETIC, tiny_config
from safetensors.torch import load_file

from ferlab.checkpoint import LAST_STATE, CheckpointError, load_state
from ferlab.train.fit import fit, format_eta, out_of_time


def final_weights(run_dir) -> dict[str, torch.Tensor]:
    return load_state(run_dir / LAST_STATE)["model"]


def assert_same_weights(a: dict, b: dict) -> None:
    """Bit for bit: a resumed run replays the same batches, augmentation and optimizer steps on the same threads."""
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_stop_and_resume_equals_uninterrupted(tmp_path):
    cfg = tiny_config(epochs=3)
    ref_log: list[str] = []
    fit(cfg, tmp_path / "ref", progress=False, log=ref_log.append)
    part = fit(cfg, tmp_path / "cut", progress=False, stop_after=1, log=lambda s: None)
    assert not part["finished"] and part["epochs_run"] == 1
    cut_log: list[str] = []
    done = fit(cfg, tmp_path / "cut", resume=True, progress=False, log=cut_log.append)
    assert done["finished"] and done["epochs_run"] == 3
    # every epoch line but the last says how long the rest of the run will take, a resumed run's too
    assert [("| eta " in m) for m in ref_log if m.startswith("epoch ")] == [True, True, False]
    assert [("| eta " in m) for m in cut_log if m.startswith("epoch ")] == [True, False]
    assert_same_weights(final_weights(tmp_path / "ref"), final_weights(tmp_path / "cut"))
    h_ref = (tmp_path / "ref/history.csv").read_text().splitlines()
    h_cut = (tmp_path / "cut/history.csv").read_text().splitlines()
    assert len(h_ref) == len(h_cut) == 4
    # the best checkpoint is the same too
    assert_same_weights(load_file(tmp_path / "ref/best.safetensors"), load_file(tmp_path / "cut/best.safetensors"))


def _train_cmd(out, epochs: int) -> list[str]:
    return [sys.executable, "-m", "ferlab", "train", "--model", "fer-resnet-s", "--epochs", str(epochs),
            "--batch-size", "64", "--precision", "fp32", "--out", str(out), "--no-progress", "--seed", "3",
            "--synthetic", json.dumps(TINY_SYNTHETIC)]


def test_sigkill_then_resume_matches_uninterrupted_cli(tmp_path):
    """Kill the real CLI process with SIGKILL mid-run, resume it, compare with an uninterrupted run."""
    env = dict(os.environ)
    epochs = 4
    ref = subprocess.run(_train_cmd(tmp_path / "ref", epochs), env=env, capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr

    proc = subprocess.Popen(_train_cmd(tmp_path / "cut", epochs), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    state = tmp_path / "cut" / LAST_STATE
    deadline = time.time() + 300
    while not state.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)  # somewhere inside the next epoch
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert state.exists()
    killed_after = load_state(state)["epoch"] + 1
    assert killed_after < epochs, "the run finished before it could be killed; the test proves nothing"

    res = subprocess.run([sys.executable, "-m", "ferlab", "train", "--resume", str(tmp_path / "cut"), "--no-progress"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert f"resuming {tmp_path / 'cut'} after epoch {killed_after}" in res.stdout
    assert_same_weights(final_weights(tmp_path / "ref"), final_weights(tmp_path / "cut"))


def test_format_eta():
    assert [format_eta(s) for s in (0, 41.6, 60, 249, 3599.4, 3600, 3900, 11 * 3600 + 59)] == [
        "0s", "42s", "1m00s", "4m09s", "59m59s", "1h00m", "1h05m", "11h00m"]


def test_resuming_with_other_options_is_refused(tmp_path):
    fit(tiny_config(epochs=3), tmp_path / "run", progress=False, stop_after=1, log=lambda s: None)
    with pytest.raises(CheckpointError, match=r"other training options than these \(epochs: 3 -> 4\)"):
        fit(tiny_config(epochs=4), tmp_path / "run", resume=True, progress=False, log=lambda s: None)
    # the thread count and the evaluation batch size change nothing a run learns
    assert fit(tiny_config(epochs=3, threads=1, eval_batch_size=256), tmp_path / "run", resume=True,
               progress=False, log=lambda s: None)["finished"]


def test_out_of_time_judges_by_the_slowest_recent_epoch():
    assert not out_of_time(0, 1e9, [1.0])  # 0: no limit
    assert not out_of_time(10, 50, [])  # the first epoch of a call always runs
    assert out_of_time(10, 8, [1, 3]) and not out_of_time(10, 6, [1, 3])
    assert not out_of_time(10, 6, [9, 1, 1, 1])  # only the last three epochs count


def test_time_limit_stops_cleanly_and_a_resume_takes_another(tmp_path):
    from ferlab.cli import main

    log: list[str] = []
    s = fit(tiny_config(epochs=3, time_limit=1e-3), tmp_path / "r", progress=False, log=log.append)
    assert s["out_of_time"] and not s["finished"] and s["epochs_run"] == 1
    assert any(m.startswith("time limit:") and f"--resume {tmp_path / 'r'}" in m for m in log)
    # how a call runs is not what the run learns: a resume may set its own limit (here none) and threads
    assert main(["train", "--resume", str(tmp_path / "r"), "--no-progress", "--threads", "1"]) == 0
    s = json.loads((tmp_path / "r/summary.json").read_text())
    assert s["finished"] and s["epochs_run"] == 3 and not s["out_of_time"]


def test_curves_are_redrawn_at_most_every_so_often_and_always_at_the_end(tmp_path, monkeypatch):
    from ferlab.plots import plot_history
    from ferlab.train import fit as fit_module

    drawn = []
    monkeypatch.setattr(fit_module, "PLOT_EVERY_S", 3600.0)  # one drawing during the run, then the last
    monkeypatch.setattr("ferlab.plots.plot_history", lambda h, p, **kw: drawn.append(len(h)) or plot_history(h, p))
    summary = fit_module.fit(tiny_config(model="r004-dnn", epochs=3), tmp_path / "run", progress=False)
    assert summary["epochs_run"] == 3 and drawn == [1, 3]
    assert (tmp_path / "run" / "curves.png").is_file()
    assert len(fit_module.read_history(tmp_path / "run")) == 3
