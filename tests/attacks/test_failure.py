"""Catalogue items 39-42 and 45 (with a full log disk): failures injected into a live jail.

One `panopticond` (tests/integration/test_daemon.py's `Daemon`: the test plays systemd)
runs for the whole module. From the first test to the last, a flood runs inside the jail
as the agent's user: plain HTTP, spoofed HTTPS, direct TCP and UDP toward denied.example,
every payload carrying the run's canary, while a control loop asks an allowed host with
the control canary. Each test injects one failure (mitmdump killed or stopped, the policy
file garbled, an operator addon raising, the log's disk full, a thousand connections, a
reload storm), checks that the jail recovers or stays closed, and the module's last test
asks the oracle: the canary never reached the simulated internet or the simulated host,
in the servers' logs or in either packet capture.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import time
from pathlib import Path

import pytest

import jailrun as jail
from test_daemon import Daemon, gone_or_zombie

from panopticond.plan import DNS_PORT, TRANSPARENT_PORT

pytestmark = pytest.mark.root

NAME, PORT = "pntatkfail", 9191
V4_NAME, V4_IP = jail.V4_ONLY
DENIED4 = "198.51.100.20"
API = "api.allowed.example"
LOG_DIR = Path(f"/var/log/panopticon/{NAME}")

RAISER = '''
"""An operator addon that raises on crafted input (a header), as a buggy one would."""
def requestheaders(flow):
    if "x-crash" in flow.request.headers:
        raise RuntimeError("crafted input")
'''

FLOOD = r"""
import json, os, socket, ssl, sys, time, urllib.request, urllib.error
canary, control, stop, out = sys.argv[1:5]
ctx = ssl.create_default_context()
def tcp(host, port, payload, tls=None):
    try:
        s = socket.create_connection((host, port), timeout=1)
        if tls:
            s = ctx.wrap_socket(s, server_hostname=tls)
        s.sendall(payload.encode()); s.settimeout(1); s.recv(100); s.close()
    except Exception:
        pass
n = 0
results = []
while not os.path.exists(stop):
    n += 1
    tag = f"{canary}f{n:05d}"
    tcp("198.51.100.20", 80, f"GET /{tag} HTTP/1.1\r\nHost: denied.example\r\n\r\n")
    tcp("198.51.100.20", 443, f"GET /{tag} HTTP/1.1\r\nHost: www4.allowed.example\r\n\r\n",
        tls="www4.allowed.example")
    tcp("198.51.100.20", 8080, tag)
    try:
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.sendto(tag.encode(), ("198.51.100.20", 9999)); u.close()
    except OSError:
        pass
    try:
        r = urllib.request.urlopen(f"http://www4.allowed.example/{control}f{n:05d}", timeout=2)
        results.append([n, r.status])
    except urllib.error.HTTPError as e:
        results.append([n, e.code])
    except Exception:
        results.append([n, 0])
    time.sleep(0.05)
json.dump(results, open(out, "w"))
"""

CONNECTIONS = r"""
import json, resource, selectors, socket, sys, time
tag, count = sys.argv[1], int(sys.argv[2])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, count + 100), hard))
sel = selectors.DefaultSelector()
socks, opened, errors = [], 0, {}
for i in range(count):
    s = socket.socket(); s.setblocking(False)
    try:
        s.connect(("198.51.100.20", 80))
    except BlockingIOError:
        pass
    except OSError as e:
        errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1; s.close(); continue
    socks.append(s); sel.register(s, selectors.EVENT_WRITE, i)
deadline, statuses = time.monotonic() + 20, {}
pending = len(socks)
while pending and time.monotonic() < deadline:
    for key, ev in sel.select(1):
        s, i = key.fileobj, key.data
        if ev & selectors.EVENT_WRITE:
            try:
                s.send(f"GET /{tag}c{i:04d} HTTP/1.1\r\nHost: denied.example\r\n\r\n".encode())
                opened += 1
                sel.modify(s, selectors.EVENT_READ, i)
            except OSError as e:
                errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
                sel.unregister(s); s.close(); pending -= 1
        else:
            try:
                data = s.recv(100)
                code = data.split(b" ")[1].decode() if data.startswith(b"HTTP/") else "closed"
            except OSError as e:
                code = type(e).__name__
            statuses[code] = statuses.get(code, 0) + 1
            sel.unregister(s); s.close(); pending -= 1
print(json.dumps({"opened": opened, "statuses": statuses, "errors": errors, "left": pending}))
"""

SQUAT = r"""
import json, socket, sys, time
out, deadline = {}, time.monotonic() + float(sys.argv[1])
held = []
# The control: a port of the agent's own range binds (the script and the jail work).
control = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
control.bind(("127.0.0.1", 0))
print(json.dumps({"control": control.getsockname()[1]}), flush=True)
while time.monotonic() < deadline and len(out) < 3:
    for host, port, kind in (("127.0.0.1", @T@, 1), ("::1", @T@, 1), ("127.0.0.1", @D@, 2)):
        key = f"{host}:{port}/{kind}"
        if key in out:
            continue
        s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, kind)
        try:
            s.bind((host, port))
            if kind == 1:
                s.listen(8)
            out[key] = "bound"; held.append(s)
        except OSError:
            s.close()
    time.sleep(0.01)
print(json.dumps(out), flush=True)
time.sleep(float(sys.argv[2]))
"""


@pytest.fixture(scope="module")
def fail(attack_lab):
    lab = attack_lab
    work = jail.Workdir()
    work.write("raiser.py", RAISER)
    squat = SQUAT.replace("@T@", str(TRANSPARENT_PORT)).replace("@D@", str(DNS_PORT))
    for name, text in (("flood.py", FLOOD), ("connections.py", CONNECTIONS), ("squat.py", squat)):
        work.write(name, text)
    out = work.path / "out"
    out.mkdir()
    os.chmod(out, 0o777)
    canary, control = "pnt" + secrets.token_hex(4), "ctl" + secrets.token_hex(4)
    mounted = False
    d = Daemon(lab, work, NAME, PORT, ["sleep", "900"], allow=[V4_NAME, jail.V6_ONLY[0]])
    d.extra = f'addons = ["{work.path / "raiser.py"}"]\n'
    d.write_config([V4_NAME, jail.V6_ONLY[0]], extra=d.extra)
    net, host = lab.capture("net"), lab.capture("host")
    flood = None
    try:
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size=2m,mode=0750,uid={_proxy_ids()[0]},"
                        f"gid={_proxy_ids()[1]}", "pnt-attack-log", str(LOG_DIR)], check=True)
        mounted = True
        net.start()
        host.start()
        mark = lab.mark()
        d.start()
        d.wait_ready()
        flood = subprocess.Popen(d.jailed([jail.VENV_PYTHON, str(work.path / "flood.py"), canary,
                                           control, str(out / "stop"), str(out / "flood.json")]),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(1.0)
        yield {"d": d, "lab": lab, "work": work, "canary": canary, "control": control,
               "mark": mark, "net": net, "host": host, "flood": flood, "out": out}
    finally:
        if flood is not None:
            (out / "stop").touch()
            with contextlib.suppress(subprocess.TimeoutExpired):
                flood.wait(15)
            if flood.poll() is None:
                flood.kill()
        net.stop()
        host.stop()
        d.close()
        if mounted:
            subprocess.run(["umount", str(LOG_DIR)], check=False)
        with contextlib.suppress(OSError):
            LOG_DIR.rmdir()
        work.close()


def _proxy_ids() -> tuple[int, int]:
    import pwd

    pw = pwd.getpwnam("panopticon-proxy")
    return pw.pw_uid, pw.pw_gid


def jailed_get(d: Daemon, url: str, *headers: str) -> dict:
    args = [x for h in headers for x in ("-H", h)]
    p = subprocess.run(d.jailed(["curl", "-sS", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}",
                                 "--cacert", f"/run/panopticon/{NAME}/ca-bundle.pem", *args, url]),
                       capture_output=True, text=True, timeout=30)
    return {"rc": p.returncode, "status": int(p.stdout or 0), "stderr": p.stderr[-200:]}


def healthy(d: Daemon, timeout: float = 90) -> dict:
    return d.wait_health(lambda c, doc: c == 200, timeout, "200")


def allowed_works(fail, label: str) -> None:
    lab, d = fail["lab"], fail["d"]
    mark = lab.mark()
    path = f"/{fail['control']}{label}"
    lab.wait_for(lambda: jailed_get(d, f"https://{V4_NAME}{path}")["status"] == 200, 30,
                 message=f"the allowed host never answered again after {label}")
    assert lab.events(since=mark, path=path)


@pytest.mark.threat(39, "an operator addon raising on crafted input")
def test_39_an_addon_exception_denies_the_flow(fail):
    d, lab = fail["d"], fail["lab"]
    tag = f"{fail['canary']}x39"
    mark = lab.mark()
    r = jailed_get(d, f"https://{V4_NAME}/{tag}", "X-Crash: 1")
    assert r["status"] != 200, r
    assert not lab.events(since=mark, path=f"/{tag}")
    allowed_works(fail, "c39")  # the same addon, the same host, without the crafted header


@pytest.mark.threat(40, "the policy file garbled, emptied or made unreadable")
@pytest.mark.parametrize("how", ["garbage", "empty", "unreadable", "removed"])
def test_40_a_broken_policy_file_denies_everything(fail, how):
    d, lab = fail["d"], fail["lab"]
    policy = Path(f"/run/panopticon/{NAME}/policy.json")
    good, st = policy.read_bytes(), policy.stat()
    tmp = policy.with_suffix(".pnt")
    try:
        if how == "removed":
            policy.unlink()
        else:
            tmp.write_bytes({"garbage": b"{not json", "empty": b"", "unreadable": good}[how])
            os.chown(tmp, st.st_uid, st.st_gid)
            os.chmod(tmp, 0o000 if how == "unreadable" else st.st_mode & 0o777)
            os.replace(tmp, policy)
        # Within the addon's look-again interval (a second) every new request is refused;
        # until then the policy in memory (which allows this host) still answers.
        lab.wait_for(lambda: jailed_get(d, f"https://{V4_NAME}/{fail['control']}w")["status"]
                     != 200, 15, message=f"a {how} policy file still lets requests through")
        tag = f"{fail['canary']}x40{how}"
        mark = lab.mark()
        time.sleep(1.5)
        for _ in range(3):
            assert jailed_get(d, f"https://{V4_NAME}/{tag}")["status"] != 200
        assert not lab.events(since=mark, path=f"/{tag}"), "LEAK: served with a broken policy"
    finally:
        tmp.write_bytes(good)
        os.chown(tmp, st.st_uid, st.st_gid)
        os.chmod(tmp, st.st_mode & 0o777)
        os.replace(tmp, policy)
    allowed_works(fail, f"c40{how}")  # restored: it works again


@pytest.mark.threat(41, "mitmdump killed under traffic")
def test_41_the_proxy_killed_under_traffic(fail):
    d = fail["d"]
    old = d.proxy_pid()
    os.kill(old, signal.SIGKILL)
    fail["lab"].wait_for(lambda: gone_or_zombie(old), 10)
    d.wait_health(lambda c, doc: c == 503, 30, "503")
    doc = d.wait_health(lambda c, doc: c == 200 and doc["proxy"]["pid"] != old, 90, "recovered")
    assert doc["proxy"]["pid"] != old
    allowed_works(fail, "c41kill")


@pytest.mark.threat(41, "mitmdump stopped (SIGSTOP) under traffic")
def test_41_the_proxy_stopped_under_traffic(fail):
    d = fail["d"]
    old = d.proxy_pid()
    os.kill(old, signal.SIGSTOP)
    try:
        d.wait_health(lambda c, doc: c == 503, 30, "503")
        d.wait_health(lambda c, doc: c == 200 and doc["proxy"]["pid"] not in (None, old), 90,
                      "recovered")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(old, signal.SIGCONT)
    allowed_works(fail, "c41stop")


@pytest.mark.threat(42, "1,000 concurrent connections from the agent")
def test_42_a_thousand_connections_slow_only_the_agent(fail):
    d, lab = fail["d"], fail["lab"]
    tag = f"{fail['canary']}x42"
    proc = subprocess.Popen(d.jailed([jail.VENV_PYTHON, str(fail["work"].path / "connections.py"),
                                      tag, "1000"]), stdout=subprocess.PIPE, text=True)
    codes = []
    while proc.poll() is None:
        codes.append(d.health()[0])
        time.sleep(0.2)
    result = json.loads(proc.stdout.read())
    assert result["opened"] >= 900, result
    assert "200" not in result["statuses"], result
    assert codes and all(c == 200 for c in codes), codes  # health never faltered
    assert not [e for e in lab.events(since=fail["mark"]) if tag in json.dumps(e)]
    allowed_works(fail, "c42")


@pytest.mark.threat(41, "the log's disk full (I4): traffic refused, then back")
def test_the_log_disk_full_closes_and_recovers(fail):
    d, lab = fail["d"], fail["lab"]
    filler = LOG_DIR / "filler"
    tag = f"{fail['canary']}xfull"
    try:
        subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=64k", "count=64"],
                       capture_output=True)  # to ENOSPC: the tmpfs holds 2 MiB
        mark = lab.mark()
        lab.wait_for(lambda: jailed_get(d, f"https://{V4_NAME}/{tag}")["status"] != 200, 20,
                     message="requests still served with the log's disk full")
        assert not lab.events(since=mark, path=f"/{tag}")
    finally:
        filler.unlink(missing_ok=True)
    allowed_works(fail, "cfull")


@pytest.mark.threat(45, "a reload storm, good and bad configs alternating")
def test_45_a_reload_storm_keeps_the_last_good_policy(fail):
    d, lab = fail["d"], fail["lab"]
    tag = f"{fail['canary']}x45"
    good = [V4_NAME, jail.V6_ONLY[0]]
    mark = lab.mark()
    codes = []
    for i in range(6):
        if i % 2:
            d.write_config(good, extra=d.extra)
        else:  # API would be allowed, but the typo beside it makes the file invalid
            d.write_config([*good, API], extra=d.extra + "allwo = []\n")
        r = d.reload()
        codes.append(r.returncode)
        assert jailed_get(d, f"https://{API}/{tag}{i}")["status"] != 200
    assert codes == [3, 0, 3, 0, 3, 0], codes
    assert not [e for e in lab.events(since=mark) if tag in str(e.get("path"))]
    code, doc = d.health()
    assert code == 200 and doc["reload"]["ok"] is True, doc
    allowed_works(fail, "c45")


@pytest.mark.threat(41, "the agent cannot take the proxy's ports while it is down")
def test_41_the_agent_cannot_take_the_proxys_port(fail):
    """The proxy's ports are below 1024 (plan.py), which only the proxy, with
    CAP_NET_BIND_SERVICE, may bind in the jail: killed, its ports stay out of the
    agent's reach, and the restarted proxy gets them back."""
    d = fail["d"]
    old = d.proxy_pid()
    squat = subprocess.Popen(d.jailed([jail.VENV_PYTHON, str(fail["work"].path / "squat.py"),
                                       "5", "4"]), stdout=subprocess.PIPE, text=True)
    try:
        control = json.loads(squat.stdout.readline() or "{}")
        time.sleep(0.3)
        os.kill(old, signal.SIGKILL)
        taken = json.loads(squat.stdout.readline() or "{}")
    finally:
        squat.wait(20)
    assert control.get("control", 0) >= 1024, control  # the agent can bind its own ports
    assert taken == {}, f"the agent bound {sorted(taken)}"
    healthy(d, 120)  # and the restarted proxy has its ports back
    assert d.proxy_pid() != old


@pytest.mark.threat(41, "nothing of the flood reached anything, through every failure")
def test_zz_the_flood_left_no_trace(fail):
    """Last: the oracle over the whole module (servers, catch-all, host, both captures)."""
    lab, canary = fail["lab"], fail["canary"]
    (fail["out"] / "stop").touch()
    fail["flood"].wait(30)
    time.sleep(0.5)
    flood = json.loads((fail["out"] / "flood.json").read_text())
    assert len(flood) > 20, flood
    # Positive control: the control loop got through before, between and after failures.
    assert sum(1 for _, s in flood if s == 200) > 10, flood
    assert [e for e in lab.events(since=fail["mark"]) if fail["control"] in json.dumps(e)]
    fail["net"].stop()
    fail["host"].stop()
    leaked = [e for e in lab.events(since=fail["mark"]) if canary in json.dumps(e)]
    assert not leaked, leaked[:5]
    assert not fail["net"].contains(canary) and not fail["host"].contains(canary)
    assert fail["net"].contains(fail["control"])  # the capture saw the controls
