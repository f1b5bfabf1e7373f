"""The work of one benchmark round, run the same way in every candidate (scripts/bench).

It runs as the agent would (inside the jail, as the agent user) and prints one JSON
object: per work item its figures, and the wall-clock span of each phase so that the
caller can match its memory samples of the proxy to them. Standard library only: it runs
with whatever python the candidate has, and wrk and curl do the heavy lifting.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import ssl
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def wrk(url: str, connections: int, seconds: float, close: bool = False) -> dict:
    argv = ["wrk", f"-t{min(connections, 2)}", f"-c{connections}", f"-d{max(1, round(seconds))}s",
            "--timeout", "10s", "-s", os.path.join(HERE, "bench_work.lua")]
    if close:
        argv += ["-H", "Connection: close"]
    out = subprocess.run([*argv, url], capture_output=True, text=True, timeout=seconds + 60)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if not line:
        return {"error": (out.stdout + out.stderr)[-300:]}
    r = json.loads(line[-1])
    r["rps"] = r["requests"] / (r["duration_us"] / 1e6)
    return r


def download(url: str) -> dict:
    out = subprocess.run(["curl", "-sk", "-o", "/dev/null", "-w", "%{http_code} %{size_download} %{time_total}", url],
                         capture_output=True, text=True, timeout=600)
    code, size, total = out.stdout.split()
    return {"status": int(code), "bytes": int(size), "seconds": float(total),
            "mb_s": int(size) / float(total) / 1e6 if float(total) else 0.0}


def first_event(host: str, port: int, tries: int) -> dict:
    """Time from connect to the first SSE `data:` line, over a new TLS connection."""
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    times = []
    for _ in range(tries):
        t0 = time.perf_counter()
        with socket.create_connection((host, port), timeout=10) as raw, \
                ctx.wrap_socket(raw, server_hostname=host) as s:
            s.sendall(f"GET /sse HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n\r\n".encode())
            buf = b""
            while b"data:" not in buf:
                data = s.recv(4096)
                if not data:
                    raise RuntimeError(f"stream ended before an event: {buf[:200]!r}")
                buf += data
            times.append(time.perf_counter() - t0)
    return {"median_ms": statistics.median(times) * 1000, "tries": tries}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--host", required=True)
    p.add_argument("--seconds", type=float, default=5)
    p.add_argument("--download-mb", type=int, default=200)
    p.add_argument("--idle", type=float, default=1.0)
    a = p.parse_args()
    base = f"https://{a.host}"
    phases: dict[str, list[float]] = {}
    results: dict[str, object] = {}

    def phase(name: str, fn, *args, **kw) -> None:
        t0 = time.time()
        try:
            results[name] = fn(*args, **kw)
        except Exception as e:  # one broken item must not hide the others' figures
            results[name] = {"error": f"{type(e).__name__}: {e}"}
        phases[name] = [t0, time.time()]

    phase("idle", time.sleep, a.idle)
    phase("keepalive_c1", wrk, base + "/small", 1, a.seconds)
    phase("keepalive_c8", wrk, base + "/small", 8, a.seconds)
    phase("newconn_c1", wrk, base + "/small", 1, a.seconds, close=True)
    phase("download", download, f"{base}/bytes/{a.download_mb * 1000 * 1000}")
    phase("sse", first_event, a.host, 443, 3 if a.seconds < 3 else 7)
    print(json.dumps({"results": results, "phases": phases}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
