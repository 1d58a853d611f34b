"""The in-memory form every FER data layout is loaded into."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ferlab import CLASS_NAMES

# Split names used throughout ferlab. FER2013's Usage column maps onto them:
# Training -> train, PublicTest -> val, PrivateTest -> test.
SPLITS: tuple[str, ...] = ("train", "val", "test", "unlabeled")
# A split's code is its index in SPLITS: loaders keep one small integer per row and map codes to names at the end.
SPLIT_TRAIN, SPLIT_VAL, SPLIT_TEST, SPLIT_UNLABELED = (SPLITS.index(s) for s in ("train", "val", "test", "unlabeled"))
IMAGE_SIZE = 48  # FerData images are IMAGE_SIZE x IMAGE_SIZE


@dataclass
class FerData:
    """Faces, labels and split membership of one data source.

    images: (N, 48, 48) uint8 gray faces.
    labels: (N,) int64 class ids in 0..6; -1 where a row has no label (e.g. a Kaggle test.csv).
    split:  (N,) str, one of ``SPLITS``; the split the source itself assigns ("train" when it assigns none).
    ids:    (N,) int64 row ids (the ``id`` column where the source has one, else the row index).
    targets: (N, K) float32 label distributions (e.g. FER+ crowd votes; rows sum to 1), or None: hard labels only.
    pixels_fingerprint: the fingerprint of the source before it was relabelled (""; not relabelled: ``fingerprint``).
    """

    images: np.ndarray
    labels: np.ndarray
    split: np.ndarray
    ids: np.ndarray
    source: str = "<memory>"
    layout: str = "memory"
    fingerprint: str = ""
    class_names: tuple[str, ...] = CLASS_NAMES
    n_skipped: int = 0
    notes: list[str] = field(default_factory=list)
    targets: np.ndarray | None = None
    pixels_fingerprint: str = ""

    def __post_init__(self) -> None:
        n = len(self.images)
        if self.images.dtype != np.uint8 or self.images.ndim != 3:
            raise ValueError(f"images must be (N, H, W) uint8, got {self.images.dtype} {self.images.shape}")
        for name in ("labels", "split", "ids"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries for {n} images")
        if self.targets is not None and self.targets.shape != (n, len(self.class_names)):
            raise ValueError(f"targets must be (N, {len(self.class_names)}), got {self.targets.shape}")

    def __len__(self) -> int:
        return len(self.images)

    def indices(self, split: str) -> np.ndarray:
        """Row indices of the rows the source assigns to ``split``."""
        return np.flatnonzero(self.split == split)

    def subset(self, idx: np.ndarray) -> FerData:
        """A new FerData holding the rows ``idx``."""
        return FerData(
            self.images[idx], self.labels[idx], self.split[idx], self.ids[idx],
            self.source, self.layout, self.fingerprint, self.class_names, 0, list(self.notes),
            None if self.targets is None else self.targets[idx], self.pixels_fingerprint,
        )
