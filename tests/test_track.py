"""Face tracks in videos: stable ids when faces move, cross and leave; timestamps; smoothing; timeline and summary.

The video test pastes two copies of a real face (scikit-image's astronaut, a NASA photo in the public domain) into
moving frames, finds them with the default detector and checks the ids against the known paths.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from ferlab.recognize.track import FaceTracker, iou_matrix

FPS = 10


def test_iou_matrix_analytic():
    a = np.array([[0, 0, 10, 10], [100, 100, 5, 5]])
    b = np.array([[5, 0, 10, 10], [0, 0, 10, 10], [50, 50, 1, 1]])
    want = np.array([[50 / 150, 1.0, 0.0], [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(iou_matrix(a, b), want)


def _consistency(ids: list[int], truth: list[int]) -> float:
    """The share of detections whose id is the one its true identity has most often."""
    main = {k: max(set(i for i, t in zip(ids, truth, strict=True) if t == k),
                   key=[i for i, t in zip(ids, truth, strict=True) if t == k].count) for k in set(truth)}
    return float(np.mean([i == main[t] for i, t in zip(ids, truth, strict=True)]))


def test_two_crossing_faces_keep_their_ids_and_a_newcomer_gets_a_new_one():
    tracker = FaceTracker(iou_threshold=0.3, max_missed=5, smooth_s=0.0)
    ids, truth = [], []
    probs = np.eye(7)[[3, 4]]  # (2, 7): one Happy, one Sad
    for f in range(40):
        a = (10 + 12 * f, 100, 60, 60)  # left to right
        b = (480 - 12 * f, 125, 60, 60)  # right to left, overlapping a as they cross (IoU up to 0.4)
        boxes = [b, a] if f % 2 else [a, b]  # the detector's order changes
        got, _ = tracker.update(np.array(boxes), probs if f % 2 == 0 else probs[::-1], f / FPS)
        ids += got
        truth += [1, 0] if f % 2 else [0, 1]
    assert _consistency(ids, truth) == 1.0 and len(set(ids)) == 2
    for f in range(40, 50):  # both leave; a third face appears far away
        got, _ = tracker.update(np.array([[300, 300, 60, 60]]), probs[:1], f / FPS)
    assert got[0] not in set(ids)


def test_a_frame_without_faces_keeps_the_tracks_for_max_missed_frames():
    tracker = FaceTracker(max_missed=2)
    box, p = np.array([[0, 0, 50, 50]]), np.eye(7)[[1]]
    (first,), _ = tracker.update(box, p, 0.0)
    for t in (0.1, 0.2):
        assert tracker.update(np.empty((0, 4)), np.empty((0, 7)), t) == ([], pytest.approx(np.empty((0, 7))))
    assert tracker.update(box, p, 0.3)[0] == [first]  # back within max_missed frames: the same track
    for t in (0.4, 0.5, 0.6):
        tracker.update(np.empty((0, 4)), np.empty((0, 7)), t)
    assert tracker.update(box, p, 0.7)[0] != [first]  # gone longer: a new track


def test_smoothing_follows_its_time_constant():
    tracker = FaceTracker(smooth_s=0.5)
    box = np.array([[0, 0, 50, 50]])
    tracker.update(box, np.eye(7)[[0]], 0.0)
    _, s = tracker.update(box, np.eye(7)[[3]], 0.5)  # one time constant later: 1 - 1/e of the way
    np.testing.assert_allclose(s[0, [0, 3]], [np.exp(-1), 1 - np.exp(-1)], atol=1e-9)
    _, raw = FaceTracker(smooth_s=0.0).update(box, np.eye(7)[[3]], 0.0)
    assert raw[0, 3] == 1.0


@pytest.fixture(scope="module")
def two_face_video(tmp_path_factory) -> tuple[Path, list[list[tuple[int, int]]]]:
    """A 4 s video (10 frames/s, 640x360) of two copies of a real face crossing; then one leaves. Returns the
    file and, per frame, the true centres of identity 0 and 1 (None once out of view)."""
    import cv2
    from skimage import data as skdata

    face = cv2.cvtColor(np.ascontiguousarray(skdata.astronaut()[10:230, 100:320, ::-1]), cv2.COLOR_BGR2GRAY)
    face = cv2.resize(face, (120, 120), interpolation=cv2.INTER_AREA)
    faces = [face, face[:, ::-1]]
    path = tmp_path_factory.mktemp("video") / "two.avi"
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), FPS, (640, 360))
    centres = []
    for f in range(40):
        frame = np.full((360, 640), 110, np.uint8)
        xs = [20 + 12 * f, 500 - 12 * f if f < 30 else None]  # identity 1 leaves after frame 29
        ys = [60, 170]
        row = []
        for k, (x, y) in enumerate(zip(xs, ys, strict=True)):
            if x is None or x + 120 > 640:
                row.append(None)
                continue
            frame[y : y + 120, x : x + 120] = faces[k]
            row.append((x + 60, y + 60))
        centres.append(row)
        vw.write(cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR))
    vw.release()
    return path, centres


def test_tracks_in_a_video_are_stable_and_timed(two_face_video):
    from ferlab import Recognizer

    path, centres = two_face_video
    ids, truth, n_frames = [], [], 0
    rec = Recognizer(margin=0.1)
    for r in rec.track(path):
        n_frames += 1
        assert r.time == pytest.approx(r.frame / FPS)
        for face in r.faces:
            x, y, w, h = face.box
            d = [np.hypot(x + w / 2 - c[0], y + h / 2 - c[1]) if c else np.inf for c in centres[r.frame]]
            assert min(d) < 30, (r.frame, face.box)  # every detection is one of the two faces
            ids.append(face.track)
            truth.append(int(np.argmin(d)))
            assert face.time == r.time and set(face.smoothed) == set(face.probabilities)
    assert n_frames == 40 and len(ids) >= 60, len(ids)  # most faces found in most frames
    assert _consistency(ids, truth) >= 0.95 and len(set(ids)) <= 3
    again = [f.track for r in rec.track(path) for f in r.faces]  # a second reading starts its own tracks
    assert sorted(set(again)) == sorted(set(ids))


def test_predict_writes_track_columns_summary_and_timeline(two_face_video, tmp_path, capsys):
    from ferlab.cli import main

    path, _ = two_face_video
    out, tracks, timeline = tmp_path / "t.csv", tmp_path / "tracks.json", tmp_path / "timeline.png"
    assert main(["predict", str(path), "--out", str(out), "--tracks", str(tracks), "--timeline", str(timeline),
                 "--no-progress"]) == 0
    rows = list(csv.DictReader(out.open()))
    assert {"track", "time", "s_Happy"} <= set(rows[0]) and all(r["track"] for r in rows)
    assert float(rows[-1]["time"]) == pytest.approx(int(rows[-1]["frame"]) / FPS, abs=1e-3)
    summary = json.loads(tracks.read_text())
    main_tracks = [s for s in summary if s["frames"] >= 10]
    assert len(main_tracks) == 2 and all(abs(sum(s["share"].values()) - 1) < 1e-9 for s in summary)
    assert timeline.stat().st_size > 5000
    err = capsys.readouterr().err
    assert f"timeline of {len(summary)} track(s)" in err and "mostly" in err
    still = tmp_path / "still.png"
    import cv2

    cv2.imwrite(str(still), np.full((64, 64), 100, np.uint8))
    assert main(["predict", str(still), "--timeline", str(timeline)]) == 2
    assert "--timeline draws or sums up the faces of videos, and none is among the inputs" in capsys.readouterr().err


def test_a_video_that_stops_decoding_mid_file_keeps_the_frames_before_it(two_face_video, tmp_path, capsys):
    """A truncated file: every frame before the damage is answered, and the message names where decoding stopped."""
    from ferlab import Recognizer
    from ferlab.cli import main
    from ferlab.images import ImageError

    path, _ = two_face_video
    cut = tmp_path / "cut.avi"
    raw = path.read_bytes()
    cut.write_bytes(raw[: int(len(raw) * 0.6)])
    got = []
    with pytest.raises(ImageError, match=r"decoding stopped at frame (\d+) of the 40"):
        for r in Recognizer(batch_size=128).track(cut):  # one batch: the frames must be answered before the error
            got.append(r)
    assert 10 <= len(got) < 40 and [r.frame for r in got] == list(range(len(got)))
    assert sum(len(r.faces) for r in got) >= len(got)
    with pytest.raises(ImageError, match="decoding stopped") as caught:  # predict() hands over its faces too
        Recognizer(batch_size=128).predict(cut)
    assert [(f.frame, f.box) for f in caught.value.faces] == [(f.frame, f.box) for r in got for f in r.faces]
    out = tmp_path / "cut.csv"
    assert main(["predict", str(cut), str(path), "--out", str(out), "--no-progress"]) == 0  # the batch goes on
    rows = list(csv.DictReader(out.open()))
    frames_cut = {int(r["frame"]) for r in rows if r["file"] == str(cut)}
    assert frames_cut == {r.frame for r in got if r.faces}
    assert {int(r["frame"]) for r in rows if r["file"] == str(path)} >= set(range(30))
    err = capsys.readouterr().err
    assert f"{cut}: decoding stopped at frame {len(got)} of the 40" in err and "are kept" in err


def test_webcam_mode_answers_each_frame_with_tracks_until_max_frames(two_face_video, tmp_path, monkeypatch, capsys):
    """A camera is read with cv2.VideoCapture(index); here index 0 plays the generated video."""
    import cv2

    from ferlab import Recognizer
    from ferlab.cli import main

    path, _ = two_face_video
    real = cv2.VideoCapture
    monkeypatch.setattr(cv2, "VideoCapture", lambda src, *a: real(str(path)) if src == 0 else real(src, *a))
    got = []
    for r in Recognizer().camera(0, max_frames=12):
        got.append(r)
        assert r.faces and all(f.track is not None for f in r.faces)  # answered frame by frame, tracked
    assert [r.frame for r in got] == list(range(12)) and got[0].time == 0.0 and got[-1].time >= got[1].time
    out = tmp_path / "cam.csv"
    assert main(["predict", "--webcam", "--max-frames", "8", "--out", str(out), "--no-progress"]) == 0
    rows = list(csv.DictReader(out.open()))
    assert {r["file"] for r in rows} == {"camera:0"} and {int(r["frame"]) for r in rows} == set(range(8))
    assert all(r["track"] for r in rows)
    assert "camera 0: 8 image(s)/frame(s) read" in capsys.readouterr().err
    assert main(["predict", "--webcam", "3", "--no-progress"]) == 2  # no such camera: a clear error
    assert "camera 3: cannot open it" in capsys.readouterr().err


def test_to_dataframe_has_a_row_per_tracked_face(two_face_video):
    from ferlab import Recognizer, to_dataframe

    path, _ = two_face_video
    results = list(Recognizer().track(path, every=4))
    df = to_dataframe(results)
    assert len(df) == sum(len(r.faces) for r in results) > 0
    assert {"file", "frame", "time", "track", "label", "p_Happy", "s_Happy"} <= set(df.columns)
    assert np.allclose(df["time"], df["frame"] / FPS)  # a constant frame rate: timestamps are frame / rate
    assert len(to_dataframe(results[0].faces)) == len(results[0].faces)


def test_max_frames_caps_each_video_and_a_file_reached_twice_is_read_once(two_face_video, tmp_path, capsys):
    from ferlab import Recognizer
    from ferlab.cli import main

    path, _ = two_face_video
    rec = Recognizer()
    frames = [r.frame for r in rec.track(path, every=3, max_frames=10)]
    assert frames == [0, 3, 6, 9]  # the first 10 frames, every 3rd; stopping early is not damage
    with pytest.raises(ValueError, match="max_frames must be >= 1"):
        next(rec.predict_many([path], max_frames=0))
    out, tracks = tmp_path / "t.csv", tmp_path / "tracks.json"
    assert main(["predict", str(path.parent), str(path), "--max-frames", "5", "--out", str(out), "--tracks",
                 str(tracks), "--no-progress"]) == 0
    rows = list(csv.DictReader(out.open()))
    assert sorted({int(r["frame"]) for r in rows}) == [0, 1, 2, 3, 4]
    assert len(rows) == len({(r["frame"], r["face"]) for r in rows})  # the folder and the file: read once
    assert all(s["frames"] <= 5 for s in json.loads(tracks.read_text()))
    assert main(["predict", str(path), "--max-frames", "0"]) == 2
    assert "--max-frames must be >= 1, got 0" in capsys.readouterr().err


def test_annotated_images_of_inputs_that_would_share_a_name_are_all_kept(two_face_video, tmp_path):
    """a.jpg and a.JPG, or a photo named like a video frame's drawing: none overwrites another."""
    import shutil

    import cv2
    from skimage import data as skdata

    from ferlab.cli import main

    folder = tmp_path / "in"
    folder.mkdir()
    astro = np.ascontiguousarray(skdata.astronaut()[:, :, ::-1])
    cv2.imwrite(str(folder / "a.jpg"), astro)
    cv2.imwrite(str(folder / "a.JPG"), astro[:, ::-1])
    shutil.copy(two_face_video[0], folder / "two.avi")
    cv2.imwrite(str(folder / "two_avi_f000000.jpg"), astro)
    ann = tmp_path / "ann"
    assert main(["predict", str(folder), "--max-frames", "1", "--annotate", str(ann), "--out",
                 str(tmp_path / "f.csv"), "--no-progress"]) == 0
    written = sorted(p.name for p in ann.iterdir())
    assert len(written) == 4, written  # two photos, a photo named like the frame, and the video's frame 0
    assert {"a.jpg", "two_avi_f000000.jpg"} <= set(written)


def test_a_timeline_of_more_tracks_than_it_draws_says_so(two_face_video, tmp_path, capsys, monkeypatch):
    from ferlab.cli import main
    from ferlab.recognize.track import TrackLog

    plot = TrackLog.plot
    monkeypatch.setattr(TrackLog, "plot", lambda self, path: plot(self, path, max_tracks=1))
    timeline = tmp_path / "timeline.png"
    assert main(["predict", str(two_face_video[0]), "--timeline", str(timeline), "--out", str(tmp_path / "f.csv"),
                 "--no-progress"]) == 0
    assert "timeline of the 1 longest of" in capsys.readouterr().err and timeline.is_file()
