"""`panopticond NAME` against the lab, without systemd: the test plays the service manager.

The daemon runs in the lab's simulated host (`lab.in_host`), with a `NOTIFY_SOCKET` that
the test listens on; its /healthz is on the simulated host's loopback and is queried
from there. One daemon, whose agent makes requests without end (`traffic_agent.py`),
goes through readiness, a proxy killed under traffic, a proxy stopped, two reloads and
SIGTERM; a second one has a rule deleted under it; a third's agent exits by itself.
Every claim is checked on the daemon's side (health, journal) and on the simulated
internet's own logs, each block with its positive control.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

import jailrun as jail
from jailrun import V4_ONLY, V6_ONLY, VENV_PYTHON

pytestmark = pytest.mark.root

TRAFFIC = Path(__file__).with_name("traffic_agent.py")
DAEMON_ARGV = (jail.PANOPTICON_ARGV[:-1] + ["panopticond.daemon"]
               if jail.PANOPTICON_ARGV[-1] == "panopticond.cli"
               else [shutil.which("panopticond") or "/usr/local/bin/panopticond"])
_FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')


def parse_event(line: str) -> dict:
    return {k: json.loads(v) if v.startswith('"') else v for k, v in _FIELD.findall(line)}


def boottime_start(pid: int) -> float:
    """When `pid` started, on CLOCK_BOOTTIME (what traffic_agent.py stamps requests with)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")


def gone_or_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


class Daemon:
    """One panopticond, its notifications, journal and agent output, as the test sees them."""

    def __init__(self, lab, work: jail.Workdir, name: str, port: int, command: list[str],
                 allow=jail.ALLOWED, check_interval: float = 30.0):
        self.lab, self.work, self.name, self.port = lab, work, name, port
        self.command, self.check_interval = command, check_interval
        self.config = work.path / f"{name}.toml"
        self.write_config(allow)
        self.notes: list[tuple[float, str]] = []  # (time.time(), datagram)
        self.journal: list[str] = []
        self.output: list[str] = []
        self.proc: subprocess.Popen | None = None

    def config_text(self, allow, extra: str = "") -> str:
        return jail.config_text(self.lab, allow) + (
            f"[agents.{self.name}]\ncommand = {json.dumps(self.command)}\n"
            f'user = "{jail.AGENT_USER}"\nhealth = "127.0.0.1:{self.port}"\n{extra}')

    def write_config(self, allow, extra: str = "") -> None:
        tmp = self.config.with_suffix(".new")
        tmp.write_text(self.config_text(allow, extra))
        tmp.chmod(0o644)
        tmp.replace(self.config)

    def start(self) -> None:
        sock_path = str(self.work.path / f"{self.name}.notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(sock_path)
        self.sock.settimeout(0.5)
        env = dict(os.environ, NOTIFY_SOCKET=sock_path)
        argv = self.lab.in_host([*DAEMON_ARGV, "--config", str(self.config),
                                 "--check-interval", str(self.check_interval), self.name])
        self.proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, start_new_session=True)
        self._threads = [
            threading.Thread(target=self._read_notes, daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, self.journal), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stdout, self.output), daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _read_notes(self) -> None:
        while self.proc is not None:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                if self.proc.poll() is not None:
                    return
                continue
            except OSError:
                return
            self.notes.append((time.time(), data.decode()))

    @staticmethod
    def _read(stream, into: list[str]) -> None:
        for line in stream:
            into.append(line.rstrip("\n"))

    # -- what the test asks -------------------------------------------------------

    def wait_ready(self, timeout: float = 60) -> float:
        """The time READY=1 arrived."""
        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"panopticond exited {self.proc.returncode}:\n"
                                     + "\n".join(self.journal))
            return next((t for t, n in self.notes if "READY=1" in n.split("\n")), None)
        try:
            return self.lab.wait_for(ready, timeout, interval=0.05)
        except TimeoutError:
            raise AssertionError(f"no READY=1 within {timeout} s; notifications {self.notes}; "
                                 "journal:\n" + "\n".join(self.journal)) from None

    def health(self) -> tuple[int, dict]:
        r = subprocess.run(self.lab.in_host(
            ["curl", "-s", "-m", "5", "-w", "\n%{http_code}", f"http://127.0.0.1:{self.port}/healthz"]),
            capture_output=True, text=True, timeout=30)
        body, _, code = r.stdout.rpartition("\n")
        return int(code or 0), (json.loads(body) if body.strip() else {})

    def wait_health(self, pred, timeout: float = 60, what: str = "") -> dict:
        last: list = []

        def check():
            code, doc = self.health()
            last[:] = [code, doc]
            return doc if pred(code, doc) else None
        try:
            return self.lab.wait_for(check, timeout, interval=0.1)
        except TimeoutError:
            raise AssertionError(f"health never {what}: last {last}\n" + "\n".join(self.journal))

    def events(self, name: str) -> list[dict]:
        return [e for e in map(parse_event, list(self.journal)) if e.get("event") == name]

    def wait_event(self, name: str, timeout: float = 30, **match) -> dict:
        return self.lab.wait_for(
            lambda: next((e for e in self.events(name)
                          if all(e.get(k) == v for k, v in match.items())), None),
            timeout, message=f"no event={name} {match}:\n" + "\n".join(self.journal))

    def traffic(self) -> list[dict]:
        out = []
        for line in list(self.output):
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def proxy_pid(self) -> int:
        return self.health()[1]["proxy"]["pid"]

    def jailed(self, argv: list[str]) -> list[str]:
        """`argv` in the jail as the agent's user: what the agent itself could do."""
        return ["nsenter", f"--net=/run/netns/panopticon-{self.name}", "setpriv", "--reuid",
                jail.AGENT_USER, "--regid", "nogroup", "--clear-groups", *argv]

    def reload(self) -> subprocess.CompletedProcess:
        return subprocess.run(self.lab.in_host([*DAEMON_ARGV, "--reload", self.name]),
                              capture_output=True, text=True, timeout=90)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)
        return self.proc.wait(timeout)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            jail.kill_group(self.proc, signal.SIGKILL)
            self.proc.wait()
        subprocess.run(self.lab.in_host([*jail.PANOPTICON_ARGV, "cleanup", "--force", self.name]),
                       capture_output=True, timeout=60)
        with_sock = getattr(self, "sock", None)
        if with_sock is not None:
            with_sock.close()


@pytest.fixture(scope="module")
def work(lab):
    jail.add_lab_names(lab)
    w = jail.Workdir()
    w.write("traffic_agent.py", TRAFFIC.read_text())
    try:
        yield w
    finally:
        w.close()


@pytest.fixture(scope="module")
def canary():
    return "pnt" + secrets.token_hex(5)


POLLER = """
import sys, time, urllib.request, urllib.error
url = sys.argv[1]
while True:
    try:
        code = urllib.request.urlopen(url, timeout=1).status
    except urllib.error.HTTPError as e:
        code = e.code
    except OSError:
        code = 0
    print(time.time(), code, flush=True)
    time.sleep(0.02)
"""


@pytest.fixture(scope="module")
def daemon(lab, work, canary):
    """The main daemon, started once; `.startup` holds what was seen while it started."""
    spec = {"https": [V4_ONLY[0], V6_ONLY[0]], "http_ip": [[V4_ONLY[1], V4_ONLY[0]],
                                                          [V6_ONLY[1], V6_ONLY[0]]]}
    d = Daemon(lab, work, "pntdmn", 9185,
               [VENV_PYTHON, str(work.path / "traffic_agent.py"), canary, json.dumps(spec)])
    poller = subprocess.Popen(lab.in_host([VENV_PYTHON, "-c", POLLER, f"http://127.0.0.1:{d.port}/healthz"]),
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    mark = lab.mark()
    try:
        d.start()
        ready_at = d.wait_ready()
        time.sleep(0.5)
        jail.kill_group(poller, signal.SIGKILL)
        polls = [(float(t), int(c)) for t, c in (ln.split() for ln in poller.stdout.read().split("\n") if ln)]
        poller.wait()
        d.startup = {"ready_at": ready_at, "polls": polls, "events": lab.events(since=mark)}
        yield d
    finally:
        if poller.poll() is None:
            jail.kill_group(poller, signal.SIGKILL)
            poller.wait()
        d.close()


# -- readiness ---------------------------------------------------------------------------

def test_ready_only_after_the_selftest_passed(daemon):
    s = daemon.startup
    # The self-test's allowed request reached the server (through the proxy) before READY.
    probes = [e for e in s["events"] if str(e.get("path", "")).startswith("/.panopticon-selftest/")]
    assert probes and all(e["sni"] == "www.allowed.example" for e in probes), probes
    assert max(e["ts"] for e in probes) < s["ready_at"]
    statuses = [n for _, n in daemon.notes]
    first_ready = next(i for i, n in enumerate(statuses) if "READY=1" in n)
    assert any("self-test" in n for n in statuses[:first_ready]), statuses
    journal = [e["event"] for e in map(parse_event, daemon.journal)]
    assert journal.index("selftest") < journal.index("ready") < journal.index("agent-start")


def test_healthz_is_503_then_200(daemon):
    s = daemon.startup
    codes = [c for _, c in s["polls"] if c]
    assert 503 in codes and 200 in codes, codes
    # Never 200 before the self-test's request was served; never 503 after the first 200.
    first_200 = next(t for t, c in s["polls"] if c == 200)
    probe_ts = max(e["ts"] for e in s["events"]
                   if str(e.get("path", "")).startswith("/.panopticon-selftest/"))
    assert first_200 > probe_ts
    assert all(c == 200 for t, c in s["polls"] if t > first_200)
    code, doc = daemon.health()
    assert code == 200 and doc["ready"] and doc["not_ready"] == [], doc
    assert set(doc["checks"]) == {"rules", "proxy", "ca", "selftest"}


def test_the_selftest_left_no_trace_outside(daemon):
    # Its direct TCP, UDP and DNS attempts went to the lab's resolver, whose sinks would
    # have logged them; the positive control is its allowed request, logged above.
    events = daemon.startup["events"]
    assert not [e for e in events if e["kind"] == "tcp" and e["port"] == 853]
    assert not [e for e in events if e["kind"] == "udp"]
    assert not [e for e in events if e["kind"] == "dns" and "panopticon" in e.get("name", "")]


def test_healthz_is_unreachable_from_the_jail(daemon):
    route = subprocess.run(["ip", "-n", f"panopticon-{daemon.name}", "-4", "route", "show",
                            "default"], capture_output=True, text=True).stdout.split()
    gateway = route[route.index("via") + 1]
    code = (f"import socket, json\nout = {{}}\n"
            f"for host in ('127.0.0.1', {gateway!r}):\n"
            f"    try:\n"
            f"        socket.create_connection((host, {daemon.port}), timeout=3).close()\n"
            f"        out[host] = 'connected'\n"
            f"    except OSError as e:\n"
            f"        out[host] = type(e).__name__\n"
            f"print(json.dumps(out))\n")
    r = subprocess.run(daemon.jailed([VENV_PYTHON, "-c", code]), capture_output=True,
                       text=True, timeout=30)
    out = json.loads(r.stdout)
    assert "connected" not in out.values(), out
    # Positive control: the simulated host reaches it (and the agent's own traffic flows).
    assert daemon.health()[0] == 200
    assert [t for t in daemon.traffic() if t["ok"]]


# -- supervision -------------------------------------------------------------------------

def test_proxy_killed_under_traffic_leaks_nothing_and_recovers(lab, daemon, canary):
    lab.wait_for(lambda: len([t for t in daemon.traffic() if t["ok"]]) >= 8, 30)
    mark = lab.mark()
    # The premise, "some attempt overlapped the proxy's absence", is checked, not
    # assumed: a quick restart can fall between two rounds of the agent's traffic, and
    # then the kill is repeated (at most three times).
    for _ in range(3):
        old = daemon.proxy_pid()
        os.kill(old, signal.SIGKILL)
        lab.wait_for(lambda: gone_or_zombie(old), 10)
        dead_from = time.clock_gettime(time.CLOCK_BOOTTIME)

        doc = daemon.wait_health(lambda c, d: c == 503 and "proxy" in d["not_ready"], 30, "503")
        assert not doc["ready"]
        doc = daemon.wait_health(lambda c, d: c == 200 and d["proxy"]["pid"] != old, 90,
                                 "recovered")
        new = doc["proxy"]["pid"]
        dead_until = boottime_start(new)
        daemon.wait_event("proxy-restarted", pid=str(new))
        traffic = daemon.traffic()
        overlap = [t for t in traffic
                   if t["start"] < dead_until and t.get("end", 1e18) > dead_from]
        if overlap:
            break

    # Requests that ran entirely while no proxy existed: all failed, none reached a
    # server. (One that overlaps the recovery may rightly succeed after it: a lookup that
    # waited for the new DNS listener, say.)
    assert overlap, "no attempt overlapped the proxy's absence: the test proved nothing"
    inside = [t for t in traffic if dead_from <= t["start"] and t["end"] <= dead_until]
    assert all(not t["ok"] for t in inside), [t for t in inside if t["ok"]]
    reached = {e.get("path") for e in lab.events(since=mark)}
    leaked = [t for t in inside if f"/traffic/{canary}/{t['n']}" in reached]
    assert leaked == []
    # An attempt that failed because the proxy was gone left no trace upstream either.
    failed = [t for t in overlap if not t["ok"]]
    assert not [t for t in failed if f"/traffic/{canary}/{t['n']}" in reached]
    # Positive control: after the recovery the same requests get through again, and the
    # servers log them.
    after = lab.wait_for(lambda: [t for t in daemon.traffic()
                                  if t["kind"] == "https" and t["ok"] and t["start"] > dead_until], 30)
    assert f"/traffic/{canary}/{after[0]['n']}" in {e.get("path") for e in lab.events(since=mark)}
    down = daemon.events("proxy-down")
    assert down and down[-1]["pid"] == str(old) and "exited" in down[-1]["reason"]


def test_proxy_stopped_is_detected_and_replaced(daemon):
    old = daemon.proxy_pid()
    os.kill(old, signal.SIGSTOP)
    try:
        doc = daemon.wait_health(lambda c, d: c == 503 and "proxy" in d["not_ready"], 30, "503")
        assert "stopped" in doc["checks"]["proxy"]["detail"] or "restart" in doc["checks"]["proxy"]["detail"]
        daemon.wait_health(lambda c, d: c == 200 and d["proxy"]["pid"] not in (None, old),
                           90, "recovered")
    finally:
        with_pid = Path(f"/proc/{old}")
        if with_pid.exists():
            os.kill(old, signal.SIGCONT)
    assert any(e["pid"] == str(old) and "stopped" in e["reason"]
               for e in daemon.events("proxy-down"))
    assert gone_or_zombie(old)


# -- reload ------------------------------------------------------------------------------

KEEPALIVE = """
import http.client, json, ssl, sys
host, run = sys.argv[1], sys.argv[2]
ctx = ssl.create_default_context(cafile=f"/run/panopticon/{run}/ca-bundle.pem")
c = http.client.HTTPSConnection(host, 443, timeout=5, context=ctx)
for line in sys.stdin:
    try:
        c.request("GET", line.strip())
        r = c.getresponse()
        r.read()
        out = {"status": r.status}
    except Exception as e:
        out = {"error": type(e).__name__}
    print(json.dumps(out), flush=True)
"""


def _jailed_request(daemon, url: str) -> dict:
    code = ("import json, sys, urllib.request, urllib.error\n"
            "try:\n"
            "    r = urllib.request.urlopen(sys.argv[1], timeout=5)\n"
            "    print(json.dumps({'status': r.status}))\n"
            "except urllib.error.HTTPError as e:\n"
            "    print(json.dumps({'status': e.code, 'body': e.read().decode()[:300]}))\n"
            "except OSError as e:\n"
            "    print(json.dumps({'error': str(e)}))\n")
    env = ["env", f"SSL_CERT_FILE=/run/panopticon/{daemon.name}/ca-bundle.pem"]
    r = subprocess.run(daemon.jailed([*env, VENV_PYTHON, "-c", code, url]), capture_output=True,
                       text=True, timeout=30)
    return json.loads(r.stdout)


def _refused(r: dict) -> bool:
    """Denied: by the jail's DNS (the name does not resolve) or by the proxy (403)."""
    return r.get("status") == 403 or "Name or service not known" in r.get("error", "")


def test_reload_with_a_bad_config_keeps_the_old_policy(lab, daemon, canary):
    api = "api.allowed.example"
    before = _jailed_request(daemon, f"https://{api}/reload/{canary}/before")
    assert _refused(before), before
    # The new allow entry is fine; the typo beside it makes the whole file invalid.
    daemon.write_config([*jail.ALLOWED, api], extra="allwo = []\n")
    r = daemon.reload()
    assert r.returncode == 3, r.stderr
    assert "allwo" in r.stderr and "old policy stays" in r.stderr
    code, doc = daemon.health()
    assert code == 200, doc  # the jail itself is fine
    assert doc["reload"]["ok"] is False and "allwo" in doc["reload"]["error"]
    e = daemon.wait_event("reload", result="refused")
    assert "allwo" in e["error"]
    mark = lab.mark()
    after = _jailed_request(daemon, f"https://{api}/reload/{canary}/bad")
    assert _refused(after), after
    assert not lab.events(since=mark, path=f"/reload/{canary}/bad")
    # Positive control: what was allowed still is.
    ok = _jailed_request(daemon, f"https://{V4_ONLY[0]}/reload/{canary}/still")
    assert ok["status"] == 200, ok


def test_reload_with_a_good_config_applies_it_and_closes_revoked_connections(lab, daemon, canary):
    api = "api.allowed.example"
    client = subprocess.Popen(
        daemon.jailed([VENV_PYTHON, "-c", KEEPALIVE, V4_ONLY[0], daemon.name]),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def ask(path: str) -> dict:
        client.stdin.write(path + "\n")
        client.stdin.flush()
        return json.loads(client.stdout.readline())

    try:
        mark = lab.mark()
        # Positive control: one connection carries two requests while www4 is allowed.
        assert ask(f"/ll/{canary}/1") == {"status": 200}
        assert ask(f"/ll/{canary}/2") == {"status": 200}
        ports = {e["client_port"] for e in lab.events(since=mark)
                 if str(e.get("path", "")).startswith(f"/ll/{canary}/")}
        assert len(ports) == 1
        # www4 goes, api comes.
        daemon.write_config([a for a in jail.ALLOWED if a != V4_ONLY[0]] + [api])
        r = daemon.reload()
        assert r.returncode == 0, r.stderr + "\n".join(daemon.journal)
        e = daemon.wait_event("reload", result="applied")
        assert e["narrowed"] == "true" and int(e["closed_connections"]) >= 1, e
        # The long-lived connection to the revoked host was closed under the client.
        third = ask(f"/ll/{canary}/3")
        assert "error" in third, third
        assert not lab.events(since=mark, path=f"/ll/{canary}/3")
    finally:
        client.kill()
        client.wait()
    mark = lab.mark()
    assert _jailed_request(daemon, f"https://{api}/reload/{canary}/good")["status"] == 200
    assert lab.events(since=mark, path=f"/reload/{canary}/good")
    denied = _jailed_request(daemon, f"https://{V4_ONLY[0]}/reload/{canary}/revoked")
    assert _refused(denied), denied
    assert not lab.events(since=mark, path=f"/reload/{canary}/revoked")
    code, doc = daemon.health()
    assert code == 200 and doc["reload"]["ok"] is True, doc


def test_sigterm_leaves_nothing(lab, daemon):
    assert jail.leftovers(lab, daemon.name)  # the positive control: it is all there now
    assert daemon.stop() == 0, "\n".join(daemon.journal)
    assert jail.leftovers(lab, daemon.name) == []
    assert daemon.events("jail-down")
    assert any("STOPPING=1" in n for _, n in daemon.notes)


# -- drift, agent exit, bad config --------------------------------------------------------

def test_a_rule_deleted_by_hand_closes_the_jail(lab, work):
    d = Daemon(lab, work, "pntdrift", 9186, ["sleep", "600"], check_interval=1)
    try:
        d.start()
        d.wait_ready()
        doc = d.wait_health(lambda c, doc: c == 200 and "match the plan" in
                            doc["checks"]["rules"]["detail"], 60, "verified")
        agent = doc["agent"]["pid"]
        # Positive control: a jailed request gets through before the drift.
        assert _jailed_request(d, f"https://{V4_ONLY[0]}/drift/before")["status"] == 200
        subprocess.run(["nsenter", f"--net=/run/netns/panopticon-{d.name}", "iptables-legacy",
                        "-t", "filter", "-D", "OUTPUT", "1"], check=True, timeout=30)
        doc = d.wait_health(lambda c, doc: c == 503 and doc["status"] == "closed", 60, "closed")
        assert "rules" in doc["not_ready"] and "differ from the plan" in doc["closed"]
        assert d.wait_event("jail-closed")
        assert d.events("rules-drift-detail")
        assert not Path(f"/proc/{agent}").exists() or gone_or_zombie(agent)
        assert d.proc.poll() is None  # still there, saying why, until it is stopped
        mark = lab.mark()
        r = _jailed_request(d, f"https://{V4_ONLY[0]}/drift/after")
        assert "error" in r, r
        assert not lab.events(since=mark, path="/drift/after")
        assert d.stop() == 2  # a closed jail ends as a failure
        assert jail.leftovers(lab, d.name) == []
    finally:
        d.close()


def test_the_service_ends_with_the_agents_status(lab, work):
    d = Daemon(lab, work, "pntdexit", 9187, ["sh", "-c", "sleep 1; exit 7"])
    try:
        d.start()
        d.wait_ready()
        assert d.proc.wait(60) == 7
        assert d.wait_event("agent-exit")["status"] == "7"
        assert jail.leftovers(lab, d.name) == []
    finally:
        d.close()


def test_a_bad_config_touches_nothing(lab, work):
    d = Daemon(lab, work, "pntdbad", 9188, ["true"])
    d.write_config(jail.ALLOWED, extra='helth = "127.0.0.1:1"\n')
    try:
        d.start()
        assert d.proc.wait(60) == 3
        e = d.wait_event("error")
        assert "helth" in e["error"] and f"{d.config}:" in e["error"]
        assert jail.leftovers(lab, d.name) == []
        assert not any("READY=1" in n for _, n in d.notes)
    finally:
        d.close()
