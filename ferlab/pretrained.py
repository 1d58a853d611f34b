"""Shipped pretrained models: safetensors files inside the package, listed in ``weights/manifest.json``.

Any command or API that takes a checkpoint also takes a shipped name (see :func:`ferlab.checkpoint.resolve`).
The manifest states each model's accuracies as measured by ``ferlab evaluate`` on the shipped file itself,
under the strict protocol (trained on Training, selected on PublicTest, PrivateTest only reported), so users
can reproduce them. ``bench/ship_model.py`` writes the entries.

A single model's manifest entry (keyed by the shipped name)::

    {"file": "NAME.safetensors", "model": "fer-resnet-s", "description": "...", "default": false,
     "params": 1227623, "dtype": "float32", "size_bytes": 4930000, "sha256": "...",
     "card": "docs/models/NAME.md", "data": {"source": "fer2013.csv.gz", "fingerprint": "..."},
     "protocol": "...", "accuracy": {"val": {"plain": 0.70, "tta": 0.71}, "test": {"plain": 0.70, "tta": 0.71}},
     "n": {"val": 3589, "test": 3589}, "hardware": "...", "train_minutes": 42.0}

An ensemble's entry names its members (shipped single models, so their files ship once) instead of a file::

    {"kind": "ensemble", "members": ["NAME1", "NAME2"], "roles": ["most-accurate"], "description": "...",
     "accuracy": {...}, "n": {...}, "protocol": "..."}

and may weigh them (``"weights": [4, 3, 1]``, one positive number per member: how often greedy selection with
replacement picked it); without ``weights`` the members' probabilities are averaged equally.

Single entries may carry ``"kind": "single"`` and ``"roles"`` too. Names of earlier releases keep working for
one release: a renamed model loads under its new name with a warning; a removed one fails naming its replacement.

``FERLAB_WEIGHTS_DIR`` points at another weights folder (its own ``manifest.json``), e.g. for tests.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PACKAGE_WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
MANIFEST_NAME = "manifest.json"

# names of the previous release -> the name the same weights ship under now (they load, with a warning)
RENAMED: dict[str, str] = {
    "fer-resnet-s-90ep-mixup-fer2013": "fer2013-resnet-s",
    "fer-resnet-m-40ep-mixup-fer2013": "fer2013-resnet-m",
    "fer-resnet-s16-110ep-mixup-fer2013": "fer2013-resnet-s16-110ep",
    "fer-resnet-s16-150ep-mixup-fer2013": "fer2013-resnet-s16-150ep",
    "fer-mobile-fast-kd-fer2013": "fer2013-fast",
}
# superseded weights no longer shipped -> what to use instead (their configs and model cards stay in docs/)
REMOVED: dict[str, str] = {
    "fer-resnet-s-fer2013": "fer2013-resnet-s",
    "fer-resnet-s-75ep-fer2013": "fer2013-resnet-s",
    "fer-resnet-s-90ep-cutmix-fer2013": "fer2013-resnet-s",
    "fer-resnet-s16-30min-fer2013": "fer2013-resnet-s16-110ep",
    "ferplus-resnet-xs": "ferplus-resnet-s16-photometric",
    "ferplus-resnet-xs-photometric": "ferplus-resnet-s16-photometric",
    "ferplus-resnet-s16": "ferplus-resnet-s16w",
    "ferplus-ensemble": "ferplus-ensemble-s16wd",
}
KINDS = ("single", "ensemble")


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
        kind = entry.setdefault("kind", "single")
        if kind not in KINDS:
            raise ValueError(f"{path}: manifest entry {name!r} has kind {kind!r}; expected one of {', '.join(KINDS)}")
        if kind == "single" and (not isinstance(entry.get("file"), str) or not entry["file"]):
            raise ValueError(f"{path}: manifest entry {name!r} has no \"file\" (the name of its weights file)")
        if kind == "ensemble":
            members = entry.get("members")
            if not isinstance(members, list) or not members:
                raise ValueError(f"{path}: ensemble {name!r} has no \"members\" (the shipped names it averages)")
            bad = [m for m in members if entries.get(m, {}).get("kind", "single") != "single" or m not in entries]
            if bad:
                raise ValueError(f"{path}: ensemble {name!r} names members that are not shipped single models: "
                                 f"{', '.join(map(str, bad))}")
            if len(set(members)) != len(members):
                raise ValueError(f"{path}: ensemble {name!r} names a member twice; give it a \"weights\" entry instead")
            weights = entry.get("weights")
            if weights is not None and (not isinstance(weights, list) or len(weights) != len(members) or not all(
                    isinstance(w, int | float) and not isinstance(w, bool) and math.isfinite(w) and w > 0
                    for w in weights)):
                raise ValueError(f"{path}: ensemble {name!r} has \"weights\" {weights!r}; expected one positive "
                                 f"number per member ({len(members)})")
        entry.setdefault("roles", [])
        entry.setdefault("labels", "fer2013")  # what its stated accuracies are measured against (or "ferplus")
    return entries


def shipped_names(names: Sequence[str] | None) -> list[str]:
    """``names`` as shipped names (a renamed model's under its new name), or every shipped name when none are
    given; a KeyError names those that are not shipped (the benches' ``--names``)."""
    shipped = sorted(_manifest())
    if not names:
        return shipped
    out = [current_name(n) for n in names]  # a KeyError for a model no longer shipped
    unknown = [n for n in out if n not in shipped]
    if unknown:
        raise KeyError(f"not shipped: {', '.join(unknown)} (shipped: {', '.join(shipped)})")
    return out


def list_pretrained() -> list[dict[str, Any]]:
    """One dict per shipped model: name, file, model, stated accuracies, card, description; an ensemble's
    ``size_bytes``, ``params`` and ``model`` are its members' totals (their files ship once, under their names)."""
    entries = _manifest()
    rows = [{"name": name, **entry} for name, entry in sorted(entries.items())]
    for r in rows:
        if r["kind"] == "ensemble":
            members = [entries[m] for m in r["members"]]
            r["size_bytes"] = sum(m.get("size_bytes", 0) for m in members)
            r["params"] = sum(m.get("params", 0) for m in members)
            r["model"] = " + ".join(m.get("model", "?") for m in members)
    return rows


def is_pretrained(name: str) -> bool:
    """True for a shipped name, and for a name of the previous release (renamed or removed)."""
    return name in _manifest() or name in RENAMED or name in REMOVED


def current_name(name: str) -> str:
    """The shipped name for ``name``: itself, or (with a FutureWarning) the new name of a renamed model."""
    if name in REMOVED:
        raise KeyError(f"{name!r} is no longer shipped (superseded); use {REMOVED[name]!r} instead "
                       f"(`ferlab models --pretrained` lists what ships)")
    if name in RENAMED and name not in _manifest():
        new = RENAMED[name]
        warnings.warn(f"shipped model {name!r} is now called {new!r}; the old name stops working in the next "
                      "release", FutureWarning, stacklevel=3)
        return new
    return name


def pretrained_entry(name: str) -> dict[str, Any]:
    """The manifest entry of shipped model ``name`` (a renamed one's under its new name, with a warning); a clear
    error lists the names otherwise."""
    name = current_name(name)
    entries = _manifest()
    if name not in entries:
        have = ", ".join(sorted(entries)) or "none in this build"
        raise KeyError(f"{name!r} is neither a file, a run directory nor a shipped model (shipped: {have})")
    return {"name": name, **entries[name]}


def pretrained_path(name: str) -> Path:
    """The packaged weights file of shipped single model ``name``."""
    entry = pretrained_entry(name)
    if entry["kind"] == "ensemble":
        raise ValueError(f"shipped model {entry['name']} is an ensemble of {', '.join(entry['members'])}; it has no "
                         "single weights file (load it with ferlab.inference.load_model)")
    path = weights_dir() / entry["file"]
    if not path.is_file():
        raise FileNotFoundError(f"shipped model {entry['name']}: {path} is missing from the installed package")
    return path


def entry_for_file(path: str | Path) -> dict[str, Any] | None:
    """The manifest entry of the shipped single model whose weights file holds the same bytes as ``path`` (the
    shelf's file named by its path, or a copy of it), else None."""
    from ferlab.data.cache import sha256_file

    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError:
        return None
    same_size = {n: e for n, e in _manifest().items() if e.get("kind") == "single" and e.get("size_bytes") == size}
    digest = sha256_file(path) if same_size else None  # hashed once, and only when a shelf file is that large
    return next(({"name": n, **e} for n, e in same_size.items() if e.get("sha256") == digest), None)


def default_name() -> str:
    """The shipped model used when none is named: the entry with role ``default`` (or the legacy ``"default":
    true``), else the first one; ValueError when nothing ships."""
    shipped = list_pretrained()
    if not shipped:
        raise ValueError("no pretrained model is shipped in this build: pass a run directory or a .safetensors "
                         "checkpoint, e.g. Recognizer('runs/fer-resnet-s') or --model runs/fer-resnet-s")
    return next((e["name"] for e in shipped if "default" in e["roles"] or e.get("default")), shipped[0]["name"])


DEFAULT_RULE = (
    "The default model (what `ferlab predict`, `ferlab serve` and `Recognizer()` use without a model name) is the "
    "shipped single net with the highest score (A + C) / 2, where A is its agreement with the FER+ majority vote "
    "on PublicTest (every face whose majority is one of FER2013's 7 classes, predicted without TTA) and C its "
    "mean accuracy against the same FER+ labels over the 65 sets of the PublicTest corruption benchmark "
    "(`bench/robustness.py`). FER2013-label accuracy does not enter: it rewards fitting FER2013's noisy labels, "
    "which is what makes a model fail on other faces. Ensembles are not candidates (they cost one forward pass "
    "per member and stay opt-in); an 8-class FER+ net is one, scored with all its outputs (a Contempt answer on "
    "these faces counts as a miss, as it would in use). A score within 0.3 points of the best goes to the net "
    "with fewer parameters. Nothing measured on PrivateTest enters the rule."
)
RULE_TIE = 0.003


def default_rule_score(entry: dict[str, Any]) -> float | None:
    """The default rule's score of a manifest entry (see :data:`DEFAULT_RULE`); None when it is no candidate or
    has not been measured (``bench/robustness.py --write`` measures it)."""
    val = entry.get("robustness", {}).get("val")
    if entry.get("kind", "single") != "single" or not val:
        return None
    return (val["ferplus_agreement"] + val["ferplus"]["mean_corruption"]) / 2


def apply_default_rule(manifest: dict[str, dict[str, Any]]) -> tuple[str, dict[str, float]]:
    """Give the ``default`` role to the entry :data:`DEFAULT_RULE` picks (in place); returns it and the scores."""
    scores = {n: s for n, e in manifest.items() if (s := default_rule_score(e)) is not None}
    if not scores:
        raise ValueError("no shipped single model has been measured for the default rule (bench/robustness.py)")
    best = max(scores.values())
    close = [n for n, s in scores.items() if s >= best - RULE_TIE]
    chosen = min(close, key=lambda n: (manifest[n].get("params", 0), -scores[n]))
    for name, entry in manifest.items():
        roles = [r for r in entry.get("roles", []) if r != "default"]
        entry["roles"] = (["default"] + roles) if name == chosen else roles
        entry.pop("default", None)  # the legacy flag
    return chosen, scores
