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
    assert pretrained.list_pretrained() == [{"name": "x", "file": "x.safetensors", "model": "fer-resnet-s"}]
    assert pretrained.pretrained_path("x") == weights / "x.safetensors"


def test_shipped_manifest_is_valid(monkeypatch):
    monkeypatch.delenv("FERLAB_WEIGHTS_DIR", raising=False)
    for entry in pretrained.list_pretrained():
        assert pretrained.pretrained_path(entry["name"]).is_file()
