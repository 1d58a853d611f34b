"""bench/fast_path_accuracy.py on a tiny synthetic run: both modes train, and the printout is the runs' numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from ferlab.evaluate import evaluate_checkpoints
from ferlab.train.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]


def test_fast_path_accuracy_trains_both_modes_and_reports_their_numbers(tmp_path):
    out = tmp_path / "runs"
    cmd = [sys.executable, str(REPO / "bench/fast_path_accuracy.py"),
           "--config", str(REPO / "configs/r000-cnn1-6ep.toml"),
           "--epochs", "1", "--seeds", "0", "--synthetic", json.dumps({"n_train": 128, "n_val": 64, "n_test": 64}),
           "--out", str(out), "--json"]
    res = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    result = json.loads(res.stdout[res.stdout.index("\n{") + 1:])
    for mode, (precision, channels_last) in {"fp32": ("fp32", False), "fast": ("bf16", True)}.items():
        run = out / f"{mode}-s0"
        cfg = TrainConfig.from_dict(json.loads((run / "config.json").read_text())["train"])
        assert (cfg.precision, cfg.channels_last, cfg.seed) == (precision, channels_last, 0)
        (r,) = result["runs"][mode]
        assert r["test_acc"] == evaluate_checkpoints([run], split="test", progress=False)["accuracy"]
        assert r["val_acc"] == json.loads((run / "summary.json").read_text())["best_val_acc"]
    diff = result["runs"]["fast"][0]["test_acc"] - result["runs"]["fp32"][0]["test_acc"]
    assert result["test_acc_difference"] == diff
    assert "fast - fp32 test accuracy" in res.stdout
    # a second call reuses the finished runs
    again = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0 and json.loads(again.stdout[again.stdout.index("\n{") + 1:]) == result
    # a run of another config in the same folder is refused, not reused
    other = subprocess.run([*cmd[:cmd.index("--epochs") + 1], "2", *cmd[cmd.index("--epochs") + 2:]],
                           env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert other.returncode == 1 and "holds a run of another config (differs in epochs)" in other.stderr
