"""The ferlab pack: a lossless, checksummed file of some splits of a FER source, loaded as that source's rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import write_fer_dirs

from ferlab.data.errors import DataError
from ferlab.data.ferplus import apply_labels
from ferlab.data.formats import detect_layout, load_data
from ferlab.data.pack import HEADER_LENGTH, MAGIC, decode_images, encode_images, pack_info, read_pack, write_pack
from ferlab.data.types import FerData


@pytest.fixture(scope="module")
def fer_csv(tmp_path_factory) -> Path:
    return write_fer_dirs(tmp_path_factory.mktemp("data"), sizes=(60, 20, 20))[0]


def test_residual_coding_is_lossless_on_hard_images():
    rng = np.random.default_rng(0)
    images = np.stack([
        rng.integers(0, 256, (48, 48)),  # noise: every predictor misses
        np.full((48, 48), 255), np.zeros((48, 48)),  # the extremes (residuals wrap around 256)
        np.add.outer(np.arange(48), np.arange(48)) * 255 // 94,  # smooth gradients: the predictor's good case
        np.tile([0, 255], (48, 24)),  # a vertical stripe of every other column
    ]).astype(np.uint8)
    assert np.array_equal(decode_images(encode_images(images)), images)
    smooth = encode_images(images[3:4])
    assert (smooth <= 3).mean() > 0.9  # a gradient leaves residuals near 0: what makes the file small


def test_pack_round_trip_keeps_the_source_rows(fer_csv, tmp_path):
    src = load_data(fer_csv, progress=False)
    header = write_pack(src, tmp_path / "d.ferpack")
    assert header["splits"] == {"train": 60, "val": 20} and header["rows"] == 80
    got = read_pack(tmp_path / "d.ferpack")
    keep = np.flatnonzero(src.split != "test")  # PrivateTest is left out by default
    assert np.array_equal(got.images, src.images[keep])
    assert np.array_equal(got.labels, src.labels[keep]) and np.array_equal(got.ids, src.ids[keep])
    assert list(got.split) == list(src.split[keep])
    # it stands for its source: same layout and fingerprint, so FER+ labels and protocols treat it alike
    assert (got.layout, got.fingerprint, got.class_names) == (src.layout, src.fingerprint, src.class_names)
    assert "packed from fer2013.csv" in got.notes[-1]
    assert detect_layout(tmp_path / "d.ferpack") == "fer2013-csv"
    assert np.array_equal(load_data(tmp_path / "d.ferpack").images, got.images)
    assert pack_info(tmp_path / "d.ferpack")["images_sha256"] == header["images_sha256"]


def test_ferplus_labels_on_a_pack_match_the_source(fer_csv, tmp_path):
    src = load_data(fer_csv, progress=False)
    pack = tmp_path / "d.ferpack"
    write_pack(src, pack)
    (tmp_path / "fer2013new.csv").write_bytes((fer_csv.parent.parent / "ferplus" / "fer2013new.csv").read_bytes())
    a, info_a = apply_labels(src, "ferplus", str(fer_csv))
    b, info_b = apply_labels(read_pack(pack), "ferplus", str(pack))
    assert a.fingerprint == b.fingerprint and info_a["sha256"] == info_b["sha256"]
    keep = a.split != "test"
    assert np.array_equal(a.labels[keep], b.labels) and np.allclose(a.targets[keep], b.targets)


def _corrupt(path: Path, how: str) -> None:
    raw = bytearray(path.read_bytes())
    if how == "flip":
        raw[-100] ^= 0xFF
    elif how == "truncate":
        raw = raw[:-10]
    elif how == "magic":
        raw[:len(MAGIC)] = b"NOTAPACK"
    elif how == "header-length":
        raw[len(MAGIC):len(MAGIC) + HEADER_LENGTH.size] = HEADER_LENGTH.pack(1 << 40)
    elif how == "header":
        start = len(MAGIC) + HEADER_LENGTH.size
        raw[start:start + 1] = b"\xff"
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("how, message", [
    ("flip", "payload checksum mismatch"),
    ("truncate", "truncated or appended to"),
    ("magic", "not a ferlab pack"),
    ("header-length", "the file is corrupt"),
    ("header", "unreadable header"),
])
def test_a_damaged_pack_is_refused_with_the_reason(fer_csv, tmp_path, how, message):
    path = tmp_path / "d.ferpack"
    write_pack(load_data(fer_csv, progress=False), path)
    _corrupt(path, how)
    with pytest.raises(DataError, match=message) as e:
        read_pack(path)
    assert str(path) in str(e.value)


def test_pack_errors(fer_csv, tmp_path):
    src = load_data(fer_csv, progress=False)
    with pytest.raises(DataError, match="cannot read"):
        load_data(tmp_path / "missing.ferpack")
    with pytest.raises(ValueError, match="ends in .ferpack"):
        write_pack(src, tmp_path / "d.bin")
    with pytest.raises(ValueError, match="unknown split"):
        write_pack(src, tmp_path / "d.ferpack", splits=("training",))
    with pytest.raises(ValueError, match="FER\\+ votes travel as their own file"):
        write_pack(apply_labels(src, "ferplus", str(fer_csv))[0], tmp_path / "d.ferpack")
    empty = FerData(src.images[:2], src.labels[:2], np.array(["test", "test"]), src.ids[:2])
    with pytest.raises(ValueError, match="no rows in train, val"):
        write_pack(empty, tmp_path / "d.ferpack")
    assert not (tmp_path / "d.ferpack").exists()
