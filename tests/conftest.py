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


# The slow tier (`pytest -m "not slow"` leaves it out; CI runs everything): tests that train beyond the one shared
# tiny run, start servers or browsers, run the study or a benchmark script, or read the real FER2013.
SLOW_MODULES = {"test_study", "test_serve", "test_serve_load", "test_distributed", "test_resume", "test_recipes",
                "test_distill", "test_time_to_accuracy", "test_fast_path_accuracy", "test_ship_model",
                "test_gpu_campaign"}
SLOW_FIXTURES = {"trained_run", "server", "browser", "quick_study", "fer2013_path"}


FER2013_USAGE = {"train": "Training", "val": "PublicTest", "test": "PrivateTest"}


def write_fer_dirs(root: Path, sizes: tuple[int, int, int] = (300, 80, 80)) -> tuple[Path, Path]:
    """Write ``ROOT/fer2013/fer2013.csv`` of synthetic faces (train, val, test ``sizes``) and
    ``ROOT/ferplus/fer2013new.csv`` voting their labels with a stray vote or two, with row 1 voted not-a-face, row 2 a
    tie between Fear and unknown, and row 3 voted Contempt; returns both paths."""
    import numpy as np

    from ferlab.data.ferplus import COLUMNS, TO_FERLAB
    from ferlab.data.synthetic import make_synthetic

    (root / "fer2013").mkdir(parents=True)
    (root / "ferplus").mkdir()
    d = make_synthetic(*sizes, seed=3)
    rng = np.random.default_rng(0)
    pix = [" ".join(map(str, img.ravel())) for img in d.images]
    (root / "fer2013" / "fer2013.csv").write_text("emotion,pixels,Usage\n" + "".join(
        f"{lab},{p},{FER2013_USAGE[s]}\n" for lab, p, s in zip(d.labels, pix, d.split, strict=True)))
    votes = []
    for lab in d.labels:  # ten votes whose majority is the row's label
        v = [0] * len(COLUMNS)
        v[TO_FERLAB.index(int(lab))] = 7
        for _ in range(3):
            v[int(rng.integers(0, 8))] += 1
        votes.append(v)
    votes[1] = [1, 0, 0, 0, 0, 0, 0, 0, 0, 9]
    votes[2] = [0, 0, 0, 0, 0, 0, 5, 0, 5, 0]
    votes[3] = [2, 0, 0, 0, 0, 0, 0, 8, 0, 0]
    (root / "ferplus" / "fer2013new.csv").write_text("Usage,Image name," + ",".join(COLUMNS) + "\n" + "".join(
        f"{FER2013_USAGE[s]},fer{i:07d}.png," + ",".join(map(str, v)) + "\n"
        for i, (s, v) in enumerate(zip(d.split, votes, strict=True))))
    return root / "fer2013" / "fer2013.csv", root / "ferplus" / "fer2013new.csv"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1] if getattr(item, "module", None) else ""
        if module in SLOW_MODULES or SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


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


@pytest.fixture
def weights(tmp_path, monkeypatch) -> Path:
    """An empty folder of shipped weights (``FERLAB_WEIGHTS_DIR``), for tests that ship or list models."""
    d = tmp_path / "weights"
    d.mkdir()
    monkeypatch.setenv("FERLAB_WEIGHTS_DIR", str(d))
    return d


@pytest.fixture(scope="session")
def trained_tiny_run(tmp_path_factory) -> Path:
    """A fer-resnet-s run trained 4 epochs on LEARN_SYNTHETIC (well above chance): for tests that need a model.

    Shared by the whole session; tests must not write into it (copy it first).
    """
    from ferlab.train.fit import fit

    run = tmp_path_factory.mktemp("shared-run") / "run"
    cfg = TrainConfig(model="fer-resnet-s", epochs=4, batch_size=64, synthetic=LEARN_SYNTHETIC, augment="flip",
                      schedule="cosine", precision="fp32")
    fit(cfg, run, progress=False)
    return run


CHROMIUM = os.environ.get("FERLAB_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="session")
def browser():
    """A headless Chromium (Debian's package) driven by Playwright.

    Skips when Chromium or Playwright is missing, unless FERLAB_REQUIRE_BROWSER=1 (set by CI), where it fails.
    """
    required = os.environ.get("FERLAB_REQUIRE_BROWSER") == "1"
    missing = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing = "playwright is not installed (pip install -e '.[test]')"
    if missing is None and not Path(CHROMIUM).is_file():
        missing = f"no Chromium at {CHROMIUM} (apt-get install chromium, or set FERLAB_CHROMIUM)"
    if missing:
        if required:
            pytest.fail(missing)
        pytest.skip(missing)
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


ARTIFACTS = Path(os.environ.get("FERLAB_TEST_ARTIFACTS", REPO / "test-artifacts"))
