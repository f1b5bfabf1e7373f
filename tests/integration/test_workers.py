"""`proxy_workers = 2` against the lab: two proxies behind one REDIRECT, one policy.

One jail (`workers_agent.py` as the agent, every request a new connection) serves every
check: the connections are spread over both workers (each record in the one request log
names its worker), a name resolved through the jail's DNS (whose answers only worker 0
sees) is served on either worker at the address the DNS gave, an allowed name the agent
dials at an address of its own choosing goes to the name's own address on either worker
(threats 18/19), a denied host is denied by both, both present the one CA the agent
trusts, and neither worker's port is reachable except through the REDIRECT. The
simulated internet's own logs confirm what arrived and what did not. The log is rotated
small on purpose: two writers, one log, no line split and no record lost. Last, a daemon
whose worker 1 is killed restarts that worker alone.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
from pathlib import Path

import pytest

import jailrun as jail
from jailrun import V4_ONLY, V6_ONLY, VENV_PYTHON
from panopticond import logread
from panopticond.plan import transparent_ports

pytestmark = pytest.mark.root

AGENT = Path(__file__).with_name("workers_agent.py")
FRESH = ("pntw-fresh.allowed.example", "198.51.100.77")  # never asked of the jail's DNS
WWW = "www.allowed.example"
N = 12  # requests per check: each worker gets about half


@pytest.fixture(scope="module")
def run(lab):
    jail.add_lab_names(lab)
    if FRESH[0] not in lab.names:
        lab.add_name(FRESH[0], v4=FRESH[1], v6=None)
    w = jail.Workdir()
    canary = "pnt" + secrets.token_hex(6)
    try:
        cfg = w.write("config.toml", jail.config_text(
            lab, [*jail.ALLOWED, FRESH[0]],
            extra="proxy_workers = 2\nlog_max_bytes = 4096\nlog_keep = 1000\n"))
        w.write("workers_agent.py", AGENT.read_text())
        denied_ip = lab.names["denied.example"][0]
        spec = {"n": N, "host": WWW, "v4_host": V4_ONLY[0], "v6_host": V6_ONLY[0],
                "fresh": FRESH[0], "denied_ip": denied_ip, "worker_ports": list(transparent_ports(2))}
        # In a directory of its own, which the jail gives the proxy user: rotating renames.
        log = w.path / "logs" / "requests.jsonl"
        mark = lab.mark()
        p = jail.run(lab, cfg, [VENV_PYTHON, str(w.path / "workers_agent.py"), canary,
                                json.dumps(spec)], "-v", log=log, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        stats = logread.Stats()
        records = list(logread.read_log(str(log), stats))
        yield {"r": json.loads(p.stdout), "events": lab.events(since=mark), "canary": canary,
               "records": records, "stats": stats, "files": logread.rotation_set(str(log)),
               "denied_ip": denied_ip, "stderr": p.stderr}
    finally:
        w.close()


def http_records(run, check):
    return [r for r in run["records"] if r.get("kind") == "http"
            and (r.get("path") or "").startswith(f"/{check}/")]


def arrived(run, check, **match):
    needle = f"/{check}/"
    return [e for e in run["events"] if needle in (e.get("path") or "")
            and run["canary"] in (e.get("path") or "")
            and all(e.get(k) == v for k, v in match.items())]


@pytest.mark.parametrize("fam,host", [("4", V4_ONLY), ("6", V6_ONLY), ("any", (WWW, None))])
def test_resolved_names_are_served_on_both_workers_at_the_dns_address(lab, run, fam, host):
    got = run["r"][f"resolved_{fam}"]
    assert [g["status"] for g in got] == [200] * N, got  # verified against the one CA
    recs = [r for r in http_records(run, "resolved") if r["host"] == host[0]]
    assert len(recs) == N
    assert {r["worker"] for r in recs} == {0, 1}
    # Worker 1 saw no DNS answer: it kept the agent's address because worker 0 had it
    # pinned, never resolving or moving anything.
    assert not [r for r in recs if "agent_address" in r], recs
    events = [e for e in arrived(run, "resolved", kind="https") if e.get("sni") == host[0]]
    assert len(events) == N
    if host[1]:
        assert {e["server_ip"] for e in events} == {host[1]}


def test_the_connections_are_spread_evenly(run):
    recs = [r for r in run["records"] if r.get("kind") == "http"]
    by_worker = [sum(1 for r in recs if r["worker"] == w) for w in (0, 1)]
    # nth alternates new connections; the other clients of the jail (none) cannot skew it.
    assert abs(by_worker[0] - by_worker[1]) <= 2, by_worker
    # DNS is worker 0's alone.
    assert {r["worker"] for r in run["records"] if r.get("kind") == "dns"} == {0}


@pytest.mark.parametrize("check,name,own", [
    ("unresolved", FRESH[0], FRESH[1]),  # the jail's DNS never gave any address
    ("spoofed", WWW, None),  # it gave one, the agent chose another
])
def test_an_agent_chosen_address_is_never_dialled_on_any_worker(lab, run, check, name, own):
    outcome = run["r"]["unresolved_at_agents_address" if check == "unresolved"
                       else "resolved_at_agents_address"]
    assert [g["status"] for g in outcome] == [200] * N, outcome
    recs = http_records(run, check)
    assert len(recs) == N and {r["worker"] for r in recs} == {0, 1}
    own = own or lab.names[WWW][0]
    for r in recs:
        assert r["agent_address"] == run["denied_ip"] and r["address"] == own, r
    events = arrived(run, check, kind="https")
    assert len(events) == N and {e["server_ip"] for e in events} == {own}
    assert not arrived(run, check, server_ip=run["denied_ip"])


def test_a_denied_host_is_denied_by_every_worker(run):
    assert [g["status"] for g in run["r"]["denied"]] == [403] * N
    recs = http_records(run, "denied")
    assert len(recs) == N and {r["worker"] for r in recs} == {0, 1}
    assert {r["decision"] for r in recs} == {"deny"}
    # Nothing reached the denied server; the same server answered the allowed requests
    # above, so a dead lab cannot pass this.
    assert not [e for e in run["events"] if e.get("server_ip") == run["denied_ip"]]
    assert arrived(run, "resolved")


def test_worker_ports_are_reachable_only_through_the_redirect(run):
    assert run["r"]["direct_to_worker_ports"] == [
        {"connected": False, "error": "ConnectionRefusedError"}] * 2


def test_one_log_rotated_under_two_writers_loses_and_splits_nothing(run):
    assert run["stats"].bad_lines == 0
    assert len(run["files"]) > 3  # rotated many times while both wrote
    https = [r for r in run["records"] if r.get("kind") == "http"]
    assert len(https) == 6 * N  # every request, each once
    assert len({(r["host"], r["path"]) for r in https}) == 6 * N



# -- the daemon supervises every worker -------------------------------------------------

def _pids_of(name: str, worker: int) -> list[int]:
    marker = f"/run/panopticon/{name}/proxy{f'-{worker}' if worker else ''}.json".encode()
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if marker in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"):
                    found.append(int(pid))
            except OSError:
                pass
    return found


HOLDER = """
import http.client, json, socket, ssl, sys
host, ctx = sys.argv[1], ssl.create_default_context(cafile=sys.argv[2])
# Connected back to back, so that the agent's other traffic cannot come between them in
# the REDIRECT's turn: they go to the workers alternately.
socks = [socket.create_connection((host, 443), timeout=10) for _ in range(4)]
conns = []
for i, s in enumerate(socks):
    c = http.client.HTTPSConnection(host, timeout=10)
    c.sock = ctx.wrap_socket(s, server_hostname=host)
    c.request("GET", f"/hold/{sys.argv[3]}/{i}")
    c.getresponse().read()
    conns.append(c)
print("open", flush=True)
sys.stdin.readline()
out = []
for c in conns:
    try:
        c.request("GET", "/again")
        c.getresponse().read()
        out.append("served")
    except (OSError, http.client.HTTPException):
        out.append("cut")
print(json.dumps(out), flush=True)
"""


def test_the_daemon_restarts_a_dead_worker_and_the_jail_serves_on_both_again(lab):
    from test_daemon import TRAFFIC, Daemon, gone_or_zombie

    jail.add_lab_names(lab)
    w = jail.Workdir()
    w.write("traffic_agent.py", TRAFFIC.read_text())
    canary = "pnt" + secrets.token_hex(5)
    spec = {"https": [V4_ONLY[0], V6_ONLY[0]], "http_ip": [[V4_ONLY[1], V4_ONLY[0]]]}
    d = Daemon(lab, w, "pntwork", 9189,
               [VENV_PYTHON, str(w.path / "traffic_agent.py"), canary, json.dumps(spec)])
    d.write_config(jail.ALLOWED, "proxy_workers = 2\n")
    try:
        d.start()
        d.wait_ready()
        (old,) = _pids_of(d.name, 1)
        assert len(_pids_of(d.name, 0)) == 1
        lab.wait_for(lambda: len([t for t in d.traffic() if t["ok"]]) >= 6, 30)
        os.kill(old, signal.SIGKILL)
        lab.wait_for(lambda: gone_or_zombie(old), 10)
        doc = d.wait_health(lambda c, h: c == 503 and "proxy" in h["not_ready"], 30, "503")
        assert "worker 1" in doc["checks"]["proxy"]["detail"], doc
        d.wait_health(lambda c, h: c == 200, 90, "recovered")
        (new,) = _pids_of(d.name, 1)
        assert new != old
        d.wait_event("proxy-restarted", pid=str(new))
        assert d.events("proxy-down")[0]["reason"].startswith("worker 1 ")
        # The agent's requests succeed again once the worker is back.
        n = len(d.traffic())
        lab.wait_for(lambda: len([t for t in d.traffic()[n:] if t["ok"]]) >= 6, 30)
        # A narrowing reload closes the agent's open connections on every worker: four
        # kept-alive connections, on both workers, are each cut.
        bundle = f"/run/panopticon/{d.name}/ca-bundle.pem"
        holder = subprocess.Popen(d.jailed([VENV_PYTHON, "-c", HOLDER, V6_ONLY[0], bundle,
                                            canary]),
                                  stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline().strip() == "open"
            d.write_config([V4_ONLY[0]], "proxy_workers = 2\n")
            assert d.reload().returncode == 0
            ev = d.wait_event("reload", result="applied")
            assert ev["narrowed"] == "true" and not d.events("reload-connections"), d.journal
            holder.stdin.write("go\n")
            holder.stdin.flush()
            after = json.loads(holder.stdout.readline())
        finally:
            holder.kill()
            holder.wait()
        assert after == ["cut"] * 4, after
        assert int(ev["closed_connections"]) >= 4
        held = [json.loads(ln) for ln in Path(f"/var/log/panopticon/{d.name}/requests.jsonl")
                .read_text().splitlines() if f"/hold/{canary}/" in ln]
        assert len(held) == 4 and {r["worker"] for r in held} == {0, 1}, held
        assert d.stop() == 0
        assert not _pids_of(d.name, 0) and not _pids_of(d.name, 1)
    finally:
        d.close()
        w.close()
