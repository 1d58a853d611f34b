"""The corruption benchmark: seeded, shape-preserving corruptions that grow with severity, and the benchmark's
clean accuracy equal to `ferlab evaluate`'s on the same faces."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ferlab.cli import main
from ferlab.corruptions import CORRUPTIONS, SEVERITIES, contrast, corrupt
from ferlab.robustness import sample_rows


@pytest.fixture(scope="module")
def faces() -> np.ndarray:
    from ferlab.data.source import open_data

    return open_data(None, synthetic={"n_train": 120, "n_val": 8, "n_test": 8, "seed": 3}).images[:120]  # (N, 48, 48)


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_each_corruption_is_seeded_keeps_the_shape_and_grows_with_severity(name, faces):
    change = []
    for s in SEVERITIES:
        out = corrupt(faces, name, s, seed=7)
        assert out.shape == faces.shape and out.dtype == np.uint8
        assert np.array_equal(out, corrupt(faces, name, s, seed=7))  # same seed, same benchmark
        change.append(np.abs(out.astype(float) - faces).mean())
    assert change[0] > 0.5  # severity 1 already changes the faces
    assert all(a < b for a, b in zip(change, change[1:], strict=False)), f"{name}: {change}"
    assert corrupt(faces[:, None], name, 3, seed=7).shape == (len(faces), 1, 48, 48)  # (N, 1, H, W) works too


def test_the_cells_do_not_depend_on_which_others_are_built(faces):
    a = corrupt(faces, "occlusion", 2, seed=1)
    corrupt(faces, "gaussian_noise", 5, seed=1)  # drawing other cells does not move this one
    assert np.array_equal(a, corrupt(faces, "occlusion", 2, seed=1))
    assert not np.array_equal(a, corrupt(faces, "occlusion", 2, seed=2))


def test_contrast_keeps_each_face_mean():
    x = np.random.default_rng(0).integers(60, 200, (5, 48, 48), dtype=np.uint8)
    out = contrast(x, 0.3, np.random.default_rng(0))
    assert np.allclose(out.mean((1, 2)), x.mean((1, 2)), atol=0.6)
    assert out.std() < x.std() * 0.35


def test_bad_requests_name_the_problem(faces):
    with pytest.raises(ValueError, match="unknown corruption 'fog'"):
        corrupt(faces, "fog", 1)
    with pytest.raises(ValueError, match="severity must be one of"):
        corrupt(faces, "jpeg", 6)
    with pytest.raises(ValueError, match="uint8"):
        corrupt(faces.astype(np.float32), "jpeg", 1)


def test_sample_rows_is_seeded_and_sorted():
    rows = np.arange(100, 200)
    a = sample_rows(rows, 10, seed=0)
    assert len(a) == 10 and np.array_equal(a, np.sort(a)) and np.array_equal(a, sample_rows(rows, 10, seed=0))
    assert not np.array_equal(a, sample_rows(rows, 10, seed=1))
    assert np.array_equal(sample_rows(rows, None), rows) and np.array_equal(sample_rows(rows, 500), rows)


def test_cli_benchmark_clean_accuracy_is_evaluates(trained_tiny_run, capsys):
    assert main(["evaluate", str(trained_tiny_run), "--split", "val", "--json"]) == 0
    want = json.loads(capsys.readouterr().out)["accuracy"]
    assert main(["robustness", str(trained_tiny_run), "--split", "val", "--faces", "0",
                 "--corruptions", "jpeg", "rotate", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["clean"] == pytest.approx(want)
    assert set(report["cells"]) == {"jpeg", "rotate"} and all(len(v) == 5 for v in report["cells"].values())
    assert report["mean_corruption"] == pytest.approx(np.mean([a for v in report["cells"].values() for a in v]))
    assert main(["robustness", str(trained_tiny_run), "--split", "val", "--faces", "20", "--corruptions",
                 "jpeg", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "20 faces, seed 0" in text and "relative drop" in text and "jpeg" in text
