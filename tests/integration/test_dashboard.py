"""The dashboard in a real browser, and /metrics, against a panopticond in the lab.

Headless Chromium runs in the lab's simulated host (where the daemon's loopback
listener is) and is driven over the DevTools protocol on a pipe (--remote-debugging-pipe:
fd 3 in, fd 4 out, NUL-separated JSON; no port, no websocket). It loads `/`, sees the
agent's first requests, then a request the agent makes afterwards appears in the live
table without a reload, and a screenshot is saved (its path is printed).
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

import jailrun as jail
from jailrun import V4_ONLY, VENV_PYTHON
from test_daemon import Daemon

pytestmark = pytest.mark.root

CHROMIUM = next((p for p in ("/usr/lib/chromium/chromium", shutil.which("chromium") or "")
                 if p and os.access(p, os.X_OK)), None)
AGENT = Path(__file__).with_name("dash_agent.py")
ARTIFACTS = Path(os.environ.get("PANOPTICON_ARTIFACTS", "/tmp/panopticon-artifacts"))
PORT = 9187


class Browser:
    """Chromium on a DevTools pipe: `call(method, **params)` -> result."""

    def __init__(self, lab, tmp: Path):
        profile = str(tmp / "profile")
        to_r, self._to_w = os.pipe()
        self._from_r, from_w = os.pipe()

        def fds() -> None:  # in the child: the pipe ends on fds 3 and 4
            a, b = os.dup(to_r), os.dup(from_w)
            os.dup2(a, 3)
            os.dup2(b, 4)

        argv = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                f"--user-data-dir={profile}", "--remote-debugging-pipe",
                "--window-size=1280,1000", "about:blank"]
        self.log = open(tmp / "chromium.log", "wb")
        self.proc = subprocess.Popen(lab.in_host(argv), pass_fds=(3, 4), preexec_fn=fds,
                                     stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     env=dict(os.environ, HOME=profile))
        os.close(to_r)
        os.close(from_w)
        self._buf = b""
        self._id = 0
        self.session: str | None = None

    def call(self, method: str, session: bool = True, timeout: float = 30, **params):
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if session and self.session:
            msg["sessionId"] = self.session
        os.write(self._to_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self._buf:
                raw, self._buf = self._buf.split(b"\0", 1)
                doc = json.loads(raw)
                if doc.get("id") == self._id:
                    if "error" in doc:
                        raise AssertionError(f"{method}: {doc['error']}")
                    return doc["result"]
            if time.monotonic() > deadline:
                raise AssertionError(f"no answer to {method} in {timeout} s")
            import select
            if select.select([self._from_r], [], [], 1)[0]:
                data = os.read(self._from_r, 1 << 20)
                if not data:
                    raise AssertionError("chromium closed the pipe: see chromium.log")
                self._buf += data

    def open(self, url: str) -> None:
        target = self.call("Target.createTarget", session=False, url=url)["targetId"]
        self.session = self.call("Target.attachToTarget", session=False, targetId=target,
                                 flatten=True)["sessionId"]

    def js(self, expression: str):
        r = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return r["result"].get("value")

    def close(self) -> None:
        with_pipe = self._to_w
        try:
            self.call("Browser.close", session=False, timeout=5)
        except (AssertionError, OSError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            jail.kill_group(self.proc, 9)
            self.proc.wait()
        os.close(with_pipe)
        os.close(self._from_r)
        self.log.close()


@pytest.fixture(scope="module")
def work(lab):
    jail.add_lab_names(lab)
    w = jail.Workdir()
    w.write("dash_agent.py", AGENT.read_text())
    try:
        yield w
    finally:
        w.close()


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed "
                    "(apt-get install chromium; scripts/install --test does)")
def test_dashboard_shows_the_agents_requests_live_in_a_real_browser(lab, work, capsys):
    token = "pnt" + secrets.token_hex(4)
    go = work.path / f"go-{token}"
    d = Daemon(lab, work, "pntdash", PORT,
               [VENV_PYTHON, str(work.path / "dash_agent.py"), token, V4_ONLY[0], V4_ONLY[1],
                str(go)])
    tmp = Path(tempfile.mkdtemp(prefix="pnt-chromium-"))
    browser = None
    try:
        d.start()
        d.wait_ready()
        jail_wait = lambda pred, what, t=30: lab.wait_for(  # noqa: E731
            pred, t, interval=0.2, message=f"{what}; agent: {d.output}\n" + "\n".join(d.journal))
        jail_wait(lambda: "early done" in d.output, "the agent's first requests")

        browser = Browser(lab, tmp)
        browser.open(f"http://127.0.0.1:{PORT}/")
        table = "document.getElementById('recent').innerText"
        jail_wait(lambda: f"/dash/{token}/early" in (browser.js(table) or ""),
                  "the early request in the page")
        assert "denied.example" in browser.js(table)
        # Marks this page load: still there later means no reload happened meanwhile.
        browser.js("window.pntMark = 'same page'")
        assert f"/dash/{token}/live" not in browser.js(table)

        go.write_text("")
        jail_wait(lambda: f"/dash/{token}/live" in (browser.js(table) or ""),
                  "the live request in the page")
        assert browser.js("window.pntMark") == "same page"
        blocked = browser.js("document.getElementById('blocked').innerText")
        assert "denied.example" in blocked and '"denied.example"' in blocked, blocked
        assert browser.js("document.getElementById('state').textContent") == "ready"
        assert browser.js("document.querySelectorAll('#chart rect').length") > 0
        time.sleep(1.5)  # one more poll: the chart and counts have the live request too
        shot = browser.call("Page.captureScreenshot", format="png")["data"]
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"dashboard-{token}.png"
        path.write_bytes(base64.b64decode(shot))
        with capsys.disabled():
            print(f"\n[test_dashboard] screenshot: {path}")
        assert path.stat().st_size > 10_000

        # /metrics counts the same records.
        r = subprocess.run(lab.in_host(["curl", "-s", "-m", "5",
                                        f"http://127.0.0.1:{PORT}/metrics"]),
                           capture_output=True, text=True, timeout=30)
        m = dict(ln.rsplit(" ", 1) for ln in r.stdout.splitlines() if not ln.startswith("#"))
        assert float(m['panopticon_requests_total{kind="http",decision="deny"}']) >= 1
        assert float(m['panopticon_requests_total{kind="http",decision="allow"}']) >= 2
        assert float(m["panopticon_http_request_duration_seconds_count"]) >= 3
        assert m["panopticon_ready"] == "1" and m["panopticon_proxy_restarts_total"] == "0"
        # The server's own log: the early and live requests arrived, the denied one did not.
        paths = [str(e.get("path", "")) for e in lab.events() if token in str(e.get("path", ""))]
        assert any(p.endswith("/early") for p in paths) and any(p.endswith("/live") for p in paths)
        assert not any(p.endswith("/denied") for p in paths), paths
    finally:
        if browser is not None:
            browser.close()
        d.close()
        shutil.rmtree(tmp, ignore_errors=True)
    assert not jail.leftovers(lab, "pntdash")
