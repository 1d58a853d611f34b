"""Real photos: safe image reading, face detection, cropping, the Recognizer API and `ferlab predict`."""

from __future__ import annotations

import csv
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data as skdata  # a test dependency: its sample photos
import torch

from ferlab.cli import main
from ferlab.images import ImageError, probe, read_image, read_video, to_bgr8
from ferlab.recognize.detect import crop_faces, expand_box

ASTRO_FACE = (177, 66, 95, 95)  # where the face of skimage's astronaut is (x, y, w, h), checked by eye


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def bomb_png(w: int = 100_000, h: int = 100_000) -> bytes:
    """A valid PNG header claiming w x h pixels, with a tiny body: a decompression bomb's calling card."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 4096))
            + _png_chunk(b"IEND", b""))


def iou(a, b) -> float:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    iw = max(0, min(ax + aw, bx + bw) - max(ax, bx))
    ih = max(0, min(ay + ah, by + bh) - max(ay, by))
    return iw * ih / (aw * ah + bw * bh - iw * ih)


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    """Photos in every accepted form, broken files, a faceless image and a short video, in one folder tree."""
    d = tmp_path_factory.mktemp("media")
    (d / "sub").mkdir()
    rgb = skdata.astronaut()  # (512, 512, 3) RGB
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    gray = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    files = {
        "jpg": d / "astro.jpg", "png": d / "sub" / "astro.png", "webp": d / "sub" / "astro.webp",
        "bmp": d / "sub" / "astro.bmp", "gray": d / "sub" / "astro_gray.png", "png16": d / "sub" / "astro16.png",
        "alpha": d / "sub" / "astro_alpha.png", "noface": d / "uniform.png", "corrupt": d / "corrupt.jpg",
        "text": d / "notes.png", "bomb": d / "bomb.png", "video": d / "clip.avi",
    }
    cv2.imwrite(str(files["jpg"]), bgr)
    cv2.imwrite(str(files["png"]), bgr)
    cv2.imwrite(str(files["webp"]), bgr, [cv2.IMWRITE_WEBP_QUALITY, 101])  # > 100: lossless
    cv2.imwrite(str(files["bmp"]), bgr)
    cv2.imwrite(str(files["gray"]), gray)
    cv2.imwrite(str(files["png16"]), gray.astype(np.uint16) * 257)
    cv2.imwrite(str(files["alpha"]), np.dstack([bgr, np.full(gray.shape, 255, np.uint8)]))
    cv2.imwrite(str(files["noface"]), np.full((240, 320), 128, np.uint8))
    files["corrupt"].write_bytes(cv2.imencode(".jpg", bgr)[1].tobytes()[:400])  # truncated JPEG
    files["text"].write_text("a text file with an image's name\n")
    files["bomb"].write_bytes(bomb_png())
    vw = cv2.VideoWriter(str(files["video"]), cv2.VideoWriter_fourcc(*"MJPG"), 10, (256, 256))
    small = cv2.resize(bgr, (256, 256), interpolation=cv2.INTER_AREA)
    for i in range(6):  # frames 0 and 3 are blank, the others show the astronaut
        vw.write(np.full_like(small, 90) if i % 3 == 0 else small)
    vw.release()
    return {"dir": d, **files}


@pytest.fixture(scope="module")
def rec(trained_tiny_run):
    from ferlab import Recognizer

    return Recognizer(trained_tiny_run)


# --------------------------------------------------------------------------- reading
@pytest.mark.parametrize("ext,fmt", [(".jpg", "jpeg"), (".png", "png"), (".webp", "webp"), (".bmp", "bmp")])
def test_probe_reads_the_size_from_the_header(ext, fmt):
    img = np.random.default_rng(0).integers(0, 256, (23, 37, 3), dtype=np.uint8)
    data = cv2.imencode(ext, img)[1].tobytes()
    assert probe(data) == (fmt, 37, 23)
    assert probe(data[:200] if fmt != "bmp" else data[:30]) == (fmt, 37, 23)  # the header alone is enough


def test_decompression_bomb_is_refused_before_decoding(media):
    assert media["bomb"].stat().st_size < 200
    with pytest.raises(ImageError, match=r"bomb\.png: image of 100000x100000 .* decompression bomb"):
        read_image(media["bomb"])
    with pytest.raises(ImageError, match="over the limit of 0.1 M pixels"):
        read_image(media["png"], max_pixels=100_000)  # 512 x 512 = 262144 pixels
    assert read_image(media["png"], max_pixels=512 * 512).shape == (512, 512, 3)


@pytest.mark.parametrize("key,message", [("corrupt", "corrupt or truncated"), ("text", "not a supported image")])
def test_broken_files_name_the_file(media, key, message):
    with pytest.raises(ImageError, match=message) as e:
        read_image(media[key])
    assert str(media[key]) in str(e.value)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.jpg"):
        read_image(tmp_path / "nothing.jpg")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageError, match="empty.png: empty file"):
        read_image(tmp_path / "empty.png")


def test_every_accepted_form_decodes_to_the_same_pixels(media):
    ref = read_image(media["png"])  # lossless reference
    assert ref.dtype == np.uint8 and ref.shape == (512, 512, 3)
    for key in ("webp", "bmp", "alpha"):
        assert np.array_equal(read_image(media[key]), ref), key
    ref_gray = cv2.cvtColor(ref, cv2.COLOR_BGR2GRAY)
    for key in ("gray", "png16"):  # gray and 16-bit gray come back as 8-bit BGR with equal channels
        img = read_image(media[key])
        assert np.array_equal(img[:, :, 0], ref_gray) and np.array_equal(img[:, :, 2], ref_gray), key
    assert np.abs(read_image(media["jpg"]).astype(int) - ref).mean() < 3  # JPEG is lossy, but close


def test_to_bgr8_channel_order_alpha_and_depth():
    rgb = np.array([[[255, 0, 0]]], np.uint8)  # one red pixel
    assert to_bgr8(rgb, "rgb").tolist() == [[[0, 0, 255]]]
    assert to_bgr8(rgb, "bgr").tolist() == [[[255, 0, 0]]]
    bgra = np.array([[[10, 20, 30, 0], [10, 20, 30, 255], [0, 0, 0, 51]]], np.uint8)
    assert to_bgr8(bgra, "bgr").tolist() == [[[255, 255, 255], [10, 20, 30], [204, 204, 204]]]  # over white
    assert to_bgr8(np.array([[65535, 257]], np.uint16)).tolist() == [[[255] * 3, [1] * 3]]
    assert to_bgr8(np.array([[1.0, 0.5]], np.float32)).tolist() == [[[255] * 3, [128] * 3]]
    with pytest.raises(ImageError, match="shape"):
        to_bgr8(np.zeros((4, 4, 2), np.uint8))


def test_to_bgr8_of_a_large_16_bit_rgba_image_matches_the_exact_formula_band_by_band():
    # taller than one compositing band (2^20 pixels / 700 columns = 1,497 rows): bands must join seamlessly
    g = np.random.default_rng(0)
    img = g.integers(0, 65536, size=(1600, 700, 4), dtype=np.uint16)
    exact = img[:, :, :3] / 257.0 * (img[:, :, 3:4] / 65535.0) + 255.0 * (1 - img[:, :, 3:4] / 65535.0)
    got = to_bgr8(img, "rgb")
    assert got.dtype == np.uint8 and got.shape == (1600, 700, 3)
    assert np.abs(got.astype(float) - exact[:, :, ::-1]).max() <= 1.5  # 8-bit alpha: within a level or so


def _with_exif(encoded: bytes, fmt: str, orientation: int) -> bytes:
    """``encoded`` (a PNG or a simple WEBP from cv2.imencode) carrying an EXIF block with ``orientation``."""
    tiff = b"MM\0*" + struct.pack(">IH", 8, 1) + struct.pack(">HHIHH", 0x112, 3, 1, orientation, 0) + b"\0" * 4
    if fmt == "png":  # an eXIf chunk after IHDR
        return encoded[:33] + struct.pack(">I", len(tiff)) + b"eXIf" + tiff + struct.pack(
            ">I", zlib.crc32(b"eXIf" + tiff)) + encoded[33:]
    from ferlab.images import probe

    _, w, h = probe(encoded)
    vp8x = b"VP8X" + struct.pack("<I", 10) + bytes([0x08, 0, 0, 0]) + (w - 1).to_bytes(3, "little") + (
        h - 1).to_bytes(3, "little")
    exif = b"EXIF" + struct.pack("<I", len(tiff)) + tiff + b"\0" * (len(tiff) & 1)
    body = b"WEBP" + vp8x + encoded[12:] + exif
    return b"RIFF" + struct.pack("<I", len(body)) + body


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize(("fmt", "channels"), [("png", 3), ("png", 4), ("webp", 3)])
def test_png_and_webp_photos_are_turned_upright_by_their_exif_orientation(fmt, channels, orientation):
    """As JPEG always was: a phone's portrait photo saved as PNG or WEBP is analysed upright, not sideways."""
    from ferlab.images import decode_image

    g = np.random.default_rng(orientation)
    img = g.integers(0, 256, (24, 40, channels), dtype=np.uint8)
    if channels == 4:
        img[:, :, 3] = 255  # opaque: the same pixels as without alpha
    params = [cv2.IMWRITE_WEBP_QUALITY, 101] if fmt == "webp" else []  # lossless
    data = _with_exif(cv2.imencode(f".{fmt}", img, params)[1].tobytes(), fmt, orientation)
    upright = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)  # OpenCV applies the orientation
    assert (upright.shape[:2] == (40, 24)) == (orientation >= 5)
    np.testing.assert_array_equal(decode_image(data), upright)


def test_a_bmp_whose_alpha_is_all_zero_is_opaque_and_stray_jpeg_bytes_are_skipped():
    from ferlab.images import decode_image

    img = np.random.default_rng(0).integers(0, 256, (16, 16, 4), dtype=np.uint8)
    img[:, :, 3] = 0
    np.testing.assert_array_equal(decode_image(cv2.imencode(".bmp", img)[1].tobytes()), img[:, :, :3])
    jpg = cv2.imencode(".jpg", img[:, :, :3])[1].tobytes()
    app0_end = 4 + struct.unpack(">H", jpg[4:6])[0]
    padded = jpg[:app0_end] + b"\0\0" + jpg[app0_end:]  # two stray bytes the decoder skips with a warning
    np.testing.assert_array_equal(decode_image(padded), decode_image(jpg))


def test_video_gives_every_nth_frame(media):
    frames = list(read_video(media["video"], every=2))
    assert [i for i, _ in frames] == [0, 2, 4]
    assert all(f.shape == (256, 256, 3) and f.dtype == np.uint8 for _, f in frames)
    with pytest.raises(ImageError, match="notes.png: (cannot open as a video|no decodable video frames)"):
        list(read_video(media["text"]))


class FakeCapture:
    """A cv2.VideoCapture over given frame timestamps (ms) that states ``stated`` frames at ``fps``."""

    def __init__(self, times_ms: list[float], stated: int, fps: float) -> None:
        self.times, self.stated, self.fps, self.i = times_ms, stated, fps, -1

    def isOpened(self) -> bool:  # noqa: N802 (cv2's names)
        return True

    def get(self, prop: int) -> float:
        return {cv2.CAP_PROP_FRAME_WIDTH: 8, cv2.CAP_PROP_FRAME_HEIGHT: 8, cv2.CAP_PROP_FRAME_COUNT: self.stated,
                cv2.CAP_PROP_FPS: self.fps, cv2.CAP_PROP_POS_MSEC: self.times[self.i] if self.i >= 0 else 0.0}[prop]

    def grab(self) -> bool:
        self.i += 1
        return self.i < len(self.times)

    def retrieve(self) -> tuple[bool, np.ndarray]:
        return True, np.full((8, 8, 3), self.i, np.uint8)

    def release(self) -> None:
        pass


@pytest.mark.parametrize(
    ("times_ms", "stated", "fps", "expected", "damaged"),
    [
        # variable frame rate (phone videos): each frame's own timestamp, not index / stated rate
        ([0, 50, 100, 250, 400, 550], 6, 10.0, [0, 0.05, 0.1, 0.25, 0.4, 0.55], False),
        # a container that skips 10 dropped frames: the times jump, and the file is complete, not damaged
        ([0, 100, 200, 1300, 1400, 1500, 1600, 1700, 1800, 1900], 20, 10.0,
         [0, 0.1, 0.2, 1.3, 1.4, 1.5, 1.6, 1.7, 1.8, 1.9], False),
        # truncated after 4 of 20 frames: damaged, its frames kept
        ([0, 100, 200, 300], 20, 10.0, [0, 0.1, 0.2, 0.3], True),
        # a decoder that gives no timestamps: index / frame rate
        ([0, 0, 0, 0], 4, 25.0, [0, 0.04, 0.08, 0.12], False),
        # neither timestamps nor a frame rate: none after the first frame (callers count frames)
        ([0, 0, 0], 3, 0.0, [0, None, None], False),
    ],
)
def test_video_frame_times_are_the_frames_own(monkeypatch, tmp_path, times_ms, stated, fps, expected, damaged):
    from ferlab.images import read_video_frames

    path = tmp_path / "clip.mp4"
    path.write_bytes(b"video")
    monkeypatch.setattr(cv2, "VideoCapture", lambda _: FakeCapture(times_ms, stated, fps))
    frames = []
    try:
        for f in read_video_frames(path):
            frames.append(f)
    except ImageError as e:
        assert damaged and "decoding stopped at frame 4 of the 20" in str(e)
    else:
        assert not damaged
    assert [f.index for f in frames] == list(range(len(times_ms)))
    assert [f.time is None for f in frames] == [t is None for t in expected]
    assert [f.time for f in frames if f.time is not None] == pytest.approx([t for t in expected if t is not None])


# --------------------------------------------------------------------------- cropping
def test_crop_is_exact_inside_and_replicates_edges_outside():
    gray = np.arange(100 * 120, dtype=np.int64).reshape(100, 120).astype(np.uint8)
    assert expand_box((10, 20, 30, 40), 0.1) == (7, 16, 36, 48)
    inside = crop_faces(gray, np.array([[30, 20, 48, 48]]), margin=0.0)  # (1, 1, 48, 48): no resize needed
    assert inside.shape == (1, 1, 48, 48) and np.array_equal(inside[0, 0], gray[20:68, 30:78])
    corner = crop_faces(gray, np.array([[-10, -10, 48, 48]]), margin=0.0)[0, 0]
    assert np.array_equal(corner[10:, 10:], gray[:38, :38])  # the image part is where it belongs
    assert np.array_equal(corner[:10, 10:], np.broadcast_to(gray[0, :38], (10, 38)))  # rows above: first row
    with pytest.raises(ValueError, match="outside"):
        crop_faces(gray, np.array([[200, 200, 10, 10]]))


# --------------------------------------------------------------------------- Recognizer
def test_the_default_detector_finds_the_astronaut_and_probabilities_are_consistent(rec):
    faces = rec.predict(skdata.astronaut())
    assert len(faces) >= 1
    f = faces[0]
    assert iou(f.box, ASTRO_FACE) > 0.6, f.box
    assert list(f.probabilities) == rec.class_names
    assert sum(f.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    assert f.label == max(f.probabilities, key=f.probabilities.get) and f.score == f.probabilities[f.label]


def test_path_bytes_and_array_inputs_agree(rec, media):
    from_path = rec.predict(media["png"])
    from_bytes = rec.predict(media["png"].read_bytes())
    from_rgb = rec.predict(skdata.astronaut())
    from_bgr = rec.predict(skdata.astronaut()[:, :, ::-1], color="bgr")
    assert from_path[0].file == str(media["png"])
    for other in (from_bytes, from_rgb, from_bgr):
        assert [f.box for f in other] == [f.box for f in from_path]
        assert np.allclose(list(other[0].probabilities.values()), list(from_path[0].probabilities.values()),
                           atol=1e-6)


def test_crops_mode_equals_the_training_pipeline(rec, trained_tiny_run, tmp_path):
    from ferlab.checkpoint import load_checkpoint, normalizer_from_meta
    from ferlab.data.source import open_data
    from ferlab.inference.predict import predict_logits

    data = open_data(None, synthetic={"n_train": 16, "n_val": 8, "n_test": 8, "seed": 5})
    faces = data.images[:6]  # (6, 48, 48) uint8
    paths = []
    for i, img in enumerate(faces):
        cv2.imwrite(str(tmp_path / f"face{i}.png"), img)
        paths.append(tmp_path / f"face{i}.png")
    got = rec.predict_batch(paths, crops=True)
    assert [len(fs) for fs in got] == [1] * 6 and all(fs[0].box == (0, 0, 48, 48) for fs in got)
    model, meta = load_checkpoint(trained_tiny_run)
    want = predict_logits(model, torch.from_numpy(faces).unsqueeze(1), normalizer_from_meta(meta),
                          precision="fp32", channels_last=False).softmax(1).numpy()
    probs = np.array([list(fs[0].probabilities.values()) for fs in got])
    assert np.abs(probs - want).max() < 1e-5


def test_tta_is_invariant_to_mirroring(rec):
    x = np.random.default_rng(1).integers(0, 256, (5, 1, 48, 48), dtype=np.uint8)
    from ferlab import Recognizer

    tta = Recognizer(backend=rec.backend, tta=True)  # the same loaded model
    assert np.allclose(tta.classify(x), tta.classify(x[..., ::-1]), atol=1e-6)
    sym = np.concatenate([x[..., :24], x[..., :24][..., ::-1]], axis=-1)  # mirror-symmetric faces
    assert np.allclose(tta.classify(sym), rec.classify(sym), atol=1e-6)
    # ...while the model itself is not mirror-invariant (compared on logits: these noise inputs saturate softmax)
    assert np.abs(rec.backend.logits(x) - rec.backend.logits(np.ascontiguousarray(x[..., ::-1]))).max() > 1e-2


def test_no_face_and_bad_inputs(rec, media):
    assert rec.predict(media["noface"]) == []
    with pytest.raises(ImageError, match="bomb"):
        rec.predict(media["bomb"])
    with pytest.raises(ValueError, match="shape"):
        rec.classify(np.zeros((2, 1, 32, 32), np.uint8))


def test_predict_many_goes_on_past_bad_files_and_batches_do_not_change_results(rec, media):
    results = list(rec.predict_many([media["dir"]], every=1))
    by_file = {}
    for r in results:
        by_file.setdefault(Path(r.file).name, []).append(r)
    assert {k for k, v in by_file.items() if v[0].status == "error"} == {"corrupt.jpg", "notes.png", "bomb.png"}
    assert by_file["uniform.png"][0].status == "no_face"
    for name in ("astro.jpg", "astro.png", "astro.webp", "astro.bmp", "astro_gray.png", "astro16.png",
                 "astro_alpha.png"):
        assert by_file[name][0].status == "ok" and iou(by_file[name][0].faces[0].box, ASTRO_FACE) > 0.6, name
    video = by_file["clip.avi"]
    assert [r.frame for r in video] == [0, 1, 2, 3, 4, 5]
    assert [r.status for r in video] == ["no_face", "ok", "ok", "no_face", "ok", "ok"]
    # batches of 2 faces: many flushes, same answers in the same order
    rec2 = type(rec)(backend=rec.backend, batch_size=2)
    again = list(rec2.predict_many([media["dir"]]))
    assert [(r.file, r.frame, r.status) for r in again] == [(r.file, r.frame, r.status) for r in results]
    a = np.array([list(f.probabilities.values()) for r in results for f in r.faces])
    b = np.array([list(f.probabilities.values()) for r in again for f in r.faces])
    assert a.shape == b.shape and np.abs(a - b).max() < 1e-5


@pytest.mark.parametrize("cut", ["left", "top"])
def test_a_face_the_edge_cuts_is_boxed_by_its_visible_part(rec, cut):
    from skimage import data as skdata

    rgb = skdata.astronaut()
    rgb = np.ascontiguousarray(rgb[:, 200:] if cut == "left" else rgb[90:])  # the face cut by the edge
    mtcnn = type(rec)(backend=rec.backend, detector="mtcnn")
    raw = mtcnn.detector.detect(np.ascontiguousarray(rgb[..., ::-1]))[0][0]  # (4,) as the detector gives it
    assert min(raw[0], raw[1]) < 0  # past the edge
    (face,) = mtcnn.predict(rgb)[:1]
    x, y, w, h = face.box
    assert x >= 0 and y >= 0 and x + w <= rgb.shape[1] and y + h <= rgb.shape[0]
    assert (x + w, y + h) == (raw[0] + raw[2], raw[1] + raw[3])  # the far edges as detected


def test_one_path_is_one_input_not_its_characters(rec, media, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a folder with other images: walking "." or "/" would find them
    cv2.imwrite("other.png", np.full((60, 60), 128, np.uint8))
    for one in (str(media["png"]), media["png"]):
        (r,) = list(rec.predict_many(one))
        assert (r.file, r.status) == (str(media["png"]), "ok")
    with pytest.raises(TypeError, match="predict_batch takes a list of images, got one str"):
        rec.predict_batch(str(media["png"]))


def test_a_thin_image_is_faceless_and_a_failing_image_does_not_take_the_batch_with_it(rec, media, tmp_path):
    thin = tmp_path / "thin.png"
    cv2.imwrite(str(thin), np.full((1, 3000), 128, np.uint8))  # downscaled to 1280 wide: 0.43 rows before the fix
    assert rec.predict(thin) == []
    rec2 = type(rec)(backend=rec.backend)
    real = rec2.detector

    def detector(gray):  # fails on the thin image only, the way an OpenCV call can fail on an odd image
        if gray.shape[0] == 1:
            raise cv2.error("OpenCV(4.x) resize.cpp:1: error: (-215:Assertion failed) ...\n")
        return real(gray)

    rec2.detector = detector
    results = list(rec2.predict_many([media["jpg"], thin, media["png"]]))
    assert [r.status for r in results] == ["ok", "error", "ok"]
    assert "face detection failed on this 3000x1 image" in results[1].error and "\n" not in results[1].error


def test_onnx_backend_gives_the_trained_models_answers(rec, trained_tiny_run, media):
    from ferlab import Recognizer
    from ferlab.data.source import open_data

    onnx_rec = Recognizer(trained_tiny_run, backend="onnx", threads=1)  # exported in memory
    a, b = rec.predict(media["png"]), onnx_rec.predict(media["png"])
    assert [f.box for f in a] == [f.box for f in b] and [f.label for f in a] == [f.label for f in b]
    assert np.abs(np.array(list(a[0].probabilities.values())) - list(b[0].probabilities.values())).max() < 1e-4
    faces = open_data(None, synthetic={"n_train": 40, "n_val": 8, "n_test": 8, "seed": 9}).images[:32, None]
    want = rec.backend.logits(faces)  # (32, 7): a trained model's logits
    assert want.std() > 1
    assert np.abs(onnx_rec.backend.logits(faces) - want).max() < 1e-4
    assert np.abs(onnx_rec.classify(faces) - rec.classify(faces)).max() < 1e-4


def test_default_model_without_shipped_models_is_a_clear_error(monkeypatch):
    from ferlab import Recognizer, pretrained

    monkeypatch.setattr(pretrained, "_manifest", lambda: {})
    with pytest.raises(ValueError, match="no pretrained model is shipped.*run directory"):
        Recognizer()


def test_import_ferlab_stays_light():
    code = ("import sys, ferlab; heavy = [m for m in ('torch', 'cv2', 'onnxruntime') if m in sys.modules]; "
            "from ferlab import Recognizer, Face; print(heavy, Recognizer.__name__, Face.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[] Recognizer Face"


# --------------------------------------------------------------------------- CLI
def test_cli_csv_with_annotations(trained_tiny_run, media, tmp_path, capsys):
    out, ann = tmp_path / "faces.csv", tmp_path / "annotated"
    assert main(["predict", str(media["dir"]), "--model", str(trained_tiny_run), "--out", str(out),
                 "--annotate", str(ann), "--batch-size", "4", "--no-progress"]) == 0
    err = capsys.readouterr().err
    for name in ("corrupt.jpg", "notes.png", "bomb.png"):
        assert f"{name}: " in err
    assert "uniform.png: no face found" in err and "clip.avi: no face in 2 of 6 frames" in err
    rows = list(csv.DictReader(out.open()))
    header = list(rows[0])
    assert header[:9] == ["file", "frame", "face", "x", "y", "w", "h", "label", "score"]
    assert header[9:16] == ["p_Angry", "p_Disgust", "p_Fear", "p_Happy", "p_Sad", "p_Surprise", "p_Neutral"]
    assert header[16:19] == ["track", "time", "s_Angry"] and len(header) == 25  # a video is among the inputs
    assert len(rows) == 7 + 4  # seven photos and four video frames with the astronaut, one face each
    for row in rows:
        probs = [float(row[c]) for c in header[9:16]]
        assert sum(probs) == pytest.approx(1.0, abs=1e-4)
        assert row["label"] == header[9 + int(np.argmax(probs))][2:]
    assert sorted(r["frame"] for r in rows if r["file"].endswith("clip.avi")) == ["1", "2", "4", "5"]
    drawn = cv2.imread(str(ann / "astro.jpg"))
    assert drawn is not None and np.abs(drawn.astype(int) - read_image(media["jpg"])).max() > 100  # boxes drawn
    assert (ann / "sub" / "astro16.png").is_file() and (ann / "clip_avi_f000001.jpg").is_file()


def test_annotations_of_inputs_that_share_a_stem_do_not_collide(tmp_path):
    from ferlab.recognize.cli import Annotator

    files = [tmp_path / "clip.mp4", tmp_path / "clip.avi", tmp_path / "sub" / "clip.mp4", tmp_path / "clip.jpg",
             tmp_path / "clip.png"]
    ann = Annotator(tmp_path / "out", files)
    targets = [ann.target(str(f), 0 if f.suffix in (".mp4", ".avi") else None) for f in files]
    assert len(set(targets)) == len(files)  # every input, every frame: its own file
    assert targets[0].name == "clip_mp4_f000000.jpg" and targets[1].name == "clip_avi_f000000.jpg"


def test_cli_json_flag_and_the_weights_named_everywhere(trained_tiny_run, media, capsys):
    from ferlab import Recognizer

    assert f"weights={str(trained_tiny_run)!r}" in repr(Recognizer(trained_tiny_run))
    assert main(["predict", str(media["jpg"]), "--model", str(trained_tiny_run), "--json", "--no-progress"]) == 0
    out, err = capsys.readouterr()
    (entry,) = json.loads(out)  # --json is --format json
    assert entry["status"] == "ok" and entry["weights"] == str(trained_tiny_run)
    assert f"weights {trained_tiny_run}" in err
    assert main(["predict", str(media["jpg"]), "--model", str(trained_tiny_run), "--json", "--format", "csv"]) == 2
    assert "contradict" in capsys.readouterr().err


def test_cli_json_has_an_entry_per_face_and_per_problem(trained_tiny_run, media, tmp_path, capsys):
    out = tmp_path / "faces.json"
    assert main(["predict", str(media["jpg"]), str(media["noface"]), str(media["bomb"]), str(media["video"]),
                 "--every", "3", "--model", str(trained_tiny_run), "--out", str(out), "--no-progress"]) == 0
    entries = json.loads(out.read_text())
    status = [(Path(e["file"]).name, e["frame"], e["status"]) for e in entries]
    assert status == [("astro.jpg", None, "ok"), ("uniform.png", None, "no_face"), ("bomb.png", None, "error"),
                      ("clip.avi", 0, "no_face"), ("clip.avi", 3, "no_face")]
    assert "decompression bomb" in entries[2]["error"]
    face = entries[0]
    assert set(face["probabilities"]) == {"Angry", "Disgust", "Fear", "Happy", "Sad", "Surprise", "Neutral"}
    assert iou((face["x"], face["y"], face["w"], face["h"]), ASTRO_FACE) > 0.6


def test_cli_fails_when_nothing_can_be_read(trained_tiny_run, media, tmp_path, capsys):
    assert main(["predict", str(media["text"]), str(media["corrupt"]), "--model", str(trained_tiny_run),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "none of the 2 input file(s) could be read" in err and "notes.png: not a supported image" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["predict", str(empty), "--model", str(trained_tiny_run)]) == 2
    assert "no images or videos found" in capsys.readouterr().err


def test_cli_refuses_a_folder_as_out_before_predicting(trained_tiny_run, media, tmp_path, capsys):
    assert main(["predict", str(media["jpg"]), "--model", str(trained_tiny_run), "--out", str(tmp_path),
                 "--no-progress"]) == 2
    assert f"--out {tmp_path} is a directory" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--out", "--tracks", "--timeline"])
def test_cli_refuses_to_write_over_an_input(trained_tiny_run, media, tmp_path, capsys, flag):
    photo = tmp_path / "victim.jpg"
    photo.write_bytes(media["jpg"].read_bytes())
    before = photo.read_bytes()
    assert main(["predict", str(media["video"]), str(tmp_path), "--model", str(trained_tiny_run), flag, str(photo),
                 "--no-progress"]) == 2
    assert f"{flag} {photo} is one of the inputs" in capsys.readouterr().err
    assert photo.read_bytes() == before


def test_cli_an_image_that_cannot_be_annotated_loses_only_its_drawing(trained_tiny_run, media, tmp_path, capsys):
    out, ann = tmp_path / "faces.json", tmp_path / "annotated"
    (ann / "astro.jpg").mkdir(parents=True)  # where astro.jpg's drawing would go: cv2.imwrite fails there
    assert main(["predict", str(media["jpg"]), str(media["png"]), "--model", str(trained_tiny_run), "--out",
                 str(out), "--annotate", str(ann), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "astro.jpg: not annotated: cannot write" in err and "(1 could not be written)" in err
    entries = json.loads(out.read_text())  # still a complete JSON list, with both images' faces
    assert [(Path(e["file"]).name, e["status"]) for e in entries] == [("astro.jpg", "ok"), ("astro.png", "ok")]
    assert (ann / "sub" / "astro.png").is_file()


def test_cli_crops_format_margin_min_face_and_detector(trained_tiny_run, media, capsys):
    from ferlab import Recognizer

    def predict_json(*flags: str) -> list[dict]:
        capsys.readouterr()
        assert main(["predict", str(media["png"]), "--model", str(trained_tiny_run), "--format", "json",
                     "--no-progress", *flags]) == 0
        return json.loads(capsys.readouterr().out)  # no --out: standard output

    def probs(entry: dict) -> list[float]:
        return [entry["probabilities"][c] for c in ("Angry", "Disgust", "Fear", "Happy", "Sad", "Surprise", "Neutral")]

    (whole,) = predict_json("--crops")  # the whole image is the face
    assert (whole["x"], whole["y"], whole["w"], whole["h"]) == (0, 0, 512, 512)
    want = Recognizer(trained_tiny_run).predict(media["png"], crops=True)[0].probabilities
    assert probs(whole) == pytest.approx(list(want.values()), abs=1e-6)

    (near,) = predict_json()
    (wide,) = predict_json("--margin", "0.4")
    assert [near[k] for k in "xywh"] == [wide[k] for k in "xywh"]  # the box is the detection's, before the margin
    assert probs(wide) != pytest.approx(probs(near), abs=1e-4)  # ... but the crop the model sees is wider
    want = Recognizer(trained_tiny_run, margin=0.4).predict(media["png"])[0].probabilities
    assert probs(wide) == pytest.approx(list(want.values()), abs=1e-6)

    (none,) = predict_json("--min-face", "600")  # larger than the image: nothing to find
    assert none["status"] == "no_face"
    assert main(["predict", str(media["png"]), "--model", str(trained_tiny_run), "--detector", "yolo"]) == 2
    assert "unknown detector 'yolo'; choose one of haar" in capsys.readouterr().err


def test_recognizer_follows_the_free_cores_unless_given_a_thread_count(trained_tiny_run, media):
    from ferlab import Recognizer

    rec = Recognizer(trained_tiny_run)
    steps = []
    rec._governor.step = lambda: steps.append(1)  # checked once per image or frame
    list(rec.predict_many([media["jpg"], media["png"]]))
    assert len(steps) == 2
    assert Recognizer(trained_tiny_run, backend="onnx", threads=1)._governor is None
