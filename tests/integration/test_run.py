"""`panopticon run` against the lab: what the agent can and cannot reach, over both families.

One jail runs the probe (`probe_agent.py`) as the agent user and reports every attempt;
each test then judges one attempt twice: by what the agent saw and by what the simulated
internet's servers logged (the oracle). Each block has a sibling that shows the same
path works for what is allowed, or from the simulated host itself, so a broken lab
cannot pass. Then the life cycle: exit status, stdout, teardown on exit, SIGINT and
SIGKILL + cleanup, a bad config, a refused user.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import time
from pathlib import Path

import pytest

import jailrun as jail
from jailrun import V4_ONLY, V6_ONLY, VENV_PYTHON
from panopticond.plan import DNS_PORT, TRANSPARENT_PORT

pytestmark = pytest.mark.root

FAMILIES = ("4", "6")
PROBE = Path(__file__).with_name("probe_agent.py")


@pytest.fixture(scope="module", params=["cold", "helper"])
def work(lab, request):
    """Every test here runs twice: the jail built by `run` itself (the cold path), then
    by the resident helper (helper.py), which must make no difference to any of them."""
    jail.add_lab_names(lab)
    w = jail.Workdir()
    w.write("config.toml", jail.config_text(lab))
    w.write("probe_agent.py", PROBE.read_text())
    w.variant = request.param
    if request.param == "helper":
        jail.HELPER = request.getfixturevalue("resident_helper").socket
    try:
        yield w
    finally:
        jail.HELPER = "off"
        w.close()


@pytest.fixture(scope="module")
def probe(lab, work):
    """One jail, one probe run; returns (results, events since start, canary, process)."""
    canary = "pnt" + secrets.token_hex(6)
    spec = {
        "4": {"host": V4_ONLY[0], "ip": V4_ONLY[1], "denied_ip": lab.names["denied.example"][0],
              "dns": lab.dns_servers[0], "nowhere_dns": "203.0.113.99"},
        "6": {"host": V6_ONLY[0], "ip": V6_ONLY[1], "denied_ip": lab.names["denied.example"][1],
              "dns": lab.dns_servers[1], "nowhere_dns": "2001:db8:99::53"},
    }
    mark = lab.mark()
    log = work.path / "requests.jsonl"
    p = jail.run(lab, work.path / "config.toml",
                 [VENV_PYTHON, str(work.path / "probe_agent.py"), canary, json.dumps(spec)],
                 log=log, timeout=300)
    assert p.returncode == 0, p.stderr
    results = json.loads(p.stdout)
    events = lab.events(since=mark)
    return {"results": results, "events": events, "canary": canary, "spec": spec,
            "proc": p, "log": log.read_text() if log.exists() else ""}


def _reached(events, canary, **match):
    return [e for e in events
            if canary in json.dumps(e) and all(e.get(k) == v for k, v in match.items())]


# -- allowed requests, every client, both families -------------------------------------

@pytest.mark.parametrize("fam", FAMILIES)
@pytest.mark.parametrize("client,scheme", [
    ("curl", "https"), ("curl", "http"), ("urllib", "https"), ("urllib", "http"),
    ("requests", "https"), ("node", "https"),
])
def test_allowed_request_reaches_the_server(probe, fam, client, scheme):
    r = probe["results"][f"{client}_{scheme}_{fam}"]
    assert r["ok"], r
    assert r["status"] == 200, r
    ip = probe["spec"][fam]["ip"]
    path = f"/probe/{client}-{scheme}-{fam}/{probe['canary']}"
    # The server's own echo, seen by the agent through the proxy ...
    assert json.loads(r["body"])["path"] == path
    # ... and the server's log: exactly one request, on that address, over that scheme.
    hits = [e for e in probe["events"] if e.get("path") == path]
    assert len(hits) == 1, hits
    assert hits[0]["server_ip"] == ip and hits[0]["kind"] == scheme
    if scheme == "https":
        assert hits[0]["sni"] == probe["spec"][fam]["host"]


def test_agent_trusts_the_ca_only_through_the_environment(probe):
    env = probe["results"]["identity"]["env"]
    bundle = env["SSL_CERT_FILE"]
    for k in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "GIT_SSL_CAINFO", "PIP_CERT",
              "DENO_CERT", "AWS_CA_BUNDLE", "CARGO_HTTP_CAINFO"):
        assert env[k] == bundle
    assert env["NODE_EXTRA_CA_CERTS"].endswith("/ca.pem")
    # The daemon's own variables do not reach the agent.
    assert not [k for k in env if k.startswith(("SUDO_", "NOTIFY_", "PANOPTICON"))]
    assert env["USER"] == jail.AGENT_USER


# -- denied hosts --------------------------------------------------------------------

@pytest.mark.parametrize("fam", FAMILIES)
@pytest.mark.parametrize("scheme", ["https", "http"])
def test_denied_host_gets_403_and_nothing_reaches_it(probe, fam, scheme):
    r = probe["results"][f"denied_{scheme}_{fam}"]
    assert r["status"] == 403, r
    assert "denied.example" in r["body"] and "allow" in r["body"]
    # Nothing about the host machine in the page.
    assert "/run/panopticon" not in r["body"] and "Traceback" not in r["body"]
    assert not _reached(probe["events"], probe["canary"],
                        server_ip=probe["spec"][fam]["denied_ip"])
    # The positive control is the allowed request of the same client and scheme.
    assert probe["results"][f"curl_{scheme}_{fam}"]["status"] == 200


@pytest.mark.parametrize("fam", FAMILIES)
def test_denied_name_is_not_resolved(probe, fam):
    r = probe["results"][f"denied_lookup_{fam}"]
    assert r["rc"] == 6, r  # curl: could not resolve host


# -- direct connections, IP literals, UDP, ICMP ------------------------------------------

@pytest.mark.parametrize("fam", FAMILIES)
def test_direct_tcp_to_another_port_fails_fast(lab, probe, fam):
    r = probe["results"][f"direct_tcp_{fam}"]
    assert not r["ok"] and "ConnectionRefused" in r["error"], r
    assert r["elapsed"] < 1.0
    assert not [e for e in probe["events"] if e.get("port") == 8080]
    # Positive control: the same port answers the simulated host itself.
    control = "ctl" + secrets.token_hex(4)
    mark = lab.mark()
    ip = probe["spec"][fam]["ip"]
    code = f"import socket; s=socket.create_connection(({ip!r}, 8080), 5); s.sendall(b'{control}')"
    subprocess.run(lab.in_host([VENV_PYTHON, "-c", code]), check=True, timeout=20)
    lab.wait_for(lambda: lab.events("tcp", since=mark, port=8080), timeout=5)


@pytest.mark.parametrize("fam", FAMILIES)
def test_ip_literal_without_sni_is_refused(probe, fam):
    r = probe["results"][f"ip_literal_https_{fam}"]
    assert r["status"] != 200, r
    assert not _reached(probe["events"], probe["canary"], path=f"/probe/iplit/{probe['canary']}")


@pytest.mark.parametrize("fam", FAMILIES)
def test_udp_fails_including_quic(lab, probe, fam):
    r = probe["results"][f"udp_{fam}"]
    assert r["ok"], r
    assert not any("answered" in o for o in r["outcomes"]), r
    assert not [e for e in probe["events"] if e["kind"] == "udp"]
    # Positive control: the simulated host's datagram reaches the same sink.
    mark = lab.mark()
    ip = probe["spec"][fam]["ip"]
    af = "AF_INET6" if fam == "6" else "AF_INET"
    code = (f"import socket; s=socket.socket(socket.{af}, socket.SOCK_DGRAM); "
            f"s.sendto(b'control', ({ip!r}, 9999))")
    subprocess.run(lab.in_host([VENV_PYTHON, "-c", code]), check=True, timeout=20)
    lab.wait_for(lambda: lab.events("udp", since=mark, port=9999), timeout=5)


@pytest.mark.parametrize("fam", FAMILIES)
def test_icmp_sockets_are_refused(probe, fam):
    r = probe["results"][f"icmp_{fam}"]
    assert r["ok"], r
    assert all(o.startswith("PermissionError") for o in r["outcomes"]), r


# -- DNS -----------------------------------------------------------------------------

@pytest.mark.parametrize("fam", FAMILIES)
def test_dns_to_any_resolver_is_answered_by_the_jail(probe, fam):
    res = probe["results"]
    for where in ("lab", "nowhere"):
        ok = res[f"dns_{where}_allowed_{fam}"]
        assert ok["ok"] and ok["rcode"] == 0 and ok["answers"] >= 1, ok
        denied = res[f"dns_{where}_denied_{fam}"]
        assert denied["ok"] and denied["rcode"] == 3, denied  # NXDOMAIN
    # Nothing listens on the "nowhere" addresses: the answer came from the jail. And no
    # query for a denied name went upstream.
    assert not [e for e in probe["events"] if e["kind"] == "dns"
                and probe["canary"] in str(e.get("name", ""))]
    # Positive control: an allowed name was looked up upstream by the proxy.
    assert [e for e in probe["events"] if e["kind"] == "dns"
            and e.get("name", "").rstrip(".") == probe["spec"][fam]["host"]]


@pytest.mark.parametrize("fam", FAMILIES)
def test_dns_other_types_are_not_forwarded(probe, fam):
    r = probe["results"][f"dns_txt_{fam}"]
    assert r["ok"] and r["rcode"] != 0, r
    assert not [e for e in probe["events"] if e["kind"] == "dns" and e.get("type") == "TXT"]


# -- the agent's privileges ------------------------------------------------------------

def test_agent_cannot_change_the_jail(probe):
    res = probe["results"]
    for k in ("iptables_flush", "ip6tables_flush", "route_replace"):
        assert res[k]["ok"] and res[k]["rc"] != 0, res[k]
    assert not res["sysctl_write"]["ok"], res["sysctl_write"]


def test_agent_has_no_capabilities_and_no_new_privs(probe):
    st = probe["results"]["identity"]["status"]
    for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(st[k], 16) == 0, (k, st[k])
    assert st["NoNewPrivs"] == "1"
    uid = int(st["Uid"].split()[0])
    assert uid == int(subprocess.run(["id", "-u", jail.AGENT_USER], capture_output=True,
                                     text=True).stdout)


def test_every_request_and_query_is_logged(probe):
    lines = [json.loads(ln) for ln in probe["log"].splitlines() if ln.strip()]
    assert lines, "no request log"
    fields = {"time", "instance", "client", "method", "scheme", "host", "port", "path",
              "status", "bytes_in", "bytes_out", "duration_ms", "decision", "reason"}
    http = [r for r in lines if r.get("scheme") in ("http", "https")]
    assert http and all(fields <= set(r) for r in http), http[:2]
    denied = [r for r in http if r["host"] == "denied.example"]
    assert denied and all(r["decision"] == "deny" for r in denied)
    allowed = [r for r in http if r["host"] == V4_ONLY[0]]
    assert allowed and all(r["decision"] == "allow" for r in allowed)
    assert [r for r in lines if r.get("qname") or r.get("kind") == "dns"]
    summary = [ln for ln in probe["proc"].stderr.splitlines() if ln.startswith("panopticon: ")]
    assert any("allowed" in ln and "blocked" in ln for ln in summary), summary
    assert any(ln.startswith("panopticon: to allow:") and "--allow denied.example" in ln
               for ln in summary), summary


# -- life cycle ------------------------------------------------------------------------

def test_exit_status_and_stdout_are_the_commands(lab, work):
    p = jail.run(lab, work.path / "config.toml", ["sh", "-c", "echo out; echo err >&2; exit 7"])
    assert p.returncode == 7, p.stderr
    assert p.stdout == "out\n"  # panopticon writes nothing to stdout
    assert "err" in p.stderr


def test_nothing_left_after_a_normal_exit(lab, work):
    p = subprocess.Popen(jail.run_argv(lab, work.path / "config.toml", ["true"]),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    assert jail.leftovers(lab, jail.instance_of(p.pid)) == []


def test_sigint_ends_the_agent_and_leaves_nothing(lab, work):
    p = subprocess.Popen(jail.run_argv(lab, work.path / "config.toml", ["sleep", "60"]),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    name = jail.instance_of(p.pid)
    try:
        jail.wait_ready(name, p)
        assert jail.leftovers(lab, name)  # the positive control: it exists while running
        jail.kill_group(p, signal.SIGINT)  # what Ctrl-C at a terminal does
        _, err = p.communicate(timeout=30)
        assert p.returncode == 130, err
        assert jail.leftovers(lab, name) == []
    finally:
        if p.poll() is None:
            jail.kill_group(p, signal.SIGKILL)
            p.wait()
        subprocess.run(lab.in_host([*jail.PANOPTICON_ARGV, "cleanup", "--force", name]),
                       capture_output=True)


def test_sigkill_then_cleanup_leaves_nothing_and_the_orphan_jail_stays_closed(lab, work):
    if work.variant == "helper":
        pytest.skip("through the helper, the jail ends with its client: test_helper.py")
    p = subprocess.Popen(jail.run_argv(lab, work.path / "config.toml", ["sleep", "60"]),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    name = jail.instance_of(p.pid)
    try:
        jail.wait_ready(name, p)
        os.kill(p.pid, signal.SIGKILL)
        p.wait(10)
        # The agent survives its jailer; its proxy does not (parent-death signal), so
        # what it sends now fails instead of leaking.
        netns = f"panopticon-{name}"
        mark = lab.mark()
        time.sleep(0.3)
        probe = subprocess.run(
            ["nsenter", f"--net=/run/netns/{netns}", "setpriv", "--reuid", "nobody",
             "--regid", "nogroup", "--clear-groups", "curl", "-sS", "-m", "5", "-k",
             "--resolve", f"{V4_ONLY[0]}:443:{V4_ONLY[1]}", f"https://{V4_ONLY[0]}/orphan"],
            capture_output=True, text=True, timeout=20)
        assert probe.returncode != 0
        assert not lab.events(since=mark, path="/orphan")
        assert jail.leftovers(lab, name)
        c = subprocess.run(lab.in_host([*jail.PANOPTICON_ARGV, "cleanup", name]),
                           capture_output=True, text=True, timeout=60)
        assert c.returncode == 0, c.stderr
        assert "removed" in c.stderr
        assert jail.leftovers(lab, name) == []
        # Idempotent: a second cleanup finds nothing and succeeds.
        c2 = subprocess.run(lab.in_host([*jail.PANOPTICON_ARGV, "cleanup", name]),
                            capture_output=True, text=True, timeout=60)
        assert c2.returncode == 0 and c2.stderr == ""
    finally:
        if p.poll() is None:
            p.kill()
        subprocess.run(lab.in_host([*jail.PANOPTICON_ARGV, "cleanup", "--force", name]),
                       capture_output=True)


def test_bad_config_touches_nothing(lab, work):
    bad = work.write("bad.toml", jail.config_text(lab) + "allwo = [\"x.example\"]\n")
    p = subprocess.Popen(jail.run_argv(lab, bad, ["true"]), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 3, err
    assert f"{bad}:" in err and "allwo" in err and "did you mean" in err
    assert out == ""
    assert jail.leftovers(lab, jail.instance_of(p.pid)) == []
    # Positive control: the good config, same command, starts a jail and exits 0.
    ok = jail.run(lab, work.path / "config.toml", ["true"])
    assert ok.returncode == 0, ok.stderr


def test_command_not_found_after_the_jail_is_up_leaves_nothing(lab, work):
    p = subprocess.Popen(jail.run_argv(lab, work.path / "config.toml", ["/nonexistent/agent"]),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 64, err
    assert "command not found" in err
    assert jail.leftovers(lab, jail.instance_of(p.pid)) == []


def test_sigterm_reaches_the_agent_and_leaves_nothing(lab, work):
    p = subprocess.Popen(jail.run_argv(lab, work.path / "config.toml", ["sleep", "60"]),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    name = jail.instance_of(p.pid)
    try:
        jail.wait_ready(name, p)
        os.kill(p.pid, signal.SIGTERM)  # to panopticon alone, as systemd or kill would
        _, err = p.communicate(timeout=30)
        assert p.returncode == 128 + signal.SIGTERM, err  # the agent's own end
        assert jail.leftovers(lab, name) == []
    finally:
        if p.poll() is None:
            jail.kill_group(p, signal.SIGKILL)
            p.wait()


def test_refuses_to_run_the_agent_as_root(lab, work):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUDO_")}
    p = subprocess.run(jail.run_argv(lab, work.path / "config.toml", ["true"], user=None),
                       capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 77, p.stderr
    assert "root" in p.stderr and "--user" in p.stderr
    # Positive control: the same command with a user runs.
    ok = jail.run(lab, work.path / "config.toml", ["true"])
    assert ok.returncode == 0, ok.stderr


def test_the_proxy_listens_on_loopback_only(lab, work):
    p = jail.run(lab, work.path / "config.toml", ["sh", "-c", "cat /proc/net/tcp /proc/net/tcp6 /proc/net/udp /proc/net/udp6"])
    assert p.returncode == 0, p.stderr
    listeners = []
    for line in p.stdout.splitlines():
        parts = line.split()
        if len(parts) > 3 and ":" in parts[1] and parts[1] != "local_address":
            addr, port = parts[1].rsplit(":", 1)
            if int(port, 16) in (TRANSPARENT_PORT, DNS_PORT):
                listeners.append(addr)
    loop4, loop6 = "0100007F", "00000000000000000000000001000000"
    # Both families, TCP and UDP: four listeners at least, all on loopback.
    assert loop4 in listeners and loop6 in listeners, listeners
    assert all(a in (loop4, loop6) for a in listeners), listeners

