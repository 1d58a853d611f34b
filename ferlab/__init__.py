"""ferlab: facial expression recognition, from FER2013 to real photos.

``import ferlab`` stays light: the public classes below load their modules (torch, OpenCV) on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

CLASS_NAMES: tuple[str, ...] = ("Angry", "Disgust", "Fear", "Happy", "Sad", "Surprise", "Neutral")

# public name -> module that defines it, imported on first access (PEP 562)
_LAZY: dict[str, str] = {
    "Recognizer": "ferlab.recognize.api",
    "Face": "ferlab.recognize.api",
    "to_dataframe": "ferlab.recognize.api",
    "load_model": "ferlab.inference.loader",
}

__all__ = ["CLASS_NAMES", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # cache: later accesses skip this function
        return value
    raise AttributeError(f"module 'ferlab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
