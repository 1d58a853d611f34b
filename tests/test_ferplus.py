"""FER+ labels: the vote rules, the file checks, training on 8 classes and scoring across label sources."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FER2013, REPO, write_fer_dirs

from ferlab.data.ferplus import (
    FERPLUS_CLASS_NAMES,
    TO_FERLAB,
    apply_labels,
    distribution,
    find_votes,
    majority,
    read_votes,
    relabel,
)
from ferlab.data.formats import load_data
from ferlab.train.config import TrainConfig

FERPLUS = FER2013.parent.parent / "ferplus" / "fer2013new.csv"


@pytest.fixture(scope="module")
def fer_dirs(tmp_path_factory) -> tuple[Path, Path]:
    """``data/fer2013/fer2013.csv`` of synthetic faces and ``data/ferplus/fer2013new.csv`` voting their labels (see
    :func:`conftest.write_fer_dirs`)."""
    return write_fer_dirs(tmp_path_factory.mktemp("data"))


def test_majority_and_distribution_follow_the_written_rules():
    votes = np.array([
        [4, 0, 0, 1, 3, 2, 0, 0, 0, 0],  # neutral -> 6; the one sadness vote is an outlier
        [0, 0, 0, 0, 5, 5, 0, 0, 0, 0],  # anger/disgust tie -> the earlier column, anger -> 0
        [3, 0, 0, 0, 0, 0, 0, 0, 3, 0],  # tie with unknown -> dropped
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # no votes -> dropped
        [0, 1, 0, 0, 0, 0, 0, 1, 0, 0],  # only single votes: all kept
    ])
    assert majority(votes).tolist() == [6, 0, -1, -1, 3]
    dist = distribution(votes)  # ferlab order: Angry Disgust Fear Happy Sad Surprise Neutral Contempt
    np.testing.assert_allclose(dist[0], [3 / 9, 2 / 9, 0, 0, 0, 0, 4 / 9, 0], rtol=1e-6)
    np.testing.assert_allclose(dist[1], [0.5, 0.5, 0, 0, 0, 0, 0, 0])
    np.testing.assert_allclose(dist[3], np.zeros(8))
    np.testing.assert_allclose(dist[4], [0, 0, 0, 0.5, 0, 0, 0, 0.5])


def test_relabel_drops_unknown_and_not_a_face_and_keeps_the_split(fer_dirs):
    csv, votes_path = fer_dirs
    data = load_data(str(csv), progress=False)
    fp = relabel(data, read_votes(votes_path))
    assert fp.class_names == FERPLUS_CLASS_NAMES and len(fp.class_names) == 8
    assert len(fp) == len(data) - 2 and 1 not in fp.ids and 2 not in fp.ids
    assert fp.labels[fp.ids == 3][0] == 7  # Contempt
    keep = np.isin(data.ids, fp.ids)
    np.testing.assert_array_equal(fp.split, data.split[keep])
    np.testing.assert_array_equal(fp.images, data.images[keep])
    rest = (fp.ids > 3)
    assert (fp.labels[rest] == data.labels[keep][rest]).all()  # the votes were drawn around the FER2013 labels
    np.testing.assert_allclose(fp.targets.sum(1), 1.0, rtol=1e-6)
    assert fp.fingerprint != data.fingerprint


def test_the_votes_file_is_found_beside_the_data_and_checked(fer_dirs, tmp_path):
    csv, votes_path = fer_dirs
    assert find_votes("ferplus", str(csv)) == votes_path
    assert find_votes("ferplus", str(csv.parent)) == votes_path  # the data given as its folder
    with pytest.raises(FileNotFoundError, match="pass --labels"):
        find_votes("ferplus", str(tmp_path / "fer2013.csv"))
    with pytest.raises(ValueError, match="synthetic"):
        find_votes("ferplus", None)
    bad = tmp_path / "bad.csv"
    lines = votes_path.read_text().splitlines()
    bad.write_text("\n".join([lines[0], lines[1], lines[2].replace(",0,", ",x,", 1)]) + "\n")
    with pytest.raises(ValueError, match=r"bad.csv, line 3: a vote is not an integer"):
        read_votes(bad)
    bad.write_text("emotion,pixels,Usage\n0,1 2,Training\n")
    with pytest.raises(ValueError, match="not a FER\\+ votes file"):
        read_votes(bad)
    # a votes file whose Usage column disagrees with the data is refused, naming the row
    swapped = tmp_path / "swapped.csv"
    first = lines[1].split(",", 1)
    swapped.write_text("\n".join([lines[0], ("PrivateTest" if first[0] != "PrivateTest" else "Training") + ","
                                  + first[1], *lines[2:]]) + "\n")
    with pytest.raises(ValueError, match="row 2 is"):
        relabel(load_data(str(csv), progress=False), read_votes(swapped))


def test_soft_one_hot_targets_train_exactly_like_hard_labels():
    """Cross-entropy against one-hot distributions is cross-entropy against their class ids: same weights."""
    from ferlab.models import create_model
    from ferlab.train.engine import train_one_epoch
    from ferlab.transforms import AUGMENT_PRESETS, Normalizer

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (96, 1, 48, 48), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 8, (96,), generator=g)
    runs = []
    for labels in (y, torch.nn.functional.one_hot(y, 8).float()):
        torch.manual_seed(0)
        net = create_model("fer-mobile", num_classes=8)
        opt = torch.optim.SGD(net.parameters(), lr=0.05)
        out = train_one_epoch(net, opt, x, labels, batch_size=32, aug=AUGMENT_PRESETS["standard"],
                              normalizer=Normalizer.fit("unit", x.numpy()), g=torch.Generator().manual_seed(1),
                              mixup=0.2, label_smoothing=0.1, precision="fp32", progress=False)
        runs.append((out, [p.detach().clone() for p in net.parameters()]))
    (a, wa), (b, wb) = runs
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["acc"] == pytest.approx(b["acc"])
    for p, q in zip(wa, wb, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_label_mode_needs_ferplus_labels():
    with pytest.raises(ValueError, match="use it with labels = 'ferplus'"):
        TrainConfig(label_mode="crossentropy")
    with pytest.raises(ValueError, match="label_mode"):
        TrainConfig(labels="ferplus", label_mode="vote")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["crossentropy", "probability"])
def test_a_ferplus_run_has_8_classes_and_scores_across_label_sources(fer_dirs, tmp_path, mode):
    from ferlab.evaluate import evaluate_checkpoints
    from ferlab.inference.loader import load_model
    from ferlab.train.fit import fit

    csv, votes_path = fer_dirs
    run = tmp_path / "run"
    fit(TrainConfig(model="fer-mobile", epochs=1, batch_size=64, data=str(csv), labels="ferplus", label_mode=mode,
                    precision="fp32", augment="flip"), run, progress=False)
    loaded = load_model(str(run))
    assert list(loaded.class_names) == list(FERPLUS_CLASS_NAMES)
    assert loaded.meta["labels"]["sha256"] == read_votes(votes_path).sha256
    fp, _ = apply_labels(load_data(str(csv), progress=False), "ferplus", str(csv))
    # by default a FER+ model is scored on the FER+ labels it was trained on (the votes file it recorded)
    report = evaluate_checkpoints([run], split="test", progress=False)
    assert report["labels"] == "ferplus" and report["n"] == len(fp.indices("test"))
    # on FER2013's own 7 labels its Contempt output is dropped
    report7 = evaluate_checkpoints([run], split="test", labels="fer2013", progress=False)
    assert report7["labels"] == "source" and "Contempt output dropped" in report7["label_note"]
    assert len(report7["per_class"]) == 7
    # the training file under either label source is the training data
    assert report["members"][0]["same_data_as_training"] and report7["members"][0]["same_data_as_training"]


@pytest.mark.slow
def test_a_fer2013_model_scored_on_ferplus_leaves_out_contempt_faces(fer_dirs, tmp_path):
    from ferlab.evaluate import evaluate_checkpoints
    from ferlab.train.fit import fit

    csv, _ = fer_dirs
    run = tmp_path / "run7"
    fit(TrainConfig(model="fer-mobile", epochs=1, batch_size=64, data=str(csv), precision="fp32", augment="flip"),
        run, progress=False)
    own = evaluate_checkpoints([run], split="train", progress=False)
    fp = evaluate_checkpoints([run], split="train", labels="ferplus", progress=False)
    assert own["members"][0]["same_data_as_training"] and fp["members"][0]["same_data_as_training"]
    assert own["labels"] == "source" and own["n"] == 300
    assert fp["labels"] == "ferplus" and "1 faces labelled Contempt left out" in fp["label_note"]
    assert fp["n"] == 300 - 2 - 1  # not-a-face, the unknown tie and the Contempt face
    # the agreement table scores the same predictions against both label sources
    import importlib.util

    spec = importlib.util.spec_from_file_location("label_agreement", REPO / "bench" / "label_agreement.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    page = tmp_path / "agreement.md"
    assert bench.main(["--data", str(csv), "--models", str(run), "--page", str(page)]) == 0
    val = evaluate_checkpoints([run], split="val", progress=False)
    val_fp = evaluate_checkpoints([run], split="val", labels="ferplus", progress=False)
    text = page.read_text()
    assert f"| {val['accuracy']:.2%} |" in text and f"| {val_fp['accuracy']:.2%} |" in text
    assert "FER2013's own label, read as a prediction" in text


@pytest.mark.slow
def test_scoring_a_ferplus_run_on_fer2013_labels_keeps_its_own_results(fer_dirs, tmp_path, capsys):
    from ferlab.cli import main

    csv, _ = fer_dirs
    run = tmp_path / "run"
    assert main(["train", "--model", "r004-dnn", "--epochs", "1", "--data", str(csv), "--labels", "ferplus",
                 "--precision", "fp32", "--out", str(run), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(run), "--json"]) == 0
    own = json.loads(capsys.readouterr().out)
    assert main(["evaluate", str(run), "--labels", "fer2013", "--json"]) == 0
    other = json.loads(capsys.readouterr().out)
    assert json.loads((run / "eval-test" / "metrics.json").read_text())["accuracy"] == own["accuracy"]
    assert json.loads((run / "eval-test-fer2013" / "metrics.json").read_text())["accuracy"] == other["accuracy"]
    assert own["members"][0]["same_data_as_training"] and other["members"][0]["same_data_as_training"]


def test_ferplus_labels_on_the_synthetic_faces_are_refused_at_evaluation(trained_tiny_run, tmp_path):
    from ferlab.evaluate import evaluate_checkpoints

    with pytest.raises(ValueError, match="--labels ferplus needs FER2013 data"):
        evaluate_checkpoints([trained_tiny_run], labels="ferplus", progress=False)
    with pytest.raises(FileNotFoundError, match="votes file .*missing.csv not found"):
        evaluate_checkpoints([trained_tiny_run], labels=str(tmp_path / "missing.csv"), progress=False)


def test_the_real_ferplus_counts_match_its_readme(fer2013_path):
    if not FERPLUS.is_file():
        pytest.skip(f"FER+ votes not found at {FERPLUS}")
    data, info = apply_labels(load_data(str(fer2013_path), progress=False), "ferplus", str(fer2013_path))
    assert info["file"] == str(FERPLUS)
    # the README's table, in the file's class order: neutral happiness surprise sadness anger disgust fear contempt
    readme = {"train": [10179, 7507, 3545, 3487, 2446, 179, 648, 162], "val": [1322, 897, 453, 405, 316, 34, 73, 24],
              "test": [1254, 925, 438, 439, 325, 22, 92, 26]}
    for split, counts in readme.items():
        got = np.bincount(data.labels[data.indices(split)], minlength=8)
        assert [int(got[TO_FERLAB[i]]) for i in range(8)] == counts, split
