"""Loaders, validation and the parse cache (ferlab.data.formats / ferlab.data.cache) on small synthetic files."""

from __future__ import annotations

import gc
import gzip
import hashlib
import json
import os
import threading
import time
import warnings
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

import ferlab.data.csv_layouts as CL
import ferlab.data.csv_parse as CP
import ferlab.data.image_folder as IF
from ferlab import CLASS_NAMES
from ferlab.data import cache as C
from ferlab.data.formats import DataError, DataWarning, detect_layout, load_data

USAGES = ("Training", "PublicTest", "PrivateTest")
SPLIT_OF = {"Training": "train", "PublicTest": "val", "PrivateTest": "test"}


def make_rows(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 48, 48), dtype=np.uint8)
    images[0, 0, :4] = [0, 9, 10, 255]  # edge values: 1, 2 and 3 digits
    images[0, 1, :3] = [99, 100, 250]
    labels = rng.integers(0, 7, size=n)
    usages = [USAGES[i % 3] for i in range(n)]
    return images, labels, usages


def pix(img: np.ndarray) -> str:
    return " ".join(map(str, img.reshape(-1)))


def fer_lines(images, labels, usages, layout: str = "fer2013") -> list[str]:
    rows = zip(images, labels, usages, strict=True)
    if layout == "icml":
        return ["emotion, Usage, pixels"] + [f"{lab},{u},{pix(im)}" for im, lab, u in rows]
    return ["emotion,pixels,Usage"] + [f'{lab},"{pix(im)}",{u}' for im, lab, u in rows]


def course_train_lines(images, labels, header: str = "label,feature") -> list[str]:
    return [header] + [f"{lab},{pix(im)}" for im, lab in zip(images, labels, strict=True)]


def write(path: Path, lines: list[str], gz: bool = False, eol: str = "\n") -> Path:
    data = (eol.join(lines) + eol).encode()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


@pytest.fixture
def rows():
    return make_rows(12)


@pytest.fixture
def small_chunks(monkeypatch):
    """Tiny vectorised chunks so a dozen rows exercise several chunks."""
    monkeypatch.setattr(CP, "CHUNK_ROWS", 5)  # read by the parsers there


def load(path, tmp_path, **kw):
    kw.setdefault("cache_dir", tmp_path / "cache")
    kw.setdefault("progress", False)
    return load_data(path, **kw)


# ---------------------------------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("gz", [False, True])
def test_fer2013_roundtrip(tmp_path, rows, small_chunks, gz):
    images, labels, usages = rows
    lines = fer_lines(images, labels, usages)
    p = write(tmp_path / ("fer2013.csv.gz" if gz else "fer2013.csv"), lines, gz=gz)
    assert detect_layout(p) == "fer2013-csv"
    d = load(p, tmp_path)
    assert d.layout == "fer2013-csv" and len(d) == 12 and d.n_skipped == 0
    assert d.images.dtype == np.uint8 and d.images.shape == (12, 48, 48)
    np.testing.assert_array_equal(d.images, images)
    np.testing.assert_array_equal(d.labels, labels)
    assert d.labels.dtype == np.int64 and d.ids.dtype == np.int64
    assert list(d.split) == [SPLIT_OF[u] for u in usages]
    np.testing.assert_array_equal(d.ids, np.arange(12))
    # fingerprint = SHA-256 of the (decompressed) CSV text, the same for .csv and .csv.gz
    text = ("\n".join(lines) + "\n").encode()
    assert d.fingerprint == hashlib.sha256(text).hexdigest()[:16]


def test_icml_detected_by_header_not_name(tmp_path, rows):
    images, labels, usages = rows
    p = write(tmp_path / "faces.csv", fer_lines(images, labels, usages, "icml"))
    assert detect_layout(p) == "icml-csv"
    d = load(p, tmp_path)
    assert d.layout == "icml-csv"
    np.testing.assert_array_equal(d.images, images)
    np.testing.assert_array_equal(d.labels, labels)
    assert list(d.split) == [SPLIT_OF[u] for u in usages]


def test_crlf_bom_blank_lines_and_odd_spacing(tmp_path, rows):
    """Valid-but-unusual text: CRLF, BOM, blank lines, double spaces, leading zeros (slow path, same values)."""
    images, labels, usages = rows
    lines = fer_lines(images, labels, usages)
    lines[0] = "\ufeff" + lines[0]
    lines[3] = lines[3].replace(" ", "  ", 5)  # double spaces
    lines[5] = lines[5].replace('"', '" ', 1)  # leading space inside the quotes
    lines[6] = lines[6].replace('"', '"00', 1)  # leading zeros
    lines.insert(7, "")
    p = write(tmp_path / "fer2013.csv", lines, eol="\r\n")
    d = load(p, tmp_path)
    np.testing.assert_array_equal(d.images, images)
    np.testing.assert_array_equal(d.ids, np.arange(12))


def test_fast_and_row_paths_agree(tmp_path, rows, small_chunks):
    images, labels, usages = rows
    p = write(tmp_path / "fer2013.csv", fer_lines(images, labels, usages))
    spec = CL._classify_csv(p)
    fast = CP._parse_csv_fast(spec, False, "x", False)
    slow = CP._parse_csv_rows(spec, False, False, False)
    for name in ("images", "labels", "split", "ids"):
        a = np.concatenate([getattr(c, name) for c in fast.chunks])
        b = np.concatenate([getattr(c, name) for c in slow.chunks])
        np.testing.assert_array_equal(a, b)


def test_parse_pixels_fast_edge_cases():
    vals = np.arange(2304) % 256
    good = " ".join(map(str, vals))
    np.testing.assert_array_equal(CP._parse_pixels_fast([good, good]).reshape(2, -1), [vals, vals])
    for bad in (
        good + " 1",
        good.rsplit(" ", 1)[0],
        good.replace("255", "256", 1),
        good.replace("12", "1.2", 1),
        " " + good,
        good.replace("7", "0007", 1),
        good.replace("5", "x", 1),
    ):
        assert CP._parse_pixels_fast([good, bad]) is None


def course_dir(tmp_path: Path, rows) -> Path:
    images, labels, _ = rows
    d = tmp_path / "course"
    d.mkdir()
    write(d / "train.csv", course_train_lines(images[:8], labels[:8]))
    write(d / "test.csv", ["id,feature"] + [f"{100 + i},{pix(im)}" for i, im in enumerate(images[8:])])
    return d


@pytest.mark.parametrize("which", ["dir", "train.csv", "test.csv"])
def test_course_roundtrip(tmp_path, rows, which):
    images, labels, _ = rows
    d = course_dir(tmp_path, rows)
    p = d if which == "dir" else d / which
    assert detect_layout(p) == "course-csv"
    data = load(p, tmp_path)
    assert data.layout == "course-csv" and len(data) == 12
    np.testing.assert_array_equal(data.images, images)
    assert list(data.split) == ["train"] * 8 + ["unlabeled"] * 4
    np.testing.assert_array_equal(data.labels, list(labels[:8]) + [-1] * 4)
    np.testing.assert_array_equal(data.ids, list(range(8)) + [100, 101, 102, 103])


def test_course_train_only(tmp_path, rows):
    images, labels, _ = rows
    p = write(tmp_path / "train.csv", course_train_lines(images, labels))
    data = load(p, tmp_path)
    assert data.layout == "course-csv" and set(data.split) == {"train"}


def test_fer2013_dir_and_missing_usage(tmp_path, rows):
    images, labels, usages = rows
    d = tmp_path / "kaggle"
    d.mkdir()
    write(d / "fer2013.csv", fer_lines(images, labels, usages))
    assert detect_layout(d) == "fer2013-csv"
    assert len(load(d, tmp_path)) == 12
    # no Usage column: accepted, every row "train"
    p = write(tmp_path / "nousage.csv", course_train_lines(images, labels, header="emotion,pixels"))
    data = load(p, tmp_path)
    assert set(data.split) == {"train"} and any("no Usage" in n for n in data.notes)


def write_img(path: Path, img: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(path.suffix, img)
    assert ok
    path.write_bytes(buf.tobytes())


def image_folder(tmp_path: Path, splits=("Train", "Validation", "PrivateTest")) -> tuple[Path, dict]:
    """root/<split>/<class>/*.png with synonyms and mixed case; returns root and {relpath: (img, split, label)}."""
    rng = np.random.default_rng(1)
    root = tmp_path / "imgs"
    classes = {"Anger": 0, "disgusted": 1, "SCARED": 2, "happiness": 3, "sad": 4, "surprised": 5, "calm": 6}
    split_of = {"Train": "train", "Validation": "val", "PrivateTest": "test", "training": "train", "test": "test"}
    truth = {}
    for s in splits:
        for cname, label in classes.items():
            for k in (1, 2, 10):
                img = rng.integers(0, 256, (48, 48), dtype=np.uint8)
                rel = f"{s}/{cname}/im{k}.png"
                write_img(root / rel, img)
                truth[rel] = (img, split_of[s], label)
    return root, truth


def test_image_folder_roundtrip(tmp_path):
    root, truth = image_folder(tmp_path)
    (root / "Train" / "happiness" / "notes.txt").write_text("not an image")
    assert detect_layout(root) == "image-folder"
    d = load(root, tmp_path)
    assert d.layout == "image-folder" and len(d) == len(truth) == 63
    order = sorted(
        truth,
        key=lambda r: (
            ("train", "val", "test").index(truth[r][1]),
            truth[r][2],
            int(r.rsplit("im", 1)[1].split(".")[0]),
        ),
    )
    for i, rel in enumerate(order):
        img, split, label = truth[rel]
        np.testing.assert_array_equal(d.images[i], img)
        assert d.split[i] == split and d.labels[i] == label
    np.testing.assert_array_equal(d.ids, np.arange(63))
    assert any("ignored 1" in n for n in d.notes)
    assert len(d.fingerprint) == 16


def test_image_folder_resize_formats_and_no_val(tmp_path):
    rng = np.random.default_rng(2)
    root = tmp_path / "imgs"
    big = rng.integers(0, 256, (96, 64), dtype=np.uint8)
    color = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
    write_img(root / "training/happy/a.png", big)
    write_img(root / "training/happy/b.bmp", color)
    write_img(root / "training/sad/c.jpg", big[:48, :48])
    write_img(root / "test/joy/d.png", big[:48, :48])
    d = load(root, tmp_path)
    assert list(d.split) == ["train", "train", "train", "test"]
    np.testing.assert_array_equal(d.images[0], cv2.resize(big, (48, 48), interpolation=cv2.INTER_AREA))
    gray = cv2.cvtColor(color, cv2.COLOR_BGR2GRAY).astype(int)
    assert np.abs(d.images[1].astype(int) - gray).max() <= 1
    assert list(d.labels) == [3, 3, 4, 3]
    assert any("resized 1 images" in n and "INTER_AREA" in n for n in d.notes)
    assert "val" not in set(d.split)


def test_image_folder_class_dirs_only(tmp_path):
    root = tmp_path / "test"
    write_img(root / "angry/a.png", np.zeros((48, 48), np.uint8))
    write_img(root / "neutral/b.png", np.full((48, 48), 7, np.uint8))
    d = load(root, tmp_path)
    assert list(d.split) == ["test", "test"] and list(d.labels) == [0, 6]


# ---------------------------------------------------------------------------------------------------------------------
# Malformed input


def bad_lines(rows, line_no: int, mutate) -> list[str]:
    lines = fer_lines(*rows)
    lines[line_no - 1] = mutate(lines[line_no - 1])
    return lines


MALFORMED = [
    (
        "2303 pixels",
        lambda s: s.split(",")[0] + ',"' + s.split('"')[1].split(" ", 1)[1] + '",Training',
        "2303 pixels, expected 2304",
    ),
    ("2305 pixels", lambda s: s.replace('"', '"1 ', 1), "2305 pixels, expected 2304"),
    (
        "pixel 256",
        lambda s: s.split(",")[0] + ',"256 ' + s.split('"')[1].split(" ", 1)[1] + '",Training',
        "pixel 1 is 256, out of range 0..255",
    ),
    (
        "pixel -1",
        lambda s: s.split(",")[0] + ',"1 -1 ' + s.split('"')[1].split(" ", 2)[2] + '",Training',
        "pixel 2 is -1, out of range",
    ),
    (
        "pixel abc",
        lambda s: s.split(",")[0] + ',"1 2 abc ' + s.split('"')[1].split(" ", 3)[3] + '",Training',
        "pixel 3 is 'abc', not an integer",
    ),
    (
        "pixel huge",
        lambda s: s.split(",")[0] + ',"1 2 3 4 ' + "9" * 30 + " " + s.split('"')[1].split(" ", 5)[5] + '",Training',
        "pixel 5 is 999999999999999999999999999999, out of range 0..255",
    ),
    (
        "pixel 1.5",
        lambda s: s.split(",")[0] + ',"1.5 ' + s.split('"')[1].split(" ", 1)[1] + '",Training',
        "pixel 1 is '1.5', not an integer",
    ),
    ("no pixels", lambda s: s.split(",")[0] + ',"",Training', "pixels missing"),
    ("label 7", lambda s: "7" + s[1:], "label 7 out of range 0..6"),
    ("label -1", lambda s: "-1" + s[1:], "label -1 out of range"),
    ("label missing", lambda s: s[1:], "label missing"),
    ("label x", lambda s: "x" + s[1:], "label 'x' is not an integer"),
    ("label 1.0", lambda s: "1.0" + s[1:], "label '1.0' is not an integer"),
    ("bad usage", lambda s: s.rsplit(",", 1)[0] + ",Foo", "unknown Usage 'Foo'"),
    ("usage missing", lambda s: s.rsplit(",", 1)[0] + ",", "Usage missing"),
    ("extra field", lambda s: s + ",x", "4 fields, expected 3"),
    ("missing field", lambda s: s.rsplit(",", 1)[0], "2 fields, expected 3"),
    ("only commas", lambda s: ",,", "empty row (3 empty fields)"),
    ("commas and spaces", lambda s: " , ,", "empty row (3 empty fields)"),
]


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize(("name", "mutate", "problem"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_row_names_file_and_line(tmp_path, rows, small_chunks, name, mutate, problem, gz):
    lines = bad_lines(rows, 9, mutate)
    p = write(tmp_path / ("fer2013.csv.gz" if gz else "fer2013.csv"), lines, gz=gz)
    with pytest.raises(DataError) as ei:
        load(p, tmp_path)
    msg = str(ei.value)
    assert f"fer2013.csv{'.gz' if gz else ''} line 9: {problem}" in msg
    assert ei.value.line == 9 and ei.value.path.endswith(p.name)
    assert isinstance(ei.value, ValueError)


def test_first_bad_line_reported_after_blank_and_multiline(tmp_path, rows, small_chunks):
    lines = fer_lines(*rows)
    lines[2] = lines[2].rsplit(",", 1)[0] + ',"Train\ning"'  # a quoted field spanning lines 3-4: bad Usage
    lines[8] = "9" + lines[8][1:]  # record 8 now starts on file line 10
    p = write(tmp_path / "a.csv", lines)
    with pytest.raises(DataError, match=r"line 3: unknown Usage"):
        load(p, tmp_path)
    with pytest.warns(DataWarning):
        note = " ".join(load(p, tmp_path, skip_bad=True).notes)
    assert "line 3: unknown Usage" in note and "line 10: label 9" in note
    lines = fer_lines(*rows)
    lines.insert(4, "")  # blank line 5 is skipped, not an error
    lines[10] = "7" + lines[10][1:]  # file line 11
    lines[12] = "8" + lines[12][1:]  # file line 13: only the first is named
    with pytest.raises(DataError, match=r"line 11: label 7 out of range") as ei:
        load(write(tmp_path / "b.csv", lines), tmp_path)
    assert "skip_bad=True" in str(ei.value)


def test_bad_course_id(tmp_path, rows):
    d = course_dir(tmp_path, rows)
    lines = (d / "test.csv").read_text().splitlines()
    lines[2] = "x" + lines[2]
    write(d / "test.csv", lines)
    with pytest.raises(DataError, match=r"test.csv line 3: id 'x101' is not an integer"):
        load(d, tmp_path)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"", "file is empty"),
        (b"\n\n", "header line is empty"),
        (b"emotion,pixels,Usage\n", "no data rows"),
        (b"foo,bar,baz\n1,2,3\n", "unrecognised header"),
        (b"emotion,pixel,Usage\n1,2,3\n", "lacks column(s) ['pixels']"),
        (b"emotion,pixels,pixels\n1,2,3\n", "duplicate header column"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe", "not a UTF-8 text CSV"),
    ],
)
def test_bad_files(tmp_path, content, problem):
    p = tmp_path / "data.csv"
    p.write_bytes(content)
    with pytest.raises(DataError, match="data.csv") as ei:
        load(p, tmp_path)
    assert problem in str(ei.value)


def test_missing_path_and_unknown_layout(tmp_path):
    with pytest.raises(DataError, match="no such file or directory") as ei:
        detect_layout(tmp_path / "nope.csv")
    assert "nope.csv" in str(ei.value)
    with pytest.raises(DataError, match="no such file"):
        load(tmp_path / "nope", tmp_path)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match="cannot tell the data layout"):
        detect_layout(tmp_path / "empty_dir")


@pytest.mark.parametrize("damage", ["truncate", "crc", "not-gzip"])
def test_corrupt_gzip(tmp_path, damage):
    images, labels, usages = make_rows(60)
    raw = gzip.compress(("\n".join(fer_lines(images, labels, usages)) + "\n").encode())
    if damage == "truncate":
        raw = raw[: len(raw) * 2 // 3]
    elif damage == "crc":
        raw = raw[:-8] + b"\x00\x00\x00\x00" + raw[-4:]
    else:
        raw = b"emotion"
    p = tmp_path / "fer2013.csv.gz"
    p.write_bytes(raw)
    with pytest.raises(DataError, match="fer2013.csv.gz") as ei:
        load(p, tmp_path)
    assert ("corrupt gzip" if damage != "not-gzip" else "not gzip") in str(ei.value)
    assert not [t for t in threading.enumerate() if t.name == "ferlab-prefetch"]  # reader thread was joined


def test_gzip_flipped_byte_blames_gzip_not_a_row(tmp_path):
    images, labels, usages = make_rows(60)
    raw = bytearray(gzip.compress(("\n".join(fer_lines(images, labels, usages)) + "\n").encode()))
    raw[len(raw) // 2] ^= 0xFF
    p = tmp_path / "fer2013.csv.gz"
    p.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="corrupt gzip"):
        load(p, tmp_path)


def test_corrupt_image_and_unknown_dirs(tmp_path):
    root, _ = image_folder(tmp_path, splits=("Train",))
    bad = root / "Train" / "sad" / "im2.png"
    bad.write_bytes(b"\x89PNG garbage")
    with pytest.raises(DataError, match=r"im2\.png: cannot decode image"):
        load(root, tmp_path)
    with pytest.warns(DataWarning, match="skipped 1 unreadable image"):
        d = load(root, tmp_path, skip_bad=True)
    assert len(d) == 20 and d.n_skipped == 1
    (root / "Train" / "contempt").mkdir()
    with pytest.raises(DataError, match="unknown class directory 'contempt'") as ei:
        load(root, tmp_path)
    assert "contempt" in str(ei.value.path)
    (root / "Train" / "contempt").rmdir()
    (root / "holdout").mkdir()
    with pytest.raises(DataError, match="unknown split directory 'holdout'"):
        load(root, tmp_path)


# ---------------------------------------------------------------------------------------------------------------------
# skip_bad


def test_skip_bad_counts_and_keeps_ids(tmp_path, rows, small_chunks):
    images, labels, usages = rows
    lines = fer_lines(images, labels, usages)
    lines[2] = "9" + lines[2][1:]  # row 1
    lines[5] = lines[5].replace('"', '"300 ', 1)  # row 4: 2305 pixels
    lines[11] = lines[11].rsplit(",", 1)[0] + ",Bogus"  # row 10
    p = write(tmp_path / "fer2013.csv", lines)
    with pytest.warns(DataWarning, match="skipped 3 malformed row"):
        d = load(p, tmp_path, skip_bad=True)
    keep = [i for i in range(12) if i not in (1, 4, 10)]
    assert d.n_skipped == 3 and len(d) == 9
    np.testing.assert_array_equal(d.ids, keep)
    np.testing.assert_array_equal(d.images, images[keep])
    np.testing.assert_array_equal(d.labels, labels[keep])
    note = next(n for n in d.notes if "skipped 3" in n)
    assert "line 3: label 9" in note and "line 6: 2305 pixels" in note and "line 12: unknown Usage" in note
    # skip_bad is part of the cache key: a strict load still fails, and the cached lenient load warns again
    with pytest.raises(DataError, match="line 3"):
        load(p, tmp_path)
    with pytest.warns(DataWarning, match="cached"):
        assert load(p, tmp_path, skip_bad=True).n_skipped == 3


def test_skip_bad_everything_bad(tmp_path, rows):
    lines = [ln if i == 0 else "9" + ln[1:] for i, ln in enumerate(fer_lines(*rows))]
    with pytest.raises(DataError, match="no data rows"):
        load(write(tmp_path / "x.csv", lines), tmp_path, skip_bad=True)


# ---------------------------------------------------------------------------------------------------------------------
# Cache


def cache_files(d: Path) -> list[Path]:
    return sorted(d.glob("*.npz")) if d.exists() else []


def test_cache_hit_skips_parser(tmp_path, rows, monkeypatch):
    images, labels, usages = rows
    p = write(tmp_path / "fer2013.csv.gz", fer_lines(images, labels, usages), gz=True)
    first = load(p, tmp_path)
    assert len(cache_files(tmp_path / "cache")) == 1

    def boom(*a, **k):
        raise AssertionError("parser called on a cache hit")

    monkeypatch.setattr(CP, "_parse_csv", boom)  # _load_csvs looks it up there
    second = load(p, tmp_path)
    for name in ("images", "labels", "split", "ids"):
        np.testing.assert_array_equal(getattr(first, name), getattr(second, name))
        assert getattr(first, name).dtype == getattr(second, name).dtype
    assert (second.fingerprint, second.layout, second.notes, second.source) == (
        first.fingerprint,
        first.layout,
        first.notes,
        first.source,
    )
    with pytest.raises(AssertionError):  # cache=False really parses
        load(p, tmp_path, cache=False)


def test_cache_invalidated_on_change_even_with_same_size_and_mtime(tmp_path, rows):
    images, labels, usages = rows
    p = write(tmp_path / "fer2013.csv", fer_lines(images, labels, usages))
    st = p.stat()
    assert list(load(p, tmp_path).labels) == list(labels)
    labels2 = (labels + 1) % 7  # same text length
    write(p, fer_lines(images, labels2, usages))
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert p.stat().st_size == st.st_size
    d = load(p, tmp_path)
    assert list(d.labels) == list(labels2)
    assert len(cache_files(tmp_path / "cache")) == 1  # the stale entry was pruned


@pytest.mark.parametrize("damage", ["garbage", "truncate", "empty"])
def test_corrupt_cache_file_is_rebuilt(tmp_path, rows, damage):
    images, labels, usages = rows
    p = write(tmp_path / "fer2013.csv", fer_lines(images, labels, usages))
    load(p, tmp_path)
    (entry,) = cache_files(tmp_path / "cache")
    blob = entry.read_bytes()
    entry.write_bytes({"garbage": b"not a zip at all", "truncate": blob[: len(blob) // 2], "empty": b""}[damage])
    with pytest.warns(UserWarning, match="unreadable cache file"):
        d = load(p, tmp_path)
    np.testing.assert_array_equal(d.images, images)
    (entry,) = cache_files(tmp_path / "cache")
    assert entry.stat().st_size > 12 * 2304  # rewritten
    load(p, tmp_path)  # and now a clean hit


def test_cache_dir_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv("FERLAB_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert C.resolve_cache_dir() == tmp_path / "xdg" / "ferlab"
    monkeypatch.setenv("FERLAB_CACHE_DIR", str(tmp_path / "env"))
    assert C.resolve_cache_dir() == tmp_path / "env"
    assert C.resolve_cache_dir(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("FERLAB_CACHE_DIR")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert C.resolve_cache_dir() == tmp_path / "home" / ".cache" / "ferlab"


def test_env_cache_dir_used_and_no_temp_files_left(tmp_path, rows, monkeypatch):
    monkeypatch.setenv("FERLAB_CACHE_DIR", str(tmp_path / "envcache"))
    p = write(tmp_path / "fer2013.csv", fer_lines(*rows))
    load_data(p, progress=False)
    assert len(cache_files(tmp_path / "envcache")) == 1
    assert not [f for f in (tmp_path / "envcache").iterdir() if f.suffix == ".tmp"]


def test_unwritable_cache_dir_only_warns(tmp_path, rows):
    p = write(tmp_path / "fer2013.csv", fer_lines(*rows))
    blocker = tmp_path / "file-not-dir"
    blocker.write_text("x")
    with pytest.warns(UserWarning, match="could not write cache"):
        d = load_data(p, cache_dir=blocker / "sub", progress=False)
    assert len(d) == 12


def test_image_folder_cache(tmp_path, monkeypatch):
    root, _ = image_folder(tmp_path, splits=("Train",))
    first = load(root, tmp_path)
    monkeypatch.setattr(IF, "_read_image", lambda p: (_ for _ in ()).throw(AssertionError("read on cache hit")))
    second = load(root, tmp_path)
    np.testing.assert_array_equal(first.images, second.images)
    assert second.fingerprint == first.fingerprint
    monkeypatch.undo()
    img = root / "Train" / "sad" / "im1.png"
    write_img(img, np.zeros((48, 48), np.uint8))
    st = img.stat()
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    third = load(root, tmp_path)
    assert third.fingerprint != first.fingerprint
    assert not third.images.any(axis=(1, 2)).all()


# ---------------------------------------------------------------------------------------------------------------------
# The real FER2013 file


def real_fer2013() -> Path:
    env = os.environ.get("FERLAB_FER2013")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared/data/fer2013/fer2013.csv.gz"


@pytest.mark.realdata
def test_real_fer2013(tmp_path):
    path = real_fer2013()
    if not path.is_file():
        pytest.skip(f"real FER2013 not found at {path} (set FERLAB_FER2013 to its fer2013.csv[.gz])")
    t0 = time.perf_counter()
    d = load_data(path, cache_dir=tmp_path, progress=False)
    first = time.perf_counter() - t0
    assert d.layout == "fer2013-csv" and len(d) == 35887 and d.n_skipped == 0
    assert {s: int((d.split == s).sum()) for s in ("train", "val", "test")} == {
        "train": 28709,
        "val": 3589,
        "test": 3589,
    }
    assert list(np.bincount(d.labels, minlength=7)) == [4953, 547, 5121, 8989, 6077, 4002, 6198]
    per_split = {
        "train": [3995, 436, 4097, 7215, 4830, 3171, 4965],
        "val": [467, 56, 496, 895, 653, 415, 607],
        "test": [491, 55, 528, 879, 594, 416, 626],
    }
    for s, counts in per_split.items():
        assert list(np.bincount(d.labels[d.split == s], minlength=7)) == counts
    assert (d.split[:28709] == "train").all() and (d.split[32298:] == "test").all()
    assert d.fingerprint == "3b8d9617d1017f34"  # SHA-256 of the uncompressed fer2013.csv (README)
    t0 = time.perf_counter()
    again = load_data(path, cache_dir=tmp_path, progress=False)
    cached = time.perf_counter() - t0
    np.testing.assert_array_equal(again.images, d.images)
    print(f"first parse {first:.2f} s, cached load {cached:.2f} s")


# ---------------------------------------------------------------------------------------------------------------------
# Hostile or confusing input: bombs, missing headers, near-miss layouts, tampered cache entries


def png_claiming(width: int, height: int, full: bool = False) -> bytes:
    """A gray PNG whose header claims width x height; ``full`` compresses all rows (a real, small-file bomb)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + tag + data + zlib.crc32(tag + data).to_bytes(4, "big")

    z = zlib.compressobj(9)
    row = b"\0" * (width + 1)  # filter byte + pixels
    idat = b"".join(z.compress(row) for _ in range(height if full else 1)) + z.flush()
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.mark.parametrize(("side", "full"), [(12000, True), (100000, False)])
def test_image_folder_refuses_decompression_bomb(tmp_path, monkeypatch, side, full):
    root = tmp_path / "imgs"
    write_img(root / "train/sad/ok.png", np.full((48, 48), 5, np.uint8))
    bomb = root / "train/happy/bomb.png"
    bomb.parent.mkdir(parents=True)
    bomb.write_bytes(png_claiming(side, side, full))
    real_decode = cv2.imdecode

    def guarded(buf: np.ndarray, flags: int) -> np.ndarray:
        assert len(buf) != bomb.stat().st_size, "the bomb reached cv2.imdecode"
        return real_decode(buf, flags)

    monkeypatch.setattr(cv2, "imdecode", guarded)
    with pytest.raises(DataError, match=rf"bomb\.png: PNG header says {side}x{side} pixels") as ei:
        load(root, tmp_path)
    msg = str(ei.value)
    assert "\n" not in msg and "decompression bomb" in msg and "OpenCV" not in msg
    with pytest.warns(DataWarning, match="skipped 1 unreadable image"):
        d = load(root, tmp_path, skip_bad=True)
    assert len(d) == 1 and list(d.labels) == [4]
    (note,) = [n for n in d.notes if "skipped" in n]
    assert f"{side}x{side}" in note and "\n" not in note


def test_opencv_error_text_is_one_line(tmp_path, monkeypatch):
    root = tmp_path / "imgs"
    write_img(root / "train/sad/ok.png", np.full((48, 48), 5, np.uint8))

    def failing(buf: np.ndarray, flags: int) -> np.ndarray:
        raise cv2.error("OpenCV(4.x) loadsave.cpp:79: error: (-215:Assertion failed)\n  pixels <= LIMIT in f\n\n")

    monkeypatch.setattr(cv2, "imdecode", failing)
    with pytest.raises(DataError, match=r"ok\.png: cannot decode image \(pixels <= LIMIT in f\)") as ei:
        load(root, tmp_path)
    assert "\n" not in str(ei.value)


@pytest.mark.parametrize(
    ("layout", "hint"),
    [
        ("fer2013", "'emotion,pixels,Usage'"),
        ("icml", "'emotion,Usage,pixels'"),
        ("course", "'label,feature' (or 'id,feature'"),
    ],
)
def test_headerless_csv_says_header_missing(tmp_path, rows, layout, hint):
    images, labels, usages = rows
    if layout == "course":
        lines = course_train_lines(images, labels)[1:]
    else:
        lines = fer_lines(images, labels, usages, layout)[1:]
    p = write(tmp_path / "data.csv", lines)
    with pytest.raises(DataError, match=r"data\.csv line 1: the file seems to have no header row") as ei:
        load(p, tmp_path)
    msg = str(ei.value)
    assert hint in msg and "2304 pixel values" in msg and len(msg) < 400
    assert ei.value.line == 1


def test_unrecognised_header_fields_are_shortened(tmp_path):
    p = write(tmp_path / "data.csv", ["pixel data," + "x" * 9000 + ",Usage", "1,2,3"])
    with pytest.raises(DataError, match="unrecognised header") as ei:
        load(p, tmp_path)
    assert "x" * 37 + "..." in str(ei.value) and len(str(ei.value)) < 400
    wide = write(tmp_path / "wide.csv", [",".join(f"col{i}" for i in range(2305)), "1,2,3"])
    with pytest.raises(DataError, match=r"and 2297 more field\(s\)") as ei:
        load(wide, tmp_path)
    assert len(str(ei.value)) < 400


def test_flat_class_layout_names_misspelled_folder(tmp_path):
    root = tmp_path / "faces"
    write_img(root / "happy/a.png", np.zeros((48, 48), np.uint8))
    write_img(root / "happpy/b.png", np.zeros((48, 48), np.uint8))
    assert detect_layout(root) == "image-folder"
    with pytest.raises(DataError, match=r"unknown class directory 'happpy' \(did you mean 'happy'\?") as ei:
        load(root, tmp_path)
    assert ei.value.path is not None and ei.value.path.endswith("happpy")


@pytest.mark.parametrize("names", [("docs", "src"), ("happy", "docs", "src"), ()])
def test_mostly_unrelated_folders_are_not_an_image_folder(tmp_path, names):
    root = tmp_path / "stuff"
    root.mkdir()
    for n in names:
        (root / n).mkdir()
    with pytest.raises(DataError, match="cannot tell the data layout"):
        detect_layout(root)


def test_dir_with_fer2013_train_and_test_csv(tmp_path, rows):
    images, labels, usages = rows
    d = tmp_path / "split_csvs"
    d.mkdir()
    write(d / "train.csv", fer_lines(images[:8], labels[:8], usages[:8]))
    write(d / "test.csv", fer_lines(images[8:], labels[8:], usages[8:]))
    with pytest.raises(DataError, match="cannot tell the data layout") as ei:
        load(d, tmp_path)
    msg = str(ei.value)
    assert "found train.csv (fer2013-csv) and test.csv (fer2013-csv)" in msg
    assert "pass the file itself" in msg and str(d / "train.csv") in msg and "\n" not in msg
    assert len(load(d / "train.csv", tmp_path)) == 8  # the suggestion works


def test_dir_with_other_named_csvs(tmp_path, rows):
    images, labels, usages = rows
    d = tmp_path / "csvs"
    d.mkdir()
    write(d / "fer_train.csv", fer_lines(images, labels, usages))
    write(d / "notes.csv", ["a,b", "1,2"])
    with pytest.raises(DataError, match="cannot tell the data layout") as ei:
        detect_layout(d)
    msg = str(ei.value)
    assert "found fer_train.csv (fer2013-csv), notes.csv (unrecognised header" in msg
    assert "pass the file itself" in msg


def _tamper(entry: Path, damage: str) -> None:
    with np.load(entry, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays["meta"][()]))
    if damage == "meta-list":
        meta = [meta]
    elif damage == "class-names-int":
        meta["class_names"] = 5
    elif damage == "notes-str":
        meta["notes"] = "not a list"
    elif damage == "small-images":
        arrays["images"] = np.zeros((len(arrays["images"]), 10, 10), np.uint8)
    arrays["meta"] = np.array(json.dumps(meta))
    with open(entry, "wb") as f:
        np.savez(f, **arrays)


@pytest.mark.parametrize("damage", ["meta-list", "class-names-int", "notes-str", "small-images"])
def test_tampered_cache_entry_is_rebuilt(tmp_path, rows, damage):
    images, labels, usages = rows
    p = write(tmp_path / "fer2013.csv", fer_lines(images, labels, usages))
    load(p, tmp_path)
    (entry,) = cache_files(tmp_path / "cache")
    _tamper(entry, damage)
    with pytest.warns(UserWarning, match="unreadable cache file"):
        d = load(p, tmp_path)
    np.testing.assert_array_equal(d.images, images)
    assert d.class_names == CLASS_NAMES and all(isinstance(n, str) for n in d.notes) and len(d.notes) > 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = load(p, tmp_path)  # the rewritten entry is a clean hit
    np.testing.assert_array_equal(again.images, images)


def test_truncated_cache_entry_closes_its_file(tmp_path, rows):
    images, labels, usages = rows
    p = write(tmp_path / "fer2013.csv", fer_lines(images, labels, usages))
    load(p, tmp_path)
    (entry,) = cache_files(tmp_path / "cache")
    blob = entry.read_bytes()
    entry.write_bytes(blob[: len(blob) // 2])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert C.load_entry(entry, "any key") is None
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]
    assert [w for w in caught if "unreadable cache file" in str(w.message)]
    assert not entry.exists()
