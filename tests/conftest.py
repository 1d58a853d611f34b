"""Shared test fixtures: tiny configs on the embedded synthetic data, and the real FER2013 path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ferlab.train.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
FER2013 = Path(os.environ.get("FERLAB_FER2013", REPO.parent / "shared/data/fer2013/fer2013.csv.gz"))

# Small and fast: for tests of mechanics (resume, checkpoints), not of learning.
TINY_SYNTHETIC = {"n_train": 512, "n_val": 128, "n_test": 128}
# Large enough for fer-resnet-s to learn clearly in 4 epochs (about 15 s on 2 cores).
LEARN_SYNTHETIC = {"n_train": 1500, "n_val": 300, "n_test": 300}


def tiny_config(**kw) -> TrainConfig:
    base = dict(model="fer-resnet-s", epochs=3, batch_size=64, synthetic=TINY_SYNTHETIC,
                precision="fp32", augment="standard")
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture
def fer2013_path() -> Path:
    if not FER2013.is_file():
        pytest.skip(f"real FER2013 not found at {FER2013} (set FERLAB_FER2013 to its path to run this test)")
    return FER2013


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # Tests never write to the user's cache.
    monkeypatch.setenv("FERLAB_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "ferlab-cache"))
