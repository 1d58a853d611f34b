"""The weights manifest: a malformed manifest.json is a clear error naming the file and the entry."""

from __future__ import annotations

import json
import re

import pytest

from ferlab import pretrained


@pytest.mark.parametrize("manifest,expected", [
    ([1], "must be an object of entries by name, got list"),
    ({"good": {"file": "good.safetensors"}, "bad": [1]}, "manifest entry 'bad' must be an object, got list"),
    ({"nofile": {"model": "fer-resnet-s"}}, "manifest entry 'nofile' has no \"file\""),
    ({"numfile": {"file": 3}}, "manifest entry 'numfile' has no \"file\""),
    ({"e": {"kind": "bag"}}, "manifest entry 'e' has kind 'bag'"),
    ({"e": {"kind": "ensemble"}}, "ensemble 'e' has no \"members\""),
    ({"e": {"kind": "ensemble", "members": ["ghost"]}}, "ensemble 'e' names members that are not shipped single "
                                                        "models: ghost"),
    ({"a": {"file": "a.safetensors"}, "e": {"kind": "ensemble", "members": ["a", "a"]}},
     "ensemble 'e' names a member twice; give it a \"weights\" entry instead"),
    ({"a": {"file": "a.safetensors"}, "e": {"kind": "ensemble", "members": ["a"], "weights": [1, 2]}},
     "ensemble 'e' has \"weights\" [1, 2]; expected one positive number per member (1)"),
    ({"a": {"file": "a.safetensors"}, "e": {"kind": "ensemble", "members": ["a"], "weights": [0]}},
     "ensemble 'e' has \"weights\" [0]"),
    ({"a": {"file": "a.safetensors"}, "e": {"kind": "ensemble", "members": ["a"], "weights": ["2"]}},
     "ensemble 'e' has \"weights\" ['2']"),
])
def test_malformed_manifest_names_the_file_and_entry(weights, manifest, expected):
    (weights / "manifest.json").write_text(json.dumps(manifest))
    pattern = f"{re.escape(str(weights / 'manifest.json'))}: .*{re.escape(expected)}"
    with pytest.raises(ValueError, match=pattern):
        pretrained.list_pretrained()
    with pytest.raises(ValueError, match=pattern):
        pretrained.pretrained_path("nofile")


def test_valid_manifest_and_missing_manifest(weights):
    assert pretrained.list_pretrained() == [] and not pretrained.is_pretrained("x")
    (weights / "x.safetensors").write_bytes(b"")
    (weights / "manifest.json").write_text(json.dumps({"x": {"file": "x.safetensors", "model": "fer-resnet-s"}}))
    assert pretrained.list_pretrained() == [{"name": "x", "file": "x.safetensors", "model": "fer-resnet-s",
                                             "kind": "single", "roles": [], "labels": "fer2013"}]
    assert pretrained.pretrained_path("x") == weights / "x.safetensors"


def test_ensemble_entry_has_no_file_of_its_own(weights):
    (weights / "manifest.json").write_text(json.dumps({
        "a": {"file": "a.safetensors"}, "b": {"file": "b.safetensors", "roles": ["default"]},
        "ab": {"kind": "ensemble", "members": ["a", "b"], "roles": ["most-accurate"]}}))
    assert pretrained.pretrained_entry("ab")["members"] == ["a", "b"]
    assert pretrained.default_name() == "b"
    with pytest.raises(ValueError, match="ab is an ensemble of a, b"):
        pretrained.pretrained_path("ab")


def test_names_of_the_previous_release(weights):
    (weights / "manifest.json").write_text(json.dumps({"fer2013-resnet-s": {"file": "s.safetensors"}}))
    (weights / "s.safetensors").write_bytes(b"")
    with pytest.warns(FutureWarning, match="'fer-resnet-s-90ep-mixup-fer2013' is now called 'fer2013-resnet-s'"):
        assert pretrained.pretrained_path("fer-resnet-s-90ep-mixup-fer2013") == weights / "s.safetensors"
    assert pretrained.is_pretrained("fer-resnet-s-fer2013")
    with pytest.raises(KeyError, match="'fer-resnet-s-fer2013' is no longer shipped .*use 'fer2013-resnet-s'"):
        pretrained.pretrained_entry("fer-resnet-s-fer2013")


def _shipped() -> list[dict]:
    import os

    saved = os.environ.pop("FERLAB_WEIGHTS_DIR", None)  # the package's own weights, whatever the caller set
    try:
        return pretrained.list_pretrained()
    finally:
        if saved is not None:
            os.environ["FERLAB_WEIGHTS_DIR"] = saved


SHIPPED = _shipped()


def test_shipped_files_are_what_their_manifest_says(monkeypatch):
    import hashlib

    from ferlab.checkpoint import load_checkpoint

    monkeypatch.delenv("FERLAB_WEIGHTS_DIR", raising=False)
    assert len(SHIPPED) >= 3, "the package ships its models"
    for role in ("default", "most-accurate", "fast", "ferplus", "ferplus-most-accurate"):
        assert sum(role in e["roles"] for e in SHIPPED) == 1, f"exactly one model has role {role}"
    singles = [e for e in SHIPPED if e["kind"] == "single"]
    assert sum(e["size_bytes"] for e in singles) <= 20e6, "shipped weights together <= 20 MB"
    for entry in singles:
        raw = pretrained.pretrained_path(entry["name"]).read_bytes()
        assert len(raw) == entry["size_bytes"] and hashlib.sha256(raw).hexdigest() == entry["sha256"], entry["name"]
        model, meta = load_checkpoint(entry["name"])
        assert meta["model"]["name"] == entry["model"]
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == entry["params"], entry["name"]


def test_every_old_name_points_at_a_shipped_model():
    names = {e["name"] for e in SHIPPED}
    assert set(pretrained.RENAMED.values()) <= names and set(pretrained.REMOVED.values()) <= names


@pytest.mark.parametrize("name", [e["name"] for e in SHIPPED if e["kind"] == "single"])
def test_shipped_accuracy_reproduces_on_real_fer2013(name, fer2013_path, monkeypatch):
    """The manifest's PublicTest and PrivateTest figures (plain and flip TTA), measured again on the real file.

    Within 0.2 points (7 of 3,589 images): bfloat16 arithmetic differs slightly between CPUs, and a CPU without
    bf16 instructions evaluates in fp32 (docs/results/accuracy.md). One pass over the flip pair per split gives both:
    its first view is the plain image (``ferlab evaluate --tta`` averages the two, without it the first alone).
    """
    import torch

    from ferlab.data.source import data_for, split_rows
    from ferlab.inference.loader import load_model

    monkeypatch.delenv("FERLAB_WEIGHTS_DIR", raising=False)
    stated = pretrained.pretrained_entry(name)["accuracy"]
    model = load_model(name)
    data = data_for(model.meta, str(fer2013_path), progress=False)
    for split in ("val", "test"):
        idx = split_rows(data, model.meta, split)
        x, y = torch.from_numpy(data.images[idx]).unsqueeze(1), data.labels[idx]  # (N, 1, 48, 48) uint8, (N,)
        views = model.view_logits(x, tta="flip")  # (2, N, K): the image, then its mirror
        for mode, logits in (("plain", views[0]), ("tta", views.mean(0))):
            got = float((logits.argmax(1).numpy() == y).mean())
            assert abs(got - stated[split][mode]) <= 0.002, (name, split, mode, got, stated[split][mode])


def _measured(agreement: float, mca: float, params: int = 1000, kind: str = "single") -> dict:
    entry = {"kind": kind, "params": params, "roles": [],
             "robustness": {"val": {"ferplus_agreement": agreement, "ferplus": {"mean_corruption": mca}}}}
    if kind == "ensemble":
        entry["members"] = ["a"]
    return entry


def test_default_rule_weighs_ferplus_agreement_and_corruptions_and_moves_the_role():
    manifest = {
        "a": {**_measured(0.70, 0.50), "roles": ["default", "best-single"]},  # score 0.600
        "b": _measured(0.66, 0.58),  # 0.620: the best
        "c": _measured(0.80, 0.80, kind="ensemble"),  # ensembles are no candidates
        "d": {"kind": "single", "roles": ["fast"]},  # not measured: no candidate
    }
    chosen, scores = pretrained.apply_default_rule(manifest)
    assert chosen == "b" and scores == pytest.approx({"a": 0.60, "b": 0.62})
    assert manifest["b"]["roles"] == ["default"] and manifest["a"]["roles"] == ["best-single"]
    assert pretrained.default_rule_score(manifest["c"]) is None


def test_default_rule_gives_a_near_tie_to_the_smaller_net():
    manifest = {"big": _measured(0.700, 0.600, params=5_000_000), "small": _measured(0.698, 0.600, params=600_000)}
    chosen, _ = pretrained.apply_default_rule(manifest)
    assert chosen == "small"  # 0.1 points behind, within the rule's 0.3
    manifest["small"] = _measured(0.690, 0.600, params=600_000)  # 0.5 points behind
    assert pretrained.apply_default_rule(manifest)[0] == "big"
    with pytest.raises(ValueError, match="no shipped single model has been measured"):
        pretrained.apply_default_rule({"x": {"kind": "single", "roles": []}})


def test_shipped_default_follows_the_rule():
    """The shelf's default role is where the written rule puts it, given the measurements in the manifest."""
    import copy

    manifest = json.loads(pretrained.PACKAGE_WEIGHTS_DIR.joinpath("manifest.json").read_text())
    if not any("robustness" in e for e in manifest.values()):
        pytest.skip("this build's manifest has no robustness measurements")
    chosen, _ = pretrained.apply_default_rule(copy.deepcopy(manifest))
    assert "default" in manifest[chosen]["roles"]


def test_shipped_files_name_no_folders_of_the_machine_that_made_them(monkeypatch):
    """The metadata inside each shipped file names its data and votes files by their names only."""
    from ferlab.checkpoint import read_meta

    monkeypatch.delenv("FERLAB_WEIGHTS_DIR", raising=False)

    def strings(value):
        if isinstance(value, dict):
            for v in value.values():
                yield from strings(v)
        elif isinstance(value, list):
            for v in value:
                yield from strings(v)
        elif isinstance(value, str):
            yield value

    for e in pretrained.list_pretrained():
        if e["kind"] == "single":
            meta = read_meta(pretrained.pretrained_path(e["name"]))
            paths = [s for s in strings(meta) if "/" in s or "\\" in s]
            assert not paths, f"{e['name']} names local paths {paths}"


def test_every_shipped_model_carries_its_calibration(monkeypatch):
    monkeypatch.delenv("FERLAB_WEIGHTS_DIR", raising=False)
    from ferlab.transforms import TTA_MODES

    for e in pretrained.list_pretrained():
        cal = e.get("calibration")
        assert cal and cal["fit_on"] == "val", f"{e['name']} has no calibration fitted on PublicTest"
        assert set(cal["temperature"]) == set(TTA_MODES)
        assert all(0.2 < t < 5 for t in cal["temperature"].values())
        assert cal["ece"]["val"]["none"]["after"] <= cal["ece"]["val"]["none"]["before"] + 0.01


def test_shipped_names_resolve_renamed_models_and_name_the_unknown():
    from ferlab.pretrained import RENAMED, list_pretrained, shipped_names

    shipped = [e["name"] for e in list_pretrained()]
    assert shipped_names(None) == shipped_names([]) == shipped
    old, new = next((o, n) for o, n in RENAMED.items() if n in shipped)
    with pytest.warns(FutureWarning, match=f"now called '{new}'"):
        assert shipped_names([old, shipped[0]]) == [new, shipped[0]]
    with pytest.raises(KeyError, match="not shipped: nosuch"):
        shipped_names(["nosuch"])
