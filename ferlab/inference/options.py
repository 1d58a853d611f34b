"""Command-line options of the inference layer, light to import (no torch): the ``--tta`` option and its help."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

TTA_CHOICES = ("none", "flip", "shift", "affine")


def tta_help() -> str:
    """Help text for a ``--tta`` option: what each mode costs and what it bought the shipped models (measured)."""
    from ferlab.pretrained import weights_dir

    return _tta_help(str(weights_dir()))  # the manifest is read once per weights folder, not once per option


@functools.cache
def _tta_help(_weights_dir: str) -> str:
    from ferlab.pretrained import list_pretrained

    text = ("test-time augmentation: --tta (flip) averages with the mirrored face (2 views); shift also the flip "
            "pair moved 2 pixels up, down, left and right (10 views); affine also zoomed in and out 8%% and rotated "
            "+-6 degrees (18 views). Each view is one forward pass of every member of an ensemble")
    try:
        shelf = list_pretrained()
    except ValueError:  # a malformed manifest is reported where a model is loaded
        shelf = []
    gains = []
    for e in shelf:
        acc = e.get("accuracy", {}).get("test", {})
        modes = [(m, acc[k]) for m, k in (("none", "plain"), ("flip", "tta"), ("affine", "affine")) if k in acc]
        if len(modes) > 1 and set(e.get("roles", [])) - {"ensemble-member"}:  # the shelf's named roles
            n = len(e.get("members", [])) or 1
            on = ", FER+ labels" if e.get("labels") == "ferplus" else ""
            gains.append(f"{e['name']} ({n} net{'s' if n > 1 else ''}{on}): "
                         + ", ".join(f"{m} {v:.2%}".replace("%", "%%") for m, v in modes))
    if gains:
        text += "; PrivateTest accuracy by mode (selected on PublicTest): " + "; ".join(gains)
    return text


def tta_argument(default: str | None = "none", more_help: str = "") -> dict[str, Any]:
    """argparse keywords of a ``--tta [MODE]`` option (bare --tta: flip; absent: ``default``); ``more_help`` is
    appended to the help."""
    return dict(nargs="?", const="flip", default=default, choices=TTA_CHOICES, metavar="MODE",
                help=tta_help() + more_help)


# predict and serve: no --tta means none, or an .onnx file's own mode
PER_FILE_TTA: dict[str, Any] = {"default": None, "more_help": " (default: none; an .onnx file: its own mode)"}


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: a whole number of at least ``low``."""
    import argparse

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {v}")
        return v

    parse.__name__ = f"int_at_least_{low}"  # what argparse names in its own messages
    return parse


positive_int = int_at_least(1)
