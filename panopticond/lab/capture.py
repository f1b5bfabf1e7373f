"""A packet capture inside one of the lab's namespaces: the oracle that trusts no server.

The servers' event log only sees what reaches a listener; a capture sees every frame on
an interface, whatever its protocol, port or fate. Tests embed a random canary in every
payload they send and then ask whether those bytes ever crossed the wire:

    with lab.capture("net") as cap:      # the internet's side of the lab's link
        ...attack...
    assert not cap.contains(canary)

tcpdump writes the capture (Debian's `tcpdump`, a test dependency of scripts/install);
without it, a small AF_PACKET reader in Python does the same job. Either way the
capture is raw frames in one file, searched byte for byte: a canary in a TLS payload is
invisible (encrypted), one in an SNI, a DNS name, a plain HTTP request or a datagram is
not. A needle split across two TCP segments would be missed, so keep canaries short.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Self

# Raw frames from every interface of the namespace (or one), each written as a 4-byte
# big-endian length and the frame. Used only where tcpdump is missing.
_PY_CAPTURE = r"""
import os, socket, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
if sys.argv[1] != "any":
    s.bind((sys.argv[1], 0))
out = os.fdopen(1, "wb", buffering=0)
out.write(b"ready\n")
while True:
    frame = s.recv(65536)
    out.write(len(frame).to_bytes(4, "big") + frame)
"""


class Capture:
    """Frames seen on `iface` ("any": all of them, later ones too) in namespace `netns`."""

    def __init__(self, netns: str, iface: str, path: Path):
        self.netns, self.iface, self.path = netns, iface, path
        self.tool = "tcpdump" if shutil.which("tcpdump") else "python"
        self._proc: subprocess.Popen[bytes] | None = None
        self._data: bytes | None = None

    def start(self, timeout: float = 10.0) -> Self:
        out = open(self.path, "wb")
        try:
            if self.tool == "tcpdump":
                # -w - keeps the file ours (no privilege drop or AppArmor path rules in
                # the way); -U flushes each packet; -s 0 keeps whole frames.
                argv = ["tcpdump", "-i", self.iface, "-n", "-s", "0", "-U", "-w", "-",
                        "--immediate-mode"]
                self._proc = subprocess.Popen(
                    ["ip", "netns", "exec", self.netns, *argv], stdout=out,
                    stderr=subprocess.PIPE, start_new_session=True)
                self._wait_tcpdump(timeout)
            else:
                self._proc = subprocess.Popen(
                    ["ip", "netns", "exec", self.netns, sys.executable, "-c", _PY_CAPTURE,
                     self.iface], stdout=subprocess.PIPE, start_new_session=True)
                assert self._proc.stdout is not None
                if self._proc.stdout.readline() != b"ready\n":
                    raise RuntimeError("the Python capture did not start")
                self._pump = _Pump(self._proc.stdout, out)
        finally:
            if self.tool == "tcpdump":
                out.close()
        return self

    def _wait_tcpdump(self, timeout: float) -> None:
        # tcpdump says "listening on ..." on stderr once the socket is bound.
        assert self._proc is not None and self._proc.stderr is not None
        deadline = time.monotonic() + timeout
        line = b""
        os.set_blocking(self._proc.stderr.fileno(), False)
        while b"listening on" not in line:
            if self._proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"tcpdump did not start: {line.decode(errors='replace')}")
            with contextlib.suppress(BlockingIOError, TypeError):
                line += self._proc.stderr.read() or b""
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop capturing (idempotent); what was seen stays readable."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            time.sleep(0.2)  # frames in flight
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGINT if self.tool == "tcpdump" else signal.SIGKILL)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if self.tool == "python":
            self._pump.join()
        for pipe in (proc.stdout, proc.stderr):
            if pipe:
                pipe.close()

    def data(self) -> bytes:
        """Everything captured so far (the file as it is now)."""
        if self._data is not None:
            return self._data
        data = self.path.read_bytes()
        if self._proc is None:
            self._data = data
        return data

    def contains(self, needle: str | bytes) -> bool:
        needle = needle.encode() if isinstance(needle, str) else needle
        return needle in self.data()

    def count(self, needle: str | bytes) -> int:
        needle = needle.encode() if isinstance(needle, str) else needle
        return self.data().count(needle)

    def __enter__(self) -> Self:
        return self.start() if self._proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _Pump:
    """Copies the Python capture's stdout into the file, in a thread."""

    def __init__(self, src, dst):
        import threading

        self._src, self._dst = src, dst
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with self._dst:
            while chunk := self._src.read1(1 << 16):
                self._dst.write(chunk)
                self._dst.flush()

    def join(self) -> None:
        self._thread.join(5)
