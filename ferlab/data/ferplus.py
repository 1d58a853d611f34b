"""FER+ labels over FER2013's pixels: Microsoft's crowd relabelling (Barsoum et al., ICMI 2016; MIT licence).

``fer2013new.csv`` holds, per FER2013 row and in the same order, the votes of 10 taggers over
``neutral, happiness, surprise, sadness, anger, disgust, fear, contempt, unknown, NF`` (NF: not a face). ferlab
reads it as an 8-class label source in its own class order: FER2013's seven classes (0 Angry ... 6 Neutral) and
7 Contempt, so a 7-class FER2013 model's predictions compare directly with FER+ labels.

Rules (the same in every split):

* A row is kept when an emotion has more votes than unknown and than NF; rows whose top vote is unknown or NF
  (a tie included), or with no votes, are dropped.
* Its **majority** label is the emotion with the most votes (ties go to the earlier column of the file).
* Its **vote distribution** (for the ``probability`` and ``crossentropy`` modes) is the emotions' votes, with a
  single tagger's outlier vote removed as in Barsoum et al. when another emotion has two or more, normalised to 1.

Label modes for training (Barsoum et al.): ``majority`` (one-hot of the majority label), ``probability`` (each
batch draws a hard label from the distribution) and ``crossentropy`` (the distribution as a soft target). Evaluation
always scores the majority label.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ferlab import CLASS_NAMES
from ferlab.data.types import SPLITS, FerData

__all__ = ["FERPLUS_CLASS_NAMES", "LABEL_MODES", "LABEL_SOURCES", "FerPlusVotes", "find_votes", "read_votes",
           "relabel"]

FERPLUS_CLASS_NAMES: tuple[str, ...] = (*CLASS_NAMES, "Contempt")
LABEL_SOURCES: tuple[str, ...] = ("fer2013", "ferplus")
LABEL_MODES: tuple[str, ...] = ("majority", "probability", "crossentropy")
VOTES_FILE = "fer2013new.csv"
# the file's vote columns, in its order, and the ferlab class id each emotion maps to (unknown, NF: -1)
COLUMNS: tuple[str, ...] = ("neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt",
                            "unknown", "NF")
TO_FERLAB: tuple[int, ...] = (6, 3, 5, 4, 0, 1, 2, 7, -1, -1)
_USAGE = {"Training": "train", "PublicTest": "val", "PrivateTest": "test"}


@dataclass
class FerPlusVotes:
    """The votes of one ``fer2013new.csv``: votes (N, 10) int in the file's column order, split (N,) names."""

    votes: np.ndarray
    split: np.ndarray
    path: str
    sha256: str


def find_votes(labels: str, data_path: str | None) -> Path:
    """The votes file ``labels`` names: a path to it, or "ferplus" to look beside the data file (its folder, then a
    sibling ``ferplus/`` folder, as in ``data/fer2013/fer2013.csv.gz`` + ``data/ferplus/fer2013new.csv``)."""
    if labels != "ferplus":
        p = Path(labels).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"FER+ votes file {labels} not found")
        return p
    if data_path is None:
        raise ValueError("--labels ferplus needs FER2013 data (--data fer2013.csv[.gz]), not the synthetic faces")
    p = Path(data_path).expanduser().resolve()
    folder = p if p.is_dir() else p.parent  # a folder given as the data holds the FER2013 file
    for cand in (folder / VOTES_FILE, folder.parent / "ferplus" / VOTES_FILE):
        if cand.is_file():
            return cand
    raise FileNotFoundError(f"no {VOTES_FILE} beside {data_path} (looked in {folder} and {folder.parent / 'ferplus'});"
                            f" pass --labels PATH/TO/{VOTES_FILE}")


def read_votes(path: str | Path) -> FerPlusVotes:
    """Read and check a ``fer2013new.csv``; errors name the file and the line."""
    path = Path(path)
    raw = path.read_bytes()
    rows, split = [], []
    lines = raw.decode("utf-8-sig").splitlines()
    reader = csv.reader(lines)
    header = next(reader, None)
    if header is None or [h.strip() for h in header[2:]] != list(COLUMNS) or header[0].strip() != "Usage":
        raise ValueError(f"{path}: not a FER+ votes file: the header must be Usage,Image name,{','.join(COLUMNS)}")
    for line_no, row in enumerate(reader, start=2):
        if len(row) != 2 + len(COLUMNS):
            raise ValueError(f"{path}, line {line_no}: {len(row)} fields, expected {2 + len(COLUMNS)}")
        usage = row[0].strip()
        if usage not in _USAGE:
            raise ValueError(f"{path}, line {line_no}: Usage {usage!r} is not one of {', '.join(_USAGE)}")
        try:
            v = [int(x) for x in row[2:]]
        except ValueError as e:
            raise ValueError(f"{path}, line {line_no}: a vote is not an integer ({e})") from None
        if min(v) < 0:
            raise ValueError(f"{path}, line {line_no}: negative vote count")
        rows.append(v)
        split.append(_USAGE[usage])
    return FerPlusVotes(np.array(rows, np.int64).reshape(-1, len(COLUMNS)), np.array(split),
                        str(path.resolve()), hashlib.sha256(raw).hexdigest())


def majority(votes: np.ndarray) -> np.ndarray:
    """(N,) ferlab class ids of each row's top emotion (ties to the earlier column); -1 where unknown or NF has as
    many votes or more, or there are no votes."""
    top = votes[:, :8].argmax(1)  # numpy's argmax takes the first maximum
    out = np.asarray(TO_FERLAB)[top]
    out[(votes[:, 8:].max(1) >= votes[:, :8].max(1)) | (votes.sum(1) == 0)] = -1
    return out


def distribution(votes: np.ndarray) -> np.ndarray:
    """(N, 8) float32 vote distributions over the ferlab-ordered FER+ classes (see the module's rules)."""
    emo = votes[:, :8].astype(np.float32)
    strong = emo >= 2
    emo = np.where(strong.any(1, keepdims=True) & ~strong, 0.0, emo)  # drop one-tagger outliers beside a stronger vote
    out = np.zeros_like(emo)
    out[:, list(TO_FERLAB[:8])] = emo
    total = out.sum(1, keepdims=True)
    return np.divide(out, total, out=np.zeros_like(out), where=total > 0)


def relabel(data: FerData, votes: FerPlusVotes) -> FerData:
    """``data`` (FER2013 rows) with FER+ labels: 8 classes, majority labels, ``targets`` the vote distributions;
    rows whose top vote is unknown/NF are dropped. The rows are matched by FER2013 row index (``data.ids``)."""
    if data.layout not in ("fer2013-csv", "icml-csv"):
        raise ValueError(f"FER+ labels go with FER2013's rows; {data.source} is a {data.layout} source")
    n = len(votes.votes)
    if len(data.ids) and (data.ids.min() < 0 or data.ids.max() >= n):
        raise ValueError(f"{votes.path} has {n:,} rows but {data.source} has row {int(data.ids.max()):,}; "
                         "is it the FER+ file for this FER2013 file?")
    v = votes.votes[data.ids]
    mismatch = np.flatnonzero(votes.split[data.ids] != data.split)
    if len(mismatch):
        i = int(mismatch[0])
        raise ValueError(f"{votes.path}: row {int(data.ids[i]) + 2} is {votes.split[data.ids[i]]} but "
                         f"{data.source} has it in {data.split[i]} ({len(mismatch)} rows differ); "
                         "is it the FER+ file for this FER2013 file?")
    labels = majority(v)
    keep = np.flatnonzero(labels >= 0)
    out = data.subset(keep)
    out.labels = labels[keep].astype(np.int64)
    out.targets = distribution(v[keep])
    out.class_names = FERPLUS_CLASS_NAMES
    out.fingerprint = relabelled_fingerprint(data.fingerprint, votes.sha256)
    out.pixels_fingerprint = data.fingerprint
    dropped = {s: int(((labels < 0) & (data.split == s)).sum()) for s in SPLITS}
    out.notes.append(f"FER+ labels from {votes.path}: dropped rows whose top vote is unknown/NF "
                     f"(train {dropped['train']}, val {dropped['val']}, test {dropped['test']})")
    return out


def relabelled_fingerprint(pixels_fingerprint: str, votes_sha256: str) -> str:
    """The fingerprint of a source relabelled by a votes file: its own and the votes file's, hashed together."""
    return hashlib.sha256((pixels_fingerprint + votes_sha256).encode()).hexdigest()[:16]


def apply_labels(data: FerData, labels: str, data_path: str | None) -> tuple[FerData, dict[str, str] | None]:
    """``data`` under the label source ``labels`` ("fer2013": as loaded; "ferplus" or a votes file: FER+), and the
    provenance to record with a model (None for the data's own labels)."""
    if labels in ("", "fer2013"):
        return data, None
    votes = read_votes(find_votes(labels, data_path))
    return relabel(data, votes), {"source": "ferplus", "file": votes.path, "sha256": votes.sha256}
