"""The work of one benchmark round, run the same way in every candidate (scripts/bench).

It runs as the agent would (inside the jail, as the agent user) and prints one JSON
object: per work item its figures, and the wall-clock span of each phase so that the
caller can match its memory samples of the proxy to them. Standard library only: it runs
with whatever python the candidate has, and wrk and curl do the heavy lifting.

With --via-proxy the jail is one that offers only an HTTP proxy ($HTTPS_PROXY, as srt
does): curl and the SSE client use it as any client would (CONNECT), and wrk, which
cannot, reaches it through a socat relay on 127.0.0.1 that makes the CONNECT for each of
its connections (a third process on the path: scripts/bench says what it costs).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import socket
import ssl
import statistics
import subprocess
import sys
import time
import urllib.parse

HERE = os.path.dirname(os.path.abspath(__file__))


def wrk(url: str, connections: int, seconds: float, close: bool = False,
        host: str | None = None) -> dict:
    argv = ["wrk", f"-t{min(connections, 2)}", f"-c{connections}", f"-d{max(1, round(seconds))}s",
            "--timeout", "10s", "-s", os.path.join(HERE, "bench_work.lua")]
    if close:
        argv += ["-H", "Connection: close"]
    if host:  # the URL names a relay: the request still names the origin
        argv += ["-H", f"Host: {host}"]
    out = subprocess.run([*argv, url], capture_output=True, text=True, timeout=seconds + 60)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if not line:
        return {"error": (out.stdout + out.stderr)[-300:]}
    r = json.loads(line[-1])
    r["rps"] = r["requests"] / (r["duration_us"] / 1e6)
    return r


def first_request(url: str) -> dict:
    """One request on a new connection, the first the jail's proxy sees: what it does
    once per start (a leaf certificate, srt-decrypt an RSA key in JavaScript) is paid here
    rather than inside the rate items."""
    out = subprocess.run(["curl", "-sk", "-o", "/dev/null", "-w", "%{http_code} %{time_total}",
                          url], capture_output=True, text=True, timeout=60)
    code, total = out.stdout.split()
    return {"status": int(code), "ms": float(total) * 1000}


def download(url: str) -> dict:
    out = subprocess.run(["curl", "-sk", "-o", "/dev/null", "-w", "%{http_code} %{size_download} %{time_total}", url],
                         capture_output=True, text=True, timeout=600)
    code, size, total = out.stdout.split()
    return {"status": int(code), "bytes": int(size), "seconds": float(total),
            "mb_s": int(size) / float(total) / 1e6 if float(total) else 0.0}


class Proxy:
    """The HTTP proxy named by $HTTPS_PROXY (http://user:password@host:port)."""

    def __init__(self, url: str):
        u = urllib.parse.urlsplit(url)
        if u.scheme != "http" or not u.hostname or not u.port:
            raise SystemExit(f"bench_work: cannot use HTTPS_PROXY={url!r}")
        self.host, self.port = u.hostname, u.port
        self.auth = (f"{urllib.parse.unquote(u.username or '')}:"
                     f"{urllib.parse.unquote(u.password or '')}" if u.username else None)
        self.relay: subprocess.Popen | None = None

    def connect(self, host: str, port: int) -> socket.socket:
        """A TCP connection to host:port through the proxy (CONNECT)."""
        s = socket.create_connection((self.host, self.port), timeout=10)
        head = f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        if self.auth:
            token = base64.b64encode(self.auth.encode()).decode()
            head += f"Proxy-Authorization: Basic {token}\r\n"
        s.sendall((head + "\r\n").encode())
        buf = b""
        while b"\r\n\r\n" not in buf:
            data = s.recv(4096)
            if not data:
                s.close()
                raise RuntimeError(f"the proxy closed during CONNECT: {buf[:200]!r}")
            buf += data
        if buf.split(b" ", 2)[1:2] != [b"200"]:
            s.close()
            raise RuntimeError(f"CONNECT refused: {buf.splitlines()[0][:200]!r}")
        return s

    def start_relay(self, host: str, port: int, listen: int) -> str:
        """socat on 127.0.0.1:listen, each connection CONNECTed to host:port; its URL base."""
        # nodelay on both sides: without it the relay alone cut new connections from
        # ~400/s to ~35/s (Nagle against delayed ACKs during the TLS handshake).
        proxy = f"PROXY:{self.host}:{host}:{port},proxyport={self.port},nodelay"
        if self.auth:
            proxy += f",proxyauth={self.auth}"
        self.relay = subprocess.Popen(
            ["socat", f"TCP4-LISTEN:{listen},bind=127.0.0.1,fork,reuseaddr,backlog=4096,nodelay",
             proxy],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", listen), timeout=1).close()
                return f"https://127.0.0.1:{listen}"
            except OSError:
                if self.relay.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("bench_work: the socat relay did not start")
                time.sleep(0.02)

    def stop_relay(self) -> None:
        if self.relay and self.relay.poll() is None:
            self.relay.terminate()
            self.relay.wait()


def first_event(host: str, port: int, tries: int, proxy: Proxy | None = None) -> dict:
    """Time from connect to the first SSE `data:` line, over a new TLS connection
    (through the proxy, CONNECT included, when there is one)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    times, certs = [], set()
    for _ in range(tries):
        t0 = time.perf_counter()
        raw = proxy.connect(host, port) if proxy else socket.create_connection((host, port),
                                                                                timeout=10)
        with raw, ctx.wrap_socket(raw, server_hostname=host) as s:
            s.sendall(f"GET /sse HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n\r\n".encode())
            buf = b""
            while b"data:" not in buf:
                data = s.recv(4096)
                if not data:
                    raise RuntimeError(f"stream ended before an event: {buf[:200]!r}")
                buf += data
            times.append(time.perf_counter() - t0)
            certs.add(hashlib.sha256(s.getpeercert(binary_form=True)).hexdigest())
    # Which certificate the client got: the origin's, or one a proxy made (it decrypts).
    return {"median_ms": statistics.median(times) * 1000, "tries": tries,
            "cert_sha256": sorted(certs)}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--host", required=True)
    p.add_argument("--seconds", type=float, default=5)
    p.add_argument("--download-mb", type=int, default=200)
    p.add_argument("--idle", type=float, default=1.0)
    p.add_argument("--via-proxy", action="store_true",
                   help="the jail offers only the HTTP proxy in $HTTPS_PROXY (srt)")
    a = p.parse_args()
    base = f"https://{a.host}"
    proxy, wrk_base, wrk_host = None, base, None
    if a.via_proxy:
        proxy = Proxy(os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy") or "")
        wrk_base, wrk_host = proxy.start_relay(a.host, 443, 18443), a.host
    phases: dict[str, list[float]] = {}
    results: dict[str, object] = {}

    def phase(name: str, fn, *args, **kw) -> None:
        t0 = time.time()
        try:
            results[name] = fn(*args, **kw)
        except Exception as e:  # one broken item must not hide the others' figures
            results[name] = {"error": f"{type(e).__name__}: {e}"}
        phases[name] = [t0, time.time()]

    try:
        phase("idle", time.sleep, a.idle)
        phase("first", first_request, base + "/small")
        phase("keepalive_c1", wrk, wrk_base + "/small", 1, a.seconds, host=wrk_host)
        phase("keepalive_c8", wrk, wrk_base + "/small", 8, a.seconds, host=wrk_host)
        phase("newconn_c1", wrk, wrk_base + "/small", 1, a.seconds, close=True, host=wrk_host)
        # curl takes the proxy from $HTTPS_PROXY itself.
        phase("download", download, f"{base}/bytes/{a.download_mb * 1000 * 1000}")
        phase("sse", first_event, a.host, 443, 3 if a.seconds < 3 else 7, proxy)
    finally:
        if proxy:
            proxy.stop_relay()
    print(json.dumps({"results": results, "phases": phases}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
