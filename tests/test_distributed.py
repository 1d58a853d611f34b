"""DistributedDataParallel under torchrun: 2 CPU processes (gloo) on this machine.

What must hold:
- the ranks stay in sync: ``summary['rank_spread']``, the largest difference of any weight or buffer between
  ranks (an all-reduce MAX minus MIN inside fit), is exactly 0;
- only rank 0 writes files; a resumed distributed run ends where an uninterrupted one does;
- with the same global batch, 2 processes compute what 1 process computes.

For the last point the model has no BatchNorm and no dropout (mlp-matched), augmentation is off and the
optimiser is plain SGD, fp32. Then each step's averaged gradient over two half-batches is the full batch's
mean gradient up to float summation order (~1e-7 relative), and SGD passes such differences on linearly.
BatchNorm nets cannot match exactly on CPU: SyncBatchNorm is CUDA-only in PyTorch (it raises on CPU tensors),
so each rank normalises with the statistics of its own half-batch, as plain DDP does. AdamW is avoided
because it divides by sqrt(v): a gradient that is ~0 up to rounding becomes a full +-lr step. ReLU convnets
drift further (measured: r000-cnn1 without dropout, 8 steps at peak lr 0.05: 7e-5) because a rounding-level
difference can flip a pre-activation across 0; the MLP measured 7e-9 after 8 steps, tested at 1e-6.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ferlab.checkpoint import LAST_STATE, load_state
from ferlab.models import create_model
from ferlab.train.config import TrainConfig
from ferlab.train.engine import epoch_batches, steps_per_epoch, train_one_epoch
from ferlab.train.fit import fit
from ferlab.transforms import AUGMENT_PRESETS, Normalizer

SMALL = {"n_train": 256, "n_val": 64, "n_test": 64}
TINY = {"n_train": 128, "n_val": 32, "n_test": 32}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _env(**extra: str) -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", **extra)


def _torchrun(args: list[str], timeout: int = 240, **env: str) -> subprocess.CompletedProcess:
    """Run torchrun with 2 workers; on a timeout the whole process group (launcher and workers) is killed."""
    proc = subprocess.Popen(TORCHRUN + args, env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"torchrun did not finish in {timeout} s:\n{out[-2000:]}\n{err[-2000:]}")
    res = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def test_epoch_batches_shard_the_same_permutation():
    """Rank slices of each global batch are disjoint, cover the epoch (cut to a multiple of world) and equal."""
    n, b, world = 103, 16, 2
    single = epoch_batches(n, b, torch.Generator().manual_seed(5))
    ranks = [epoch_batches(n, b, torch.Generator().manual_seed(5), r, world) for r in range(world)]
    assert len(single) == 7 and all(len(r) == steps_per_epoch(n, b, world) == 7 for r in ranks)
    for step in range(7):
        parts = [r[step] for r in ranks]
        assert len(parts[0]) == len(parts[1])
        # together the ranks hold the single-process batch (the last one cut from 7 to 6 images)
        assert torch.equal(torch.cat(parts), single[step][: len(parts[0]) * world])
    assert sum(len(p) for r in ranks for p in r) == 102
    with pytest.raises(ValueError, match="divisible"):
        epoch_batches(n, 15, torch.Generator(), 0, 2)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_a_last_batch_of_one_image_per_rank_is_dropped_and_counted(world):
    for b in (8, 16, 64):
        for n in range(b * world // 2, 3 * b + 2 * world):
            local = epoch_batches(n, b, torch.Generator().manual_seed(0), 0, world)
            assert len(local) == steps_per_epoch(n, b, world), (n, b)
            assert len(local) == 1 or len(local[-1]) >= 2, (n, b)


def test_a_dense_batchnorm_net_trains_when_one_image_is_left_over():
    model = create_model("r002-vgg")  # BatchNorm1d in its dense head cannot train on a batch of one
    images = torch.randint(0, 256, (17, 1, 48, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(17) % 7
    assert [len(b) for b in epoch_batches(17, 8, torch.Generator().manual_seed(0))] == [8, 8]
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    out = train_one_epoch(model, opt, images, labels, batch_size=8, aug=AUGMENT_PRESETS["none"],
                          normalizer=Normalizer("unit"), g=torch.Generator().manual_seed(0), precision="fp32",
                          channels_last=False, progress=False)
    assert out["n"] == 16


def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    cfg = TrainConfig(model="mlp-matched", epochs=2, batch_size=64, optimizer="sgd", lr=0.05, augment="none",
                      precision="fp32", synthetic=SMALL, schedule="onecycle")
    fit(cfg, tmp_path / "single", progress=False, log=lambda s: None)

    res = _torchrun(["-m", "ferlab", "train", "--model", "mlp-matched", "--epochs", "2", "--batch-size", "64",
                     "--optimizer", "sgd", "--lr", "0.05", "--augment", "none", "--fp32", "--schedule", "onecycle",
                     "--synthetic", json.dumps(SMALL), "--out", str(tmp_path / "ddp"), "--no-progress"])
    assert "training on 2 x cpu with DistributedDataParallel; global batch 64, 32 per process" in res.stdout
    assert res.stdout.count("epoch 2/2") == 1, "only rank 0 prints"
    summary = json.loads((tmp_path / "ddp/summary.json").read_text())
    assert summary["world_size"] == 2 and summary["finished"]
    assert summary["rank_spread"] == 0.0
    assert summary["train_images_per_epoch"] == SMALL["n_train"], "each image once per epoch, on one rank"

    one, two = load_state(tmp_path / "single" / LAST_STATE), load_state(tmp_path / "ddp" / LAST_STATE)
    assert one["model"].keys() == two["model"].keys()
    for k, w in one["model"].items():
        assert torch.allclose(w, two["model"][k], rtol=0, atol=1e-6), (k, (w - two["model"][k]).abs().max())
    for h1, h2 in zip(one["history"], two["history"], strict=True):
        assert h1["train_loss"] == pytest.approx(h2["train_loss"], abs=1e-5)
        assert h1["val_loss"] == pytest.approx(h2["val_loss"], abs=1e-5)
        assert h1["val_acc"] == pytest.approx(h2["val_acc"], abs=1e-9)
    best1, best2 = load_file(tmp_path / "single/best.safetensors"), load_file(tmp_path / "ddp/best.safetensors")
    assert all(torch.allclose(best1[k], best2[k], rtol=0, atol=1e-6) for k in best1)


WORKER = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    from ferlab.train.config import TrainConfig
    from ferlab.train.fit import fit

    base, cfg = Path(sys.argv[1]), TrainConfig.from_dict(json.loads(sys.argv[2]))
    rank = os.environ["RANK"]
    quiet = lambda s: None
    # each rank gets its own directory: rank 1 must write nothing and resume from rank 0's state alone
    ref = fit(cfg, base / f"ref-rank{rank}", progress=False, log=quiet)
    cut = fit(cfg, base / f"cut-rank{rank}", progress=False, stop_after=1, log=quiet)
    done = fit(cfg, base / f"cut-rank{rank}", resume=True, progress=False, log=quiet)
    # one report file per rank: the ranks' stdout lines can interleave
    (base / f"report-rank{rank}.json").write_text(json.dumps({
        "rank": int(rank), "spreads": [ref["rank_spread"], cut["rank_spread"], done["rank_spread"]],
        "finished": [ref["finished"], cut["finished"], done["finished"]]}))
""")


def test_batchnorm_net_with_augmentation_stays_in_sync_and_resumes(tmp_path):
    """fer-mobile (BatchNorm, dropout), flips: ranks identical; interrupted + resumed == uninterrupted."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    cfg = TrainConfig(model="fer-mobile", epochs=2, batch_size=32, augment="flip", precision="fp32",
                      synthetic=TINY, optimizer="adamw")
    _torchrun([str(script), str(tmp_path), json.dumps(cfg.to_dict())])
    reports = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("report-rank*.json"))]
    assert sorted(r["rank"] for r in reports) == [0, 1]
    for r in reports:
        assert r["spreads"] == [0.0, 0.0, 0.0]
        assert r["finished"] == [True, False, True]
    assert not (tmp_path / "ref-rank1").exists() and not (tmp_path / "cut-rank1").exists()
    ref, cut = load_state(tmp_path / "ref-rank0" / LAST_STATE), load_state(tmp_path / "cut-rank0" / LAST_STATE)
    for k, w in ref["model"].items():
        assert torch.equal(w, cut["model"][k]), k
    assert [h["val_acc"] for h in ref["history"]] == [h["val_acc"] for h in cut["history"]]


CLOCK_WORKER = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    from ferlab.train import fit as fit_module
    from ferlab.train.config import TrainConfig

    base, cfg = Path(sys.argv[1]), TrainConfig.from_dict(json.loads(sys.argv[2]))
    rank = os.environ["RANK"]
    if rank == "1":  # rank 1's clock says the time is up at once; rank 0's never does
        fit_module.out_of_time = lambda limit, elapsed, epoch_seconds: bool(epoch_seconds)
    summary = fit_module.fit(cfg, base / f"run-rank{rank}", progress=False, log=lambda s: None)
    (base / f"report-rank{rank}.json").write_text(json.dumps(
        {"epochs_run": summary["epochs_run"], "spread": summary["rank_spread"]}))
""")


def test_rank_0_decides_the_time_limit_for_every_rank(tmp_path):
    """Each rank's clock differs (rank 0 also writes the files): the ranks stop at rank 0's epoch together."""
    script = tmp_path / "worker.py"
    script.write_text(CLOCK_WORKER)
    cfg = TrainConfig(model="mlp-matched", epochs=3, batch_size=32, augment="none", precision="fp32",
                      synthetic=TINY, time_limit=3600.0)
    _torchrun([str(script), str(tmp_path), json.dumps(cfg.to_dict())])
    reports = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("report-rank*.json"))]
    assert reports == [{"epochs_run": 3, "spread": 0.0}] * 2


FERLAB_SCRIPT = Path(sys.executable).parent / "ferlab"


@pytest.mark.skipif(not FERLAB_SCRIPT.is_file(), reason="the ferlab console script is not installed")
def test_console_script_runs_under_torchrun(tmp_path):
    """`torchrun $(which ferlab) train ...`: the launcher re-executes itself with jemalloc; torchrun keeps the pid."""
    _torchrun([str(FERLAB_SCRIPT), "train", "--model", "mlp-matched", "--epochs", "1", "--batch-size", "64",
               "--synthetic", json.dumps(TINY), "--out", str(tmp_path / "run"), "--no-progress"])
    assert json.loads((tmp_path / "run/summary.json").read_text())["world_size"] == 2
