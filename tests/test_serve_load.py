"""``ferlab serve`` under load and abuse, end to end on loopback (slow tier): bench/serve_load.py against the real
command, as users start it, with its figures checked.

Bounded: 50 clients for 15 s, 20 stalled uploads, a burst of eight 36-megapixel uploads, at most 30 s idle.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("skimage", reason="the load test posts scikit-image's astronaut (pip install scikit-image)")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def figures() -> dict:
    out = subprocess.run([sys.executable, str(REPO / "bench" / "serve_load.py"), "--clients", "50", "--seconds", "15",
                          "--stalled", "20", "--burst", "4", "--idle", "30", "--json"],
                         capture_output=True, text=True, timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    return json.loads(text[text.index("\n{") + 1:])


@pytest.mark.slow
def test_fifty_clients_get_200_or_503_never_a_reset(figures):
    load = figures["load"]
    assert load["resets"] == 0 and load["other"] == 0, load["outcomes"]
    assert load["answered_200"] > 0 and load["answered_503"] > 0  # 50 clients are over the 16 admitted at once
    assert load["requests"] == load["answered_200"] + load["answered_503"]


@pytest.mark.slow
def test_stalled_uploads_free_the_server_within_ten_seconds(figures):
    stalled = figures["stalled"]
    assert stalled["first_answer_while_stalled"] == "503"  # the stalls held every slot: answered, not reset
    assert stalled["seconds_until_200"] is not None and stalled["seconds_until_200"] < 10
    assert stalled["stalled_answered"].get("408", 0) >= 16  # the admitted ones timed out (the rest got 503)


@pytest.mark.slow
def test_memory_comes_back_after_a_burst_and_no_tracebacks(figures):
    mem = figures["memory"]
    assert mem["burst_outcomes"] == {"200": mem["burst_uploads"]}
    assert mem["seconds_to_within_20pct"] is not None, mem  # RSS within 20% of the pre-burst level, <= 30 s idle
    assert figures["server_log_tracebacks"] == 0
