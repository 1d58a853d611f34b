"""Face detectors: every registered one finds a real face; MTCNN's landmarks fall where a face's parts are; the
matching and NMS rules the benchmark and the detector use give their analytic answers."""

from __future__ import annotations

import importlib.util

import cv2
import numpy as np
import pytest
from conftest import REPO
from skimage import data as skdata

from ferlab.recognize.detect import DETECTORS, create_detector
from ferlab.recognize.mtcnn import nms

ASTRO_FACE = (177, 66, 95, 95)  # where the face of skimage's astronaut (a NASA photo, public domain) is: x, y, w, h


def _bench():
    spec = importlib.util.spec_from_file_location("detectors_bench", REPO / "bench" / "detectors.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("name", sorted(n for n in DETECTORS if n != "none"))
def test_every_detector_finds_the_astronaut_and_nothing_in_a_blank_image(name):
    det = create_detector(name, min_face=24)
    bgr = np.ascontiguousarray(skdata.astronaut()[:, :, ::-1])
    image = bgr if getattr(det, "wants_color", False) else cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    boxes = det(image)
    assert boxes.dtype == np.int64 and boxes.shape[1] == 4
    assert _bench().iou(boxes[:1], np.array([ASTRO_FACE]))[0, 0] > 0.5, boxes
    blank = np.full_like(image, 128)
    assert len(det(blank)) == 0


@pytest.mark.parametrize("name", sorted(n for n in DETECTORS if n != "none"))
def test_min_face_counts_pixels_of_the_photo_even_when_it_is_searched_downscaled(name):
    big = cv2.resize(np.ascontiguousarray(skdata.astronaut()[:, :, ::-1]), (1024, 1024))  # the face: ~190 pixels
    bgr = np.full((3000, 4000, 3), 128, np.uint8)  # searched at 1280 x 960: the face is ~61 pixels there
    bgr[1000:2024, 1500:2524] = big
    det = create_detector(name, min_face=150)
    image = bgr if getattr(det, "wants_color", False) else cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    x, y, w, h = ASTRO_FACE
    face = np.array([[1500 + 2 * x, 1000 + 2 * y, 2 * w, 2 * h]])
    assert _bench().iou(det(image)[:1], face)[0, 0] > 0.5


def test_mtcnn_landmarks_sit_on_the_face_in_order():
    det = create_detector("mtcnn")
    bgr = np.ascontiguousarray(skdata.astronaut()[:, :, ::-1])
    boxes, marks, scores = det.detect(bgr)
    (x, y, w, h), (left_eye, right_eye, nose, mouth_l, mouth_r) = boxes[0], marks[0]
    assert scores[0] > 0.9
    assert all(x <= px <= x + w and y <= py <= y + h for px, py in marks[0])
    assert left_eye[0] < nose[0] < right_eye[0] and mouth_l[0] < mouth_r[0]  # left to right as seen
    assert max(left_eye[1], right_eye[1]) < nose[1] < min(mouth_l[1], mouth_r[1])  # eyes, nose, mouth: top down
    # a mirrored photo gives the mirrored box (within 8% of its size: the pyramid's pixel grid is not symmetric)
    flipped, _, _ = det.detect(np.ascontiguousarray(bgr[:, ::-1]))
    fx, fy, fw, fh = flipped[0]
    tol = 0.08 * w
    assert abs((512 - fx - fw) - x) <= tol and abs(fy - y) <= tol and abs(fw - w) <= tol


def test_nms_keeps_the_best_of_overlapping_boxes():
    boxes = np.array([[0, 0, 9, 9], [1, 0, 10, 9], [20, 20, 29, 29], [0, 0, 4, 4]], float)
    scores = np.array([0.9, 0.95, 0.5, 0.8])
    # boxes 0 and 1 overlap by 90/110 (inclusive pixel areas); box 3 lies inside box 0: IoU 25/100, over-min 1
    assert nms(boxes, scores, 0.5).tolist() == [1, 3, 2]
    assert nms(boxes, scores, 0.5, mode="min").tolist() == [1, 2]


def test_benchmark_matching_is_one_to_one():
    bench = _bench()
    truth = np.array([[0, 0, 10, 10], [100, 100, 10, 10]])
    found = np.array([[0, 0, 10, 10], [1, 1, 10, 10], [50, 50, 5, 5]])  # two detections of the first face
    assert bench.iou(found[:1], truth[:1])[0, 0] == 1.0
    assert bench.match(found, truth, 0.5) == 1  # the second detection of the same face is a false positive
    assert bench.match(np.empty((0, 4)), truth, 0.5) == 0


def test_framed_boxes_scale_the_fer2013_framing_to_each_box():
    from ferlab.recognize.detect import framed_boxes

    # a FER2013 face whose detected box is (8, 10, 32, 32): a 64-pixel box is the same face at twice the size
    np.testing.assert_array_equal(framed_boxes(np.array([[100, 200, 64, 64]]), (8, 10, 32, 32)),
                                  [[100 - 16, 200 - 20, 96, 96]])


def test_aligned_crops_undo_a_rotation_scale_and_shift():
    from ferlab.recognize.detect import aligned_crops

    rng = np.random.default_rng(0)
    face = cv2.GaussianBlur(rng.integers(0, 256, (48, 48)).astype(np.uint8), (0, 0), 1.5)  # a smooth 48x48 pattern
    template = np.array([[15.3, 18.1], [32.5, 18.0], [23.7, 28.1], [16.7, 37.3], [30.9, 37.2]])
    m = cv2.getRotationMatrix2D((24, 24), 20, 3.0)  # turn 20 degrees, enlarge 3x ...
    m[:, 2] += (150, 120)  # ... and move it into a larger photo
    photo = cv2.warpAffine(face, m, (400, 360), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REPLICATE)
    marks = cv2.transform(template[None].astype(np.float32), m)[0]  # where the landmarks went
    back = aligned_crops(photo, marks[None], template)[0, 0]
    inner = (slice(6, 42), slice(6, 42))  # away from the replicated border
    assert np.abs(back[inner].astype(int) - face[inner]).mean() < 4


def test_align_needs_a_detector_with_landmarks():
    from ferlab import Recognizer

    with pytest.raises(ValueError, match="align=True needs a detector with landmarks"):
        Recognizer(detector="haar", align=True)


def test_the_default_crop_frames_each_box_the_way_fer2013_frames_it():
    from ferlab import Recognizer
    from ferlab.recognize.detect import crop_faces, fer2013_framing, framed_boxes

    gray = cv2.cvtColor(skdata.astronaut(), cv2.COLOR_RGB2GRAY)
    rec = Recognizer(detector="haar")
    boxes = rec.detector(gray)
    framing = fer2013_framing("haar")
    assert framing is not None and 0 < framing["box"][2] <= 60 and rec.margin is None
    np.testing.assert_array_equal(rec.crops(gray, boxes), crop_faces(gray, framed_boxes(boxes, framing["box"]), 0.0))
    wide = Recognizer(detector="haar", margin=0.1)
    np.testing.assert_array_equal(wide.crops(gray, boxes), crop_faces(gray, boxes, 0.1))
    assert len(fer2013_framing("mtcnn")["landmarks"]) == 5 and fer2013_framing("haar-alt2") is None
    assert Recognizer(detector="haar-alt2").margin == 0.1  # not measured: the fallback margin
