"""Shipped pretrained models: safetensors files inside the package, listed in ``weights/manifest.json``.

Any command or API that takes a checkpoint also takes a shipped name (see :func:`ferlab.checkpoint.resolve`).
The manifest states each model's accuracies as measured by ``ferlab evaluate`` on the shipped file itself,
under the strict protocol (trained on Training, selected on PublicTest, PrivateTest only reported), so users
can reproduce them. ``bench/ship_model.py`` writes the entries.

A manifest entry (keyed by the shipped name)::

    {"file": "NAME.safetensors", "model": "fer-resnet-s", "description": "...", "default": false,
     "params": 1227623, "dtype": "float32", "size_bytes": 4930000, "sha256": "...",
     "card": "docs/models/NAME.md", "data": {"source": "fer2013.csv.gz", "fingerprint": "..."},
     "protocol": "...", "accuracy": {"val": {"plain": 0.70, "tta": 0.71}, "test": {"plain": 0.70, "tta": 0.71}},
     "n": {"val": 3589, "test": 3589}, "hardware": "...", "train_minutes": 42.0}

``FERLAB_WEIGHTS_DIR`` points at another weights folder (its own ``manifest.json``), e.g. for tests.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

PACKAGE_WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
MANIFEST_NAME = "manifest.json"


def weights_dir() -> Path:
    """The folder of the shipped weights: ``$FERLAB_WEIGHTS_DIR`` if set, else the package's ``weights/``."""
    env = os.environ.get("FERLAB_WEIGHTS_DIR")
    return Path(env).expanduser() if env else PACKAGE_WEIGHTS_DIR


def manifest_path() -> Path:
    return weights_dir() / MANIFEST_NAME


def _manifest() -> dict[str, dict[str, Any]]:
    """The manifest's entries by shipped name (empty when there is none); ValueError when it is malformed."""
    path = manifest_path()
    if not path.is_file():
        return {}
    try:
        entries = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: the manifest of shipped models is not valid JSON ({e})") from None
    if not isinstance(entries, dict):
        raise ValueError(f"{path}: the manifest of shipped models must be an object of entries by name, "
                         f"got {type(entries).__name__}")
    for name, entry in entries.items():
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: manifest entry {name!r} must be an object, got {type(entry).__name__}")
        if not isinstance(entry.get("file"), str) or not entry["file"]:
            raise ValueError(f"{path}: manifest entry {name!r} has no \"file\" (the name of its weights file)")
    return entries


def list_pretrained() -> list[dict[str, Any]]:
    """One dict per shipped model: name, file, model, stated accuracies, card, description."""
    return [{"name": name, **entry} for name, entry in sorted(_manifest().items())]


def is_pretrained(name: str) -> bool:
    return name in _manifest()


def pretrained_entry(name: str) -> dict[str, Any]:
    """The manifest entry of shipped model ``name``; a clear error lists the names otherwise."""
    entries = _manifest()
    if name not in entries:
        have = ", ".join(sorted(entries)) or "none in this build"
        raise KeyError(f"{name!r} is neither a file, a run directory nor a shipped model (shipped: {have})")
    return {"name": name, **entries[name]}


def pretrained_path(name: str) -> Path:
    """The packaged weights file of shipped model ``name``."""
    path = weights_dir() / pretrained_entry(name)["file"]
    if not path.is_file():
        raise FileNotFoundError(f"shipped model {name}: {path} is missing from the installed package")
    return path
