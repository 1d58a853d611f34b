"""The speed benches run end to end at tiny sizes, and every derived figure they print follows from their measurements.

Timings are never asserted (they depend on the machine); what is checked is that the ratios, GFLOP/s and
weight sources the benches print are computed from what they measured, not typed in.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ferlab.models import create_model
from ferlab.models.summary import flops_per_image

REPO = Path(__file__).resolve().parents[1]


def run_bench(script: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "bench" / script), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


@pytest.mark.slow
def test_train_speed_ratio_and_gflops_follow_from_the_measured_images_per_second():
    res = run_bench("train_speed.py", "--models", "r000-cnn1", "--quick", "--no-threads", "--json")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    results = json.loads(out[out.index("\n{") + 1:])
    (row,) = results["models"]
    default = results["default_mode"]  # what `ferlab train` runs on this CPU: bf16 only where it is native
    bf16 = results["default_precision"] == "bf16"
    if results["jemalloc"]:
        assert default == ("fast+jemalloc" if bf16 else "fp32-cl+jemalloc")
        modes = ("fp32", "fast", "fast+jemalloc-defaults", "fast+jemalloc") + (() if bf16 else (default,))
    else:  # not installed: the glibc modes only, and `ferlab train` runs without it
        assert default == ("fast" if bf16 else "fp32-cl")
        modes = ("fp32", "fast") + (() if bf16 else (default,))
    assert set(row) == {"model", "ratio", *modes}
    mflops = flops_per_image(create_model("r000-cnn1")) / 1e6
    for mode in modes:
        m = row[mode]
        assert m["images_per_s"] > 0 and m["threads"] == (os.cpu_count() or 1)
        assert m["mflops_per_image"] == pytest.approx(mflops)
        assert m["gflops_per_s"] == pytest.approx(m["images_per_s"] * 3 * mflops / 1e3)  # forward + backward
    assert row["ratio"] == pytest.approx(row[default]["images_per_s"] / row["fp32"]["images_per_s"])
    line = next(s for s in out.splitlines() if s.startswith("r000-cnn1"))
    assert line.split()[-1] == f"{row['ratio']:.2f}x"  # the printed ratio is the measured one
    assert [float(v) for v in line.split()[2:-1:2]] == [round(row[m]["images_per_s"]) for m in modes]


def _rows(out: str) -> dict[tuple[str, str], list[str]]:
    """(model, backend) -> the printed cells of inference_speed's table."""
    rows = {}
    for line in out.splitlines():
        cells = line.split()
        if len(cells) == 6 and cells[2] in ("torch-fp32", "torch-bf16", "onnx"):
            rows[(cells[0], cells[2])] = cells
    return rows


def test_inference_speed_names_the_weights_and_derives_the_ratio():
    res = run_bench("inference_speed.py", "--models", "fer2013-fast", "fer-mobile", "--backends",
                    "torch-fp32", "onnx", "--threads", "1", "--batch", "16", "--min-time", "0.05",
                    "--latency-runs", "3")
    assert res.returncode == 0, res.stderr
    rows = _rows(res.stdout)
    assert set(rows) == {("fer-mobile-fast", "torch-fp32"), ("fer-mobile-fast", "onnx"),
                         ("fer-mobile", "torch-fp32"), ("fer-mobile", "onnx")}
    # a shipped name loads its trained weights; a registered name is timed with random ones
    assert rows[("fer-mobile-fast", "onnx")][1] == "trained" and rows[("fer-mobile", "onnx")][1] == "random"
    for model in ("fer-mobile-fast", "fer-mobile"):
        base, onnx = (float(rows[(model, b)][3].replace(",", "")) for b in ("torch-fp32", "onnx"))
        assert rows[(model, "torch-fp32")][5] == "1.00x"
        # the ratio comes from the unrounded images/s: equal to the printed ones' ratio within their rounding
        # (each printed images/s is off by up to 0.5, the printed ratio by up to 0.005)
        r = onnx / base
        printed = float(rows[(model, "onnx")][5].rstrip("x"))
        assert printed == pytest.approx(r, abs=0.006 + r * (0.5 / base + 0.5 / onnx))
        assert float(rows[(model, "onnx")][4]) > 0  # latency, ms


def test_inference_speed_rejects_an_unknown_backend():
    res = run_bench("inference_speed.py", "--models", "fer-mobile", "--backends", "tflite")
    assert res.returncode == 2 and "unknown backend(s) ['tflite']; choose from torch-fp32" in res.stderr


def test_explain_speed_times_each_method_faithfulness_and_figures():
    res = run_bench("explain_speed.py", "--model", "fer-mobile", "--faces", "2", "--methods", "saliency", "gradcam",
                    "--faith-steps", "2", "--threads", "1")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == "model fer-mobile, 2 faces, torch threads 1"
    for name in ("saliency", "gradcam", "faithfulness", "figures"):
        (line,) = [s for s in lines if s.split()[0] == name]
        assert re.fullmatch(rf"\s+{name}\s+\d+\.\d\d s\s+.*", line), line
    secs = float(next(s for s in lines if s.split()[0] == "saliency").split()[1])
    per_face = float(re.search(r"\((\d+\.\d) ms/face\)", next(s for s in lines if s.split()[0] == "saliency"))[1])
    assert per_face == pytest.approx(1000 * secs / 2, abs=0.05 + 1000 * 0.005 / 2)  # from the printed seconds


def test_video_speed_shares_add_up_and_frames_per_second_follow_from_the_time():
    out = run_bench("video_speed.py", "--frames", "12", "--repeat", "1", "--threads", "1")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    frames, faces, seconds = re.search(r": (\d+) frames, (\d+) faces in ([\d.]+) s", text).groups()
    assert int(frames) == 12 and int(faces) >= 10  # the generated face is found in (almost) every frame
    fps = float(re.search(r"frames/s: ([\d.]+)", text).group(1))
    # from the printed seconds (2 decimals: +-0.005 s, several percent on a short clip) and fps's own rounding
    low, high = (int(frames) / (float(seconds) + d) for d in (0.005, -0.005))
    assert low - 0.05 <= fps <= high + 0.05
    shares = [float(s) for s in re.findall(r"ms a frame\s+(-?[\d.]+)%", text)]
    assert len(shares) == 6 and sum(shares) == pytest.approx(100, abs=0.6)
