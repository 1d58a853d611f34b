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
                "test_distill", "test_time_to_accuracy", "test_fast_path_accuracy", "test_ship_model"}
SLOW_FIXTURES = {"trained_run", "server", "browser", "quick_study", "fer2013_path"}


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
