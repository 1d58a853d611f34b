"""Where a checkpoint a run learns from came from: could it have seen the run's validation or test rows?

A distillation teacher and a warm start both bring knowledge trained elsewhere into a run. Their checkpoint's
metadata says which data they trained on and how they split it; these checks compare that with the run's.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

SPLIT_KEYS: tuple[str, ...] = ("val_carved", "val_fraction", "split_seed")


def overlap_warnings(role: str, meta: dict[str, Any], fingerprints: Collection[str],
                     split: dict[str, Any]) -> list[str]:
    """Why the checkpoint ``role`` ("teacher runs/x", "warm start fer2013-resnet-m") with metadata ``meta`` might
    have trained on rows the run validates or tests on; empty when none.

    ``fingerprints``: the run's data fingerprints that count as the same rows (the data's own and, under FER+
    labels, the FER2013 file's, whose rows and splits FER+ keeps). ``split``: the run's ``split_protocol``.
    """
    theirs = meta.get("data", {}).get("fingerprint")
    if theirs not in fingerprints:
        return [f"{role} was trained on other data (fingerprint {theirs}); make sure it never saw this run's "
                "val or test images"]
    if split["val_carved"] and any(meta.get("split", {}).get(k) != split[k] for k in SPLIT_KEYS):
        return [f"{role} carved its val part differently; it may have trained on this run's val"]
    return []
