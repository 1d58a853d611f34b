"""``ferlab serve`` under load and abuse, on loopback only: memory after a burst, stalled uploads, many clients.

Starts ``ferlab serve`` as users run it (the launcher's environment, jemalloc included where installed) on a free
port of 127.0.0.1, then, in order:

1. memory: RSS after a few requests (the pre-burst level), after a burst of large uploads (36-megapixel JPEGs,
   ``--burst`` at once, twice), and while idle: the seconds until RSS is back within 20% of the pre-burst level
   (at most ``--idle`` seconds);
2. stalled uploads: ``--stalled`` connections send their headers and 3 bytes of body, then nothing; the seconds
   until a normal upload is answered 200 again, and what the stalled ones were answered;
3. load: ``--clients`` clients post a photo for ``--seconds`` seconds, each on a new connection, waiting as long
   as ``Retry-After`` says after a 503 (``--no-backoff``: at once); every outcome counted (200, 503, other
   statuses, connection resets, time-outs), with the 200s' latency (p50, p95) and the answers per second.

Every loop is bounded in count and time; nothing but 127.0.0.1 is contacted.

    python bench/serve_load.py                       # 50 clients for 60 s, 20 stalled uploads, 30 s idle
    python bench/serve_load.py --clients 8 --seconds 20 --json
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

from ferlab.cli import launcher_env
from ferlab.hardware import describe

RESET_ERRORS = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError, http.client.RemoteDisconnected)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    """Resident memory of process ``pid`` in MB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def photo(path: str | None, scale: float = 1.0) -> bytes:
    """JPEG bytes of ``path``, or of scikit-image's astronaut (one frontal face), resized by ``scale``."""
    import cv2

    if path:
        img = cv2.imread(path, cv2.IMREAD_COLOR)
        if img is None:
            sys.exit(f"{path}: not a readable image")
    else:
        try:
            from skimage import data
        except ImportError:
            sys.exit("scikit-image is needed for the default photo (pip install scikit-image), or pass --image")
        img = np.ascontiguousarray(data.astronaut()[..., ::-1])  # RGB -> BGR
    if scale != 1.0:
        img = cv2.resize(img, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 85])
    assert ok
    return buf.tobytes()


class Server:
    """``ferlab serve`` in a subprocess on 127.0.0.1, its output in a temporary log file."""

    def __init__(self, extra: list[str]) -> None:
        self.port = free_port()
        self.log = tempfile.NamedTemporaryFile("w+", prefix="ferlab-serve-", suffix=".log", delete=False)  # noqa: SIM115
        env = launcher_env(os.environ, ["serve"]) or dict(os.environ)
        self.malloc = "jemalloc (" + env["MALLOC_CONF"] + ")" if "jemalloc" in env.get("LD_PRELOAD", "") else "glibc"
        cmd = [sys.executable, "-m", "ferlab", "serve", "--host", "127.0.0.1", "--port", str(self.port), *extra]
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ferlab serve exited ({self.proc.returncode}):\n{self.output()[-3000:]}")
            try:
                if request(self.port, "GET", "/healthz", timeout=2)[0] == 200:
                    return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("ferlab serve did not answer /healthz within 120 s")

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        os.unlink(self.log.name)


def request(port: int, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
            timeout: float = 60) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        res = conn.getresponse()
        return res.status, {k.lower(): v for k, v in res.getheaders()}, res.read()
    finally:
        conn.close()


def post_photo(port: int, jpeg: bytes, timeout: float = 60) -> tuple[str, float, float]:
    """(outcome, seconds, Retry-After seconds) of one upload: outcome is the status code, 'reset' or 'timeout'."""
    t0 = time.perf_counter()
    try:
        status, headers, _ = request(port, "POST", "/predict", jpeg, {"Content-Type": "image/jpeg"}, timeout)
    except RESET_ERRORS:
        return "reset", time.perf_counter() - t0, 0.0
    except TimeoutError:
        return "timeout", time.perf_counter() - t0, 0.0
    except OSError as e:
        return f"error:{type(e).__name__}", time.perf_counter() - t0, 0.0
    return str(status), time.perf_counter() - t0, float(headers.get("retry-after", 0) or 0)


def memory_phase(srv: Server, jpeg: bytes, big: bytes, burst: int, idle: float) -> dict:
    for _ in range(3):
        post_photo(srv.port, jpeg)
    before = rss_mb(srv.proc.pid)
    outcomes: Counter = Counter()
    for _ in range(2):
        threads = [threading.Thread(target=lambda: outcomes.update([post_photo(srv.port, big, 120)[0]]))
                   for _ in range(burst)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    peak = rss_mb(srv.proc.pid)
    t0, back_after, now = time.monotonic(), None, peak
    while time.monotonic() - t0 < idle:
        time.sleep(1.0)
        now = rss_mb(srv.proc.pid)
        if back_after is None and now <= 1.2 * before:
            back_after = time.monotonic() - t0
            break
    return {"rss_before_mb": before, "rss_after_burst_mb": peak, "rss_after_idle_mb": now,
            "seconds_to_within_20pct": back_after, "idle_waited_s": time.monotonic() - t0,
            "burst_outcomes": dict(outcomes), "burst_uploads": 2 * burst, "burst_upload_bytes": len(big)}


def stalled_phase(srv: Server, jpeg: bytes, n: int, limit: float = 30.0) -> dict:
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", srv.port), timeout=limit)
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\n"
                  b"Content-Length: 100000\r\n\r\nabc")
        socks.append(s)
    time.sleep(0.2)  # let the server take them in
    t0, freed, first = time.monotonic(), None, None
    while time.monotonic() - t0 < limit:
        outcome = post_photo(srv.port, jpeg, timeout=limit)[0]
        first = first or outcome
        if outcome == "200":
            freed = time.monotonic() - t0
            break
        time.sleep(0.25)
    answers: Counter = Counter()
    for s in socks:
        try:
            head = s.recv(64).decode("latin-1")
            answers[head.split(" ")[1] if head.startswith("HTTP/") else "closed"] += 1
        except OSError as e:
            answers[type(e).__name__] += 1
        finally:
            s.close()
    return {"stalled": n, "first_answer_while_stalled": first, "seconds_until_200": freed,
            "stalled_answered": dict(answers)}


def load_phase(srv: Server, jpeg: bytes, clients: int, seconds: float, backoff: bool) -> dict:
    outcomes: Counter = Counter()
    latencies: list[float] = []
    lock = threading.Lock()
    until = time.monotonic() + seconds

    def client() -> None:
        while time.monotonic() < until:
            outcome, dt, retry = post_photo(srv.port, jpeg, timeout=60)
            with lock:
                outcomes[outcome] += 1
                if outcome == "200":
                    latencies.append(dt)
            if outcome == "503" and backoff:
                time.sleep(min(retry or 1.0, max(0.0, until - time.monotonic())))
            elif outcome not in ("200", "503"):
                time.sleep(0.05)  # a failed connection: do not spin

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=seconds + 120)
    wall = time.monotonic() - t0
    lat = np.array(latencies) if latencies else np.array([np.nan])
    return {"clients": clients, "seconds": seconds, "backoff": backoff, "outcomes": dict(outcomes),
            "requests": sum(outcomes.values()), "answered_200": outcomes["200"], "answered_503": outcomes["503"],
            "resets": outcomes["reset"], "other": sum(v for k, v in outcomes.items() if k not in ("200", "503")),
            "p50_s": float(np.percentile(lat, 50)), "p95_s": float(np.percentile(lat, 95)),
            "answers_200_per_s": outcomes["200"] / wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=60.0, help="length of the load phase")
    ap.add_argument("--no-backoff", action="store_true", help="clients retry a 503 at once (Retry-After ignored)")
    ap.add_argument("--stalled", type=int, default=20, help="stalled uploads (more than the server admits at once)")
    ap.add_argument("--burst", type=int, default=4, help="36-megapixel uploads sent at once, twice")
    ap.add_argument("--idle", type=float, default=30.0, help="the most seconds to wait for memory to come back")
    ap.add_argument("--image", help="photo to post (default: scikit-image's astronaut)")
    ap.add_argument("--skip", nargs="*", default=[], choices=("memory", "stalled", "load"), help="phases to skip")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON too")
    ap.add_argument("serve_args", nargs=argparse.REMAINDER, help="after --: options for ferlab serve")
    args = ap.parse_args()
    extra = [a for a in args.serve_args if a != "--"]
    jpeg = photo(args.image)
    big = photo(args.image, scale=float(np.sqrt(36e6 / (512 * 512)))) if "memory" not in args.skip else b""
    srv = Server(extra)
    load = os.getloadavg()[0]
    print(f"{describe()}; load average {load:.2f} at start; ferlab serve {' '.join(extra) or '(defaults)'} on "
          f"127.0.0.1:{srv.port}, allocator {srv.malloc}; photo {len(jpeg):,} bytes")
    res: dict = {"cpu": describe(), "allocator": srv.malloc, "serve_args": extra}
    try:
        if "memory" not in args.skip:
            m = res["memory"] = memory_phase(srv, jpeg, big, args.burst, args.idle)
            back = m["seconds_to_within_20pct"]
            print(f"memory: RSS {m['rss_before_mb']:.0f} MB before, {m['rss_after_burst_mb']:.0f} MB after "
                  f"{m['burst_uploads']} uploads of 36 MP ({len(big) / 2**20:.1f} MiB JPEG; {m['burst_outcomes']}), "
                  f"{m['rss_after_idle_mb']:.0f} MB after {m['idle_waited_s']:.0f} s idle: "
                  + (f"within 20% of the pre-burst level after {back:.0f} s" if back is not None else
                     f"NOT back within 20% ({m['rss_after_idle_mb'] / m['rss_before_mb']:.2f}x)"))
        if "stalled" not in args.skip:
            s = res["stalled"] = stalled_phase(srv, jpeg, args.stalled)
            freed = s["seconds_until_200"]
            print(f"stalled uploads: {s['stalled']} connections sent headers and 3 bytes, then nothing; a normal "
                  f"upload was first answered {s['first_answer_while_stalled']}, then 200 after "
                  + (f"{freed:.1f} s" if freed is not None else "NEVER (30 s)")
                  + f"; the stalled ones were answered {s['stalled_answered']}")
        if "load" not in args.skip:
            r = res["load"] = load_phase(srv, jpeg, args.clients, args.seconds, not args.no_backoff)
            others = {k: v for k, v in r["outcomes"].items() if k not in ("200", "503")}
            mode = "Retry-After honoured" if r["backoff"] else "no back-off"
            print(f"load: {r['clients']} clients for {r['seconds']:.0f} s ({mode}): {r['requests']:,} requests, "
                  f"{r['answered_200']:,} x 200, {r['answered_503']:,} x 503, {r['resets']:,} resets, "
                  f"{r['other']:,} other {others}; 200s: p50 {r['p50_s']:.2f} s, p95 {r['p95_s']:.2f} s, "
                  f"{r['answers_200_per_s']:.2f}/s")
        log = srv.output()
        res["server_log_tracebacks"] = log.count("Traceback")
        print(f"server log: {len(log.splitlines())} lines, {res['server_log_tracebacks']} tracebacks")
    finally:
        srv.stop()
    if args.json:
        print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
