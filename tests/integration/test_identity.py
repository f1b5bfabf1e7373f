"""Identity and destination binding, addresses never reached, DNS tricks, raw TCP rules.

One jail runs `identity_probe.py` as the agent: every attack of threats 9 and 14-27 that
tries to make the proxy dial somewhere other than the name it judged, each beside a
request that must still work. The tests judge each attempt by what the agent saw, by the
simulated internet's own logs (what reached which address), and by the request log.

The lab gains names for it: allowed names that resolve to the metadata service, a
private LAN address, loopback and the simulated host itself (DNS rebinding), one in a
private network the operator allowed (`allow_cidrs`), a passthrough host, a host with a
TCP rule on port 22 and a DNS-over-HTTPS server under a wildcard. A listener on the
simulated host's own address stands in for the host's services.
"""

from __future__ import annotations

import json
import secrets
import subprocess
from pathlib import Path

import pytest

import jailrun as jail
from jailrun import V4_ONLY, V6_ONLY, VENV_PYTHON

pytestmark = pytest.mark.root

PROBE = Path(__file__).with_name("identity_probe.py")
WWW = "www.allowed.example"
CIDR_IP = "198.51.100.11"  # api.allowed.example's address, in allow_cidrs
REBIND = {  # name -> (v4, v6, served by the lab's internet)
    "meta.rebind.example": ("169.254.169.254", None, True),
    "lan.rebind.example": ("10.20.0.5", None, True),
    "loop.rebind.example": ("127.0.0.1", None, False),
    "host.rebind.example": ("203.0.113.2", None, False),  # the simulated host
    "v6meta.rebind.example": (None, "fd00:ec2::254", True),
}
NAMES = {
    "inside.example": "10.99.0.5",  # private, but the operator allowed 10.99.0.0/24
    "a.pinned.example": "198.51.100.50",
    "git.example": "198.51.100.60",
    "dns.wild.example": "198.51.100.70",
    "doh.allowed.example": "198.51.100.71",
}
ALLOW = [WWW, V4_ONLY[0], V6_ONLY[0], "api.allowed.example", "*.rebind.example",
         "inside.example", "*.wild.example", "doh.allowed.example"]
EXTRA = """allow_cidrs = ["10.99.0.0/24", "198.51.100.11"]
passthrough = ["*.pinned.example"]
"""
HOST_LISTENER = r"""
import socket, sys, threading
out = open(sys.argv[1], "a", buffering=1)
def serve(fam, addr):
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, 80)); s.listen(16)
    while True:
        c, peer = s.accept()
        out.write(f"{peer[0]}\n"); c.close()
threading.Thread(target=serve, args=(socket.AF_INET6, "2001:db8:ffff::2"), daemon=True).start()
print("ready", flush=True)
serve(socket.AF_INET, "203.0.113.2")
"""


@pytest.fixture(scope="module")
def probe(lab):
    jail.add_lab_names(lab)
    for name, (v4, v6, serve) in REBIND.items():
        if name not in lab.names:
            lab.add_name(name, v4=v4, v6=v6, serve=serve, anywhere=True)
    for name, v4 in NAMES.items():
        if name not in lab.names:
            lab.add_name(name, v4=v4, v6=None, anywhere=True)
    w = jail.Workdir()
    listener_log = w.path / "host-listener.log"
    listener = lab.host_popen([VENV_PYTHON, "-c", HOST_LISTENER, str(listener_log)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert listener.stdout.readline().strip() == "ready"
        allow = json.dumps(ALLOW)[:-1] + ', { host = "git.example", port = 22 }]'
        w.write("config.toml", jail.config_text(lab, [], "").replace(
            "allow = []", f"allow = {allow}") + EXTRA)
        w.write("identity_probe.py", PROBE.read_text())
        canary = "pnt" + secrets.token_hex(6)
        spec = {
            "denied": {"4": lab.names["denied.example"][0], "6": lab.names["denied.example"][1]},
            "www4": lab.names[WWW][0], "www6": lab.names[WWW][1], "cidr_ip": CIDR_IP,
            "dns": lab.dns_servers[0], "rebind": list(REBIND), "host_addr": "203.0.113.2",
            "lab_ca": str(lab.ca_cert),
        }
        mark = lab.mark()
        log = w.path / "requests.jsonl"
        p = jail.run(lab, w.path / "config.toml",
                     [VENV_PYTHON, str(w.path / "identity_probe.py"), canary, json.dumps(spec)],
                     log=log, timeout=300)
        assert p.returncode == 0, p.stderr
        # Positive control of the host listener: the simulated host itself reaches it.
        lab.host_exec(["curl", "-sS", "-m", "5", "http://203.0.113.2/control"])
        yield {
            "r": json.loads(p.stdout), "events": lab.events(since=mark), "canary": canary,
            "log": [json.loads(ln) for ln in log.read_text().splitlines() if ln.strip()],
            "host_hits": listener_log.read_text().splitlines(), "proc": p,
        }
    finally:
        listener.kill()
        listener.wait()
        w.close()


def hits(probe, check, **match):
    """Lab events that carry the canary and `check`'s path, matching `match`."""
    needle = f"/{check}/{probe['canary']}"
    return [e for e in probe["events"] if needle in (e.get("path") or "")
            and all(e.get(k) == v for k, v in match.items())]


def at(probe, address):
    return [e for e in probe["events"] if e.get("server_ip") == address]


def logged(probe, **match):
    return [r for r in probe["log"] if all(r.get(k) == v for k, v in match.items())]


# -- 18, 19, 24: the name decides the address, never the agent --------------------------

@pytest.mark.parametrize("fam", ["4", "6"])
def test_18_spoofed_host_reaches_the_names_own_address(lab, probe, fam):
    r = probe["r"][f"t18_spoofed_host_{fam}"]
    assert r["status"] == 200, r
    www = lab.names[WWW][0 if fam == "4" else 1]
    assert len(hits(probe, f"t18-{fam}", kind="http", server_ip=www, host=WWW)) == 1
    assert not hits(probe, f"t18-{fam}", server_ip=lab.names["denied.example"][int(fam) // 6])
    rec = [x for x in logged(probe, host=WWW, path=f"/t18-{fam}/{probe['canary']}")]
    assert rec and rec[0]["address"] == www and rec[0]["agent_address"] != www


@pytest.mark.parametrize("fam", ["4", "6"])
def test_19_spoofed_sni_reaches_the_names_own_address(lab, probe, fam):
    r = probe["r"][f"t19_spoofed_sni_{fam}"]
    assert r["status"] == 200, r
    www = lab.names[WWW][0 if fam == "4" else 1]
    assert len(hits(probe, f"t19-{fam}", kind="https", server_ip=www, sni=WWW)) == 1
    # Positive control: the plain request goes to the same place.
    assert probe["r"]["control_www"]["status"] == 200
    assert hits(probe, "control-www", server_ip=lab.names[WWW][0])


def test_24_the_denied_servers_never_see_a_single_packet(lab, probe):
    assert probe["r"]["t24_denied_sni"]["status"] == 403
    # Every spoofing attempt above aimed at these addresses: no connection, no handshake.
    for address in lab.names["denied.example"]:
        assert at(probe, address) == [], at(probe, address)[:3]
    # 14: and a denied name is never looked up on the agent's behalf.
    assert not [e for e in probe["events"] if e["kind"] == "dns"
                and "denied.example" in (e.get("name") or "")]


# -- 20, 22: the name is the same at every layer -----------------------------------------

def test_20_fronting_is_misdirected(probe):
    for check in ("t20_fronting_h1", "t20_fronting_allowed_other_h1"):
        assert probe["r"][check]["status"] == 421, probe["r"][check]
    assert not hits(probe, "t20-h1") and not hits(probe, "t20-h1-api")


def test_22_each_http2_stream_is_judged_on_its_own_authority(probe):
    r = probe["r"]["t22_h2_streams"]
    assert r["ok"] and r["alpn"] == "h2", r
    assert r["statuses"] == {WWW: 200, "denied.example": 421, "api.allowed.example": 421}, r
    assert len(hits(probe, "t22-own", sni=WWW)) == 1
    assert not hits(probe, "t22-denied") and not hits(probe, "t22-coalesced")


# -- 23: IP literals --------------------------------------------------------------------

def test_23_ip_literals_only_where_the_operator_allowed_the_address(lab, probe):
    for check in ("t23_ip_literal_https", "t23_ip_literal_http", "t23_ip_literal_v6"):
        assert probe["r"][check]["status"] == 403, probe["r"][check]
    for tag in ("t23-https", "t23-http", "t23-v6"):
        assert not hits(probe, tag)
    assert probe["r"]["control_ip_allowed_https"]["status"] == 200
    assert probe["r"]["control_ip_allowed_http"]["status"] == 200
    assert hits(probe, "t23-ok-https", server_ip=CIDR_IP, kind="https")
    assert hits(probe, "t23-ok-http", server_ip=CIDR_IP, kind="http")


# -- 9, 17: never the host, the LAN or the metadata service ------------------------------

def test_17_rebinding_answers_are_refused_by_the_jails_dns(probe):
    for name in REBIND:
        r = probe["r"][f"t17_dns_{name.split('.')[0]}"]
        assert r["ok"] and r["rcode"] == 5 and r["answers"] == 0, (name, r)
        rec = logged(probe, kind="dns", qname=name)
        assert rec and all("never connects" in x["reason"] for x in rec), rec


def test_17_rebinding_names_are_not_reached_even_with_the_agents_own_address(lab, probe):
    for name, (v4, v6, _) in REBIND.items():
        label = name.split(".")[0]
        r = probe["r"][f"t17_http_{label}"]
        assert r["status"] == 403, (name, r)
        assert not hits(probe, f"t17-{label}")
        for address in (v4, v6):
            assert not address or at(probe, address) == []
    # The agent's chosen (public) address was not dialled either.
    assert not [e for e in at(probe, lab.names[WWW][0]) if "t17-" in (e.get("path") or "")]


def test_9_the_host_and_the_metadata_service_are_never_reached(probe):
    assert probe["r"]["t9_direct_metadata"]["status"] == 403
    assert probe["r"]["t9_direct_host"]["status"] == 403
    assert at(probe, "169.254.169.254") == []
    # The host listener saw only its own positive control, from the host itself.
    assert probe["host_hits"] == ["203.0.113.2"], probe["host_hits"]


def test_9_an_operator_allowed_private_network_is_reached(lab, probe):
    assert probe["r"]["control_inside"]["status"] == 200, probe["r"]["control_inside"]
    assert hits(probe, "control-inside", server_ip=NAMES["inside.example"], kind="http")


# -- 14-16: DNS ------------------------------------------------------------------------

def test_16_dot_is_refused_at_the_firewall(probe):
    r = probe["r"]["t16_dot"]
    assert not r["ok"] and "ConnectionRefused" in r["error"], r
    assert not [e for e in probe["events"] if e.get("port") == 853]


def test_16_doh_needs_an_exact_rule(probe):
    for check in ("t16_doh_post", "t16_doh_get"):
        r = probe["r"][check]
        assert r["status"] == 403 and "DNS over HTTPS" in r["body"], r
    assert at(probe, NAMES["dns.wild.example"]) == []
    assert probe["r"]["control_doh_exact"]["status"] == 200
    assert hits(probe, "doh-ok", server_ip=NAMES["doh.allowed.example"])


def test_16_https_and_svcb_records_are_never_answered_nor_forwarded(probe):
    for check in ("t16_https_record", "t16_svcb_record"):
        r = probe["r"][check]
        assert r["ok"] and r["rcode"] == 5 and r["answers"] == 0, r
    assert not [e for e in probe["events"] if e["kind"] == "dns"
                and e.get("type") in ("HTTPS", "SVCB", "TYPE64", "TYPE65")]


def test_15_a_flood_of_data_labels_is_logged(probe):
    r = probe["r"]["t15_label_flood"]
    assert r["ok"] and set(r["rcodes"]) == {3}, r  # resolved upstream: no such names
    alerts = [x for x in probe["log"] if "under wild.example" in str(x.get("alert", ""))]
    assert len(alerts) == 1, alerts


def test_15_wildcards_over_public_suffixes_are_refused_at_load(lab, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[defaults]\nallow = [\n  'ok.example',\n  '*.github.io',\n]\n")
    p = subprocess.run([*jail.PANOPTICON_ARGV, "check", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 3, p
    assert f"{cfg}:4: defaults.allow[1]: '*.github.io' covers" in p.stderr
    cfg.write_text("[defaults]\nallow = ['*.pages.github.io']\ndeny = ['*.com']\n")
    p = subprocess.run([*jail.PANOPTICON_ARGV, "check", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr


# -- 27: passthrough --------------------------------------------------------------------

def test_27_passthrough_is_not_decrypted_and_goes_to_the_pinned_address(probe):
    for check, tag in (("t27_passthrough", "t27"), ("t27_passthrough_spoofed", "t27-spoofed")):
        r = probe["r"][check]
        assert r["status"] == 200, r  # with only the lab's CA: the real certificate
        assert len(hits(probe, tag, kind="https", sni="a.pinned.example",
                        server_ip=NAMES["a.pinned.example"])) == 1
    relayed = logged(probe, kind="tcp", relay="passthrough", host="a.pinned.example")
    assert len(relayed) == 2, probe["log"]
    assert all(x["decision"] == "allow" and x["bytes_out"] > 0 and x["bytes_in"] > 0
               and x["sni"] == "a.pinned.example" for x in relayed), relayed
    assert {x["address"] for x in relayed} == {NAMES["a.pinned.example"]}


def test_27_other_hosts_are_still_intercepted(probe):
    r = probe["r"]["t27_others_intercepted"]
    assert r["rc"] == 60, r  # our CA, which only the agent's environment trusts
    assert not hits(probe, "t27-intercepted")


# -- TCP rules: { host = "git.example", port = 22 } -------------------------------------

def _sink(probe, tag):
    return [e for e in probe["events"] if e["kind"] == "tcp"
            and f"{tag} {probe['canary']}" in (e.get("data") or "")]


def test_a_port_rule_relays_to_the_hosts_pinned_address_only(probe):
    assert probe["r"]["port_allowed"]["ok"], probe["r"]["port_allowed"]
    ok = _sink(probe, "port-ok")
    assert len(ok) == 1 and ok[0]["server_ip"] == NAMES["git.example"] and ok[0]["port"] == 22
    relayed = logged(probe, kind="tcp", relay="tcp", host="git.example")
    assert relayed and relayed[0]["bytes_out"] > 0
    # The same port to an address the jail's DNS did not return for git.example.
    for check, tag in (("port_other_address", "port-denied"), ("port_spoofed_pin", "port-www")):
        assert not _sink(probe, tag), check
        assert "panopticon" not in probe["r"][check].get("reply", "")  # a bare 400, closed
    refused = [x for x in probe["log"] if x.get("kind") == "tcp" and x["decision"] == "deny"
               and "port 22" in x.get("reason", "")]
    assert len(refused) == 2, refused
    # A port no rule names is closed at the firewall.
    r = probe["r"]["port_not_ruled"]
    assert not r["ok"] and "ConnectionRefused" in r["error"], r
    assert not _sink(probe, "port-8080")

