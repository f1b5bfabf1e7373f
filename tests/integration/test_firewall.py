"""firewall.py against the real kernel, in throwaway namespaces named pnt-fw-*.

Nothing here touches the host's own namespace: rules are applied inside namespaces the
tests create, and the behavioural test builds its own tiny "internet" (a peer namespace
holding documentation addresses) on a veth pair.

    pnt-fw-…-j (jail rules)                       pnt-fw-…-p (peer)
      lo: fake proxy 127.0.0.1/::1 :T, :D          lo: 198.51.100.10, 2001:db8:ff::10
      ve0 10.250.0.2/24 fd99:1::2/64 ──────────── vp 10.250.0.1/24 fd99:1::1/64
         2001:db8:fe::2/64                            2001:db8:fe::1/64
                                                   TCP servers on :80 and :8080 (all addresses)
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from panopticond import firewall, rules
from panopticond.errors import PanopticonError

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root and network namespaces"),
]

PROXY_UID = 64998
AGENT_UID = 65534
T, D = 15001, 15053
DNS = ["198.51.100.53", "2001:db8:ff::53"]
SAVE = {4: "iptables-legacy-save", 6: "ip6tables-legacy-save"}
LEGACY = {4: "iptables-legacy", 6: "ip6tables-legacy"}


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=check, capture_output=True, text=True, timeout=30)


def in_ns(ns: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return sh("ip", "netns", "exec", ns, *argv, check=check)


def jail(family: int) -> rules.RuleSet:
    return rules.jail_rules(
        family, proxy_uid=PROXY_UID, transparent_port=T, dns_port=D, dns_servers=DNS
    )


def host(family: int, tag: str, veth: str = "pnh-test") -> rules.RuleSet:
    return rules.host_rules(
        family,
        tag=tag,
        veth_host=veth,
        subnet="10.250.0.0/24" if family == 4 else "fd99:1::/64",
        dns_servers=["10.0.0.2", "2001:db8:ff::53"],
    )


@pytest.fixture
def make_ns() -> Iterator:
    """Creates namespaces pnt-fw-<random>-<suffix>; deletes them (and their processes)."""
    created: list[str] = []
    procs: list[subprocess.Popen] = []
    base = f"pnt-fw-{secrets.token_hex(3)}"

    def make(suffix: str) -> str:
        name = f"{base}-{suffix}"
        sh("ip", "netns", "add", name)
        created.append(name)
        in_ns(name, "ip", "link", "set", "lo", "up")
        return name

    make.procs = procs  # type: ignore[attr-defined]
    try:
        yield make
    finally:
        for p in procs:
            p.kill()
            p.wait()
        for name in created:
            sh("ip", "netns", "del", name, check=False)


def test_apply_both_families_then_verify_and_detect_drift(make_ns):
    ns = make_ns("j")
    t0 = time.monotonic()
    firewall.apply([jail(4), jail(6)], ns)
    elapsed = time.monotonic() - t0
    print(f"apply, both families: {elapsed:.3f} s")
    # "Well under 1 s" on an idle machine; generous here because test machines are noisy.
    assert elapsed < 2.5
    assert "iptc" not in sys.modules  # the caller must never load python-iptables

    for family in (4, 6):
        saved = in_ns(ns, SAVE[family]).stdout
        lines = [line for line in saved.splitlines() if line.startswith("-A ")]
        planned = [r.describe().replace("-p icmpv6", "-p ipv6-icmp") for r in jail(family).rules]
        # ip6tables-save writes ::ffff:0.0.0.0/96 where Python writes ::ffff:0:0/96.
        saved = re.sub(r"(-[sd]) (\S+)", lambda m: f"{m[1]} {ipaddress.ip_network(m[2])}", saved)
        # iptables-save groups by table (nat before filter here): compare per table.
        for table in ("filter", "nat"):
            section = saved.split(f"*{table}\n", 1)[1].split("COMMIT", 1)[0]
            got = [line for line in section.splitlines() if line.startswith("-A ")]
            want = [p for p, r in zip(planned, jail(family).rules, strict=True) if r.table == table]
            assert got == want, (family, table)
        assert len(lines) == len(planned)
        for chain in ("INPUT", "FORWARD", "OUTPUT"):
            assert f":{chain} DROP" in saved

    assert firewall.verify([jail(4), jail(6)], ns) == []

    in_ns(ns, LEGACY[4], "-t", "filter", "-D", "OUTPUT", "-o", "lo", "-j", "ACCEPT")
    in_ns(ns, LEGACY[6], "-t", "filter", "-P", "FORWARD", "ACCEPT")
    in_ns(ns, LEGACY[6], "-t", "nat", "-I", "OUTPUT", "-j", "RETURN")
    diffs = firewall.verify([jail(4), jail(6)], ns)
    lo_rule = [r.describe() for r in jail(4).chain_rules("filter", "OUTPUT")].index(
        "-A OUTPUT -o lo -j ACCEPT"
    )
    assert diffs == [
        f"IPv4 filter OUTPUT: missing planned rule {lo_rule + 1}: -A OUTPUT -o lo -j ACCEPT",
        "IPv6 filter FORWARD: policy is ACCEPT, planned DROP",
        "IPv6 nat OUTPUT: unexpected rule 1: -A OUTPUT -j RETURN",
    ]

    # Applying again repairs the drift and is idempotent.
    firewall.apply([jail(4), jail(6)], ns)
    firewall.apply([jail(4), jail(6)], ns)
    assert firewall.verify([jail(4), jail(6)], ns) == []


def test_apply_creates_only_the_tables_it_uses(make_ns):
    ns = make_ns("t")
    firewall.apply([jail(4), jail(6)], ns)
    for proc_file in ("/proc/net/ip_tables_names", "/proc/net/ip6_tables_names"):
        assert sorted(in_ns(ns, "cat", proc_file).stdout.split()) == ["filter", "nat"]


def test_host_rules_coexist_and_remove_exactly(make_ns):
    ns = make_ns("h")
    # The "host's" own rules, which must survive everything we do.
    for family in (4, 6):
        in_ns(ns, LEGACY[family], "-A", "INPUT", "-i", "eth9", "-j", "ACCEPT")
        in_ns(ns, LEGACY[family], "-A", "FORWARD", "-j", "ACCEPT")
        in_ns(
            ns, LEGACY[family], "-t", "nat", "-A", "POSTROUTING", "-o", "eth9", "-j", "MASQUERADE"
        )
    before = {f: in_ns(ns, SAVE[f]).stdout for f in (4, 6)}

    a = [host(4, "0a1b2c3d", "pnh-a"), host(6, "0a1b2c3d", "pnh-a")]
    b = [host(4, "deadbeef", "pnh-b"), host(6, "deadbeef", "pnh-b")]
    firewall.apply(a, ns)
    firewall.apply(b, ns)
    firewall.apply(a, ns)  # again: replaces, never duplicates
    assert firewall.verify(a, ns) == [] and firewall.verify(b, ns) == []

    saved = in_ns(ns, SAVE[4]).stdout
    forward = [line for line in saved.splitlines() if line.startswith("-A FORWARD")]
    # Our jumps sit above the host's broad ACCEPT, the latest applied first.
    assert forward == [
        "-A FORWARD -i pnh-a -j PANO-0A1B2C3D-FWD",
        "-A FORWARD -o pnh-a -j PANO-0A1B2C3D-FWD",
        "-A FORWARD -i pnh-b -j PANO-DEADBEEF-FWD",
        "-A FORWARD -o pnh-b -j PANO-DEADBEEF-FWD",
        "-A FORWARD -j ACCEPT",
    ]

    # Drift in a tagged chain is reported; the host's own rules are not ours to judge.
    in_ns(
        ns,
        LEGACY[6],
        "-D",
        "PANO-0A1B2C3D-FWD",
        "-o",
        "pnh-a",
        "-m",
        "conntrack",
        "--ctstate",
        "RELATED,ESTABLISHED",
        "-j",
        "ACCEPT",
    )
    in_ns(ns, LEGACY[4], "-A", "INPUT", "-j", "DROP")
    diffs = firewall.verify(a, ns)
    assert len(diffs) == 1 and diffs[0].startswith("IPv6 filter PANO-0A1B2C3D-FWD: missing")
    in_ns(ns, LEGACY[4], "-D", "INPUT", "-j", "DROP")

    firewall.remove_host_rules("0a1b2c3d", netns=ns)
    firewall.remove_host_rules("0A1B2C3D", netns=ns)  # idempotent, any case
    assert firewall.verify(b, ns) == []
    firewall.remove_host_rules("deadbeef", netns=ns)
    firewall.remove_host_rules("deadbeef", netns=ns)
    for family in (4, 6):
        after = in_ns(ns, SAVE[family]).stdout
        assert "PANO-" not in after
        strip = lambda s: [x for x in s.splitlines() if not x.startswith("#")]  # noqa: E731
        assert strip(after) == strip(before[family])


def test_remove_where_nothing_exists_touches_nothing(make_ns):
    ns = make_ns("e")
    firewall.remove_host_rules("0a1b2c3d", netns=ns)
    for proc_file in ("/proc/net/ip_tables_names", "/proc/net/ip6_tables_names"):
        names = in_ns(ns, "sh", "-c", f"cat {proc_file} 2>/dev/null || true").stdout
        assert names.split() == []


def test_errors_are_precise():
    with pytest.raises(PanopticonError) as e:
        firewall.apply([jail(4)], "pnt-fw-does-not-exist")
    assert "pnt-fw-does-not-exist does not exist" in str(e.value)
    assert "ip netns exec pnt-fw-does-not-exist iptables-legacy-save" in (e.value.hint or "")
    with pytest.raises(PanopticonError):
        firewall.verify([jail(6)], "/run/netns/pnt-fw-does-not-exist")
    with pytest.raises(ValueError):
        firewall.apply([jail(4), host(4, "0a1b2c3d")], "pnt-fw-does-not-exist")


BUGGY_RULE = """
import iptc
r = iptc.Rule6(); r.out_interface = "lo"; r.target = r.create_target("ACCEPT")
iptc.Chain(iptc.Table6("filter"), "OUTPUT").insert_rule(r)
"""


def test_verify_sees_python_iptables_ipv6_interface_masks(make_ns):
    # python-iptables alone writes `-o lo` with a mask that compares one bit per
    # character; ip6tables-save shows the rule as if it were right. verify() must not.
    ns = make_ns("m")
    firewall.apply([jail(6)], ns)
    in_ns(ns, sys.executable, "-c", BUGGY_RULE)
    assert "-A OUTPUT -o lo -j ACCEPT\n" in in_ns(ns, SAVE[6]).stdout
    diffs = firewall.verify([jail(6)], ns)
    assert diffs == [
        "IPv6 filter OUTPUT: unexpected rule 1: "
        "-A OUTPUT -o lo[mask:01010100000000000000000000000000] -j ACCEPT"
    ]
    # Rules written by apply() carry the exact mask, so ip6tables can delete them by spec.
    firewall.apply([jail(6)], ns)
    in_ns(ns, LEGACY[6], "-D", "OUTPUT", "-o", "lo", "-j", "ACCEPT")


# --------------------------------------------------------------------- behaviour

SERVER = r"""
import socket, sys, threading
socks = []
for family, addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
    for port in map(int, sys.argv[1:]):
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((addr, port)); s.listen(64); socks.append((s, port))
def serve(s, port):
    while True:
        c, _ = s.accept()
        c.sendall(b"server %d\n" % port); c.close()
for s, port in socks:
    threading.Thread(target=serve, args=(s, port), daemon=True).start()
print("ready", flush=True)
sys.stdin.read()
"""

# A stand-in for mitmdump: what the REDIRECT rules deliver to, on loopback only.
FAKE_PROXY = r"""
import socket, sys, threading
T, D = int(sys.argv[1]), int(sys.argv[2])
def tcp(family, addr):
    s = socket.socket(family, socket.SOCK_STREAM); s.bind((addr, T)); s.listen(64)
    while True:
        c, _ = s.accept(); c.sendall(b"proxy\n"); c.close()
def udp(family, addr):
    s = socket.socket(family, socket.SOCK_DGRAM); s.bind((addr, D))
    while True:
        data, peer = s.recvfrom(512); s.sendto(b"dns " + data, peer)
for f, a in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
    for fn in (tcp, udp):
        threading.Thread(target=fn, args=(f, a), daemon=True).start()
import time; time.sleep(0.2)
print("ready", flush=True)
sys.stdin.read()
"""

CLIENT = r"""
import errno, socket, sys, time
proto, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
t = time.monotonic()
try:
    if proto == "tcp":
        with socket.create_connection((host, port), timeout=3) as s:
            data = s.recv(100)
    else:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.settimeout(3); s.connect((host, port)); s.send(b"q"); data = s.recv(100)
    print("OK", data.decode().split()[0], "%.3f" % (time.monotonic() - t))
except OSError as e:
    name = errno.errorcode.get(e.errno, "TIMEOUT" if isinstance(e, TimeoutError) else str(e))
    print("ERR", name, "%.3f" % (time.monotonic() - t))
"""


def start(make_ns, ns: str, script: str, *args: str) -> None:
    p = subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, "-I", "-c", script, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    make_ns.procs.append(p)
    assert p.stdout is not None and p.stdout.readline().strip() == "ready"


def connect(ns: str, uid: int | None, proto: str, host: str, port: int) -> tuple[str, str, float]:
    as_user = (
        [] if uid is None else ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
    )
    out = in_ns(ns, *as_user, sys.executable, "-I", "-c", CLIENT, proto, host, str(port))
    status, what, seconds = out.stdout.split()
    return status, what, float(seconds)


@pytest.fixture
def lab(make_ns):
    j, p = make_ns("j"), make_ns("p")
    # "ve0" equals "lo" in the lowest bit of every character (and of the NUL): with the
    # interface masks python-iptables writes for IPv6, `-o lo` would match it and let
    # the agent out. Named so on purpose, to keep that fixed.
    sh("ip", "link", "add", "ve0", "netns", j, "type", "veth", "peer", "name", "vp", "netns", p)
    for ns, dev, addrs in (
        (j, "ve0", ["10.250.0.2/24", "2001:db8:fe::2/64", "fd99:1::2/64"]),
        (p, "vp", ["10.250.0.1/24", "2001:db8:fe::1/64", "fd99:1::1/64"]),
    ):
        for a in addrs:
            in_ns(ns, "ip", "addr", "add", a, "dev", dev, *(["nodad"] if ":" in a else []))
        in_ns(ns, "ip", "link", "set", dev, "up")
    in_ns(p, "ip", "addr", "add", "198.51.100.10/32", "dev", "lo")
    in_ns(p, "ip", "addr", "add", "2001:db8:ff::10/128", "dev", "lo")
    in_ns(j, "ip", "route", "add", "default", "via", "10.250.0.1")
    in_ns(j, "ip", "-6", "route", "add", "default", "via", "2001:db8:fe::1")
    start(make_ns, p, SERVER, "80", "8080")
    start(make_ns, j, FAKE_PROXY, str(T), str(D))
    return j


INTERNET = {4: "198.51.100.10", 6: "2001:db8:ff::10"}
PRIVATE = {4: "10.250.0.1", 6: "fd99:1::1"}
LOOPBACK = {4: "127.0.0.1", 6: "::1"}


@pytest.mark.parametrize("family", [4, 6])
def test_jail_behaviour(lab, family):
    j, net, private = lab, INTERNET[family], PRIVATE[family]

    # Positive controls of the lab itself: without rules, everything is reachable.
    for target in (net, private):
        for port in (80, 8080):
            status, what, _ = connect(j, AGENT_UID, "tcp", target, port)
            assert (status, what) == ("OK", "server"), (target, port)

    firewall.apply([jail(4), jail(6)], j)

    # The proxy user reaches the internet on 80 (the positive control)...
    assert connect(j, PROXY_UID, "tcp", net, 80)[:2] == ("OK", "server")
    # ...but no other port, nothing private, not its own listeners (it would loop).
    for host_, port in ((net, 8080), (private, 80), (LOOPBACK[family], T)):
        status, what, seconds = connect(j, PROXY_UID, "tcp", host_, port)
        assert (status, what) == ("ERR", "ECONNREFUSED") and seconds < 1, (host_, port)

    # The agent cannot go anywhere directly, and fails fast.
    status, what, seconds = connect(j, AGENT_UID, "tcp", net, 8080)
    assert (status, what) == ("ERR", "ECONNREFUSED") and seconds < 1
    # Its web and DNS traffic lands on the proxy's listeners...
    assert connect(j, AGENT_UID, "tcp", net, 80)[:2] == ("OK", "proxy")
    assert connect(j, AGENT_UID, "tcp", net, 443)[:2] == ("OK", "proxy")
    assert connect(j, AGENT_UID, "udp", DNS[0 if family == 4 else 1], 53)[:2] == ("OK", "dns")
    # ...which it may not address directly. (A local UDP datagram refused in OUTPUT
    # fails in send() with EPERM; TCP gets the reset.)
    for proto, port in (("tcp", T), ("udp", D), ("tcp", D)):
        status, what, seconds = connect(j, AGENT_UID, proto, LOOPBACK[family], port)
        assert status == "ERR" and what in ("ECONNREFUSED", "EPERM") and seconds < 1
    # QUIC is refused at once, so clients fall back to TCP.
    status, what, seconds = connect(j, AGENT_UID, "udp", net, 443)
    assert status == "ERR" and what in ("ECONNREFUSED", "EPERM") and seconds < 1
    # Other UDP does not leave either.
    assert connect(j, AGENT_UID, "udp", net, 8080)[0] == "ERR"


def test_apply_each_puts_every_set_in_its_own_namespace(make_ns):
    """One child per family for the jail's and the host's rules (apply_each): the cached
    table handles of python-iptables must not carry one namespace's rules into the other.
    Run from inside the "host" namespace, as `panopticon run` is (None: the caller's)."""
    j, h = make_ns("ej"), make_ns("eh")
    tag = "e4c5d6e7"
    code = (
        "import sys; from panopticond import firewall, rules\n"
        "jail = [rules.jail_rules(f, proxy_uid=%d, transparent_port=%d, dns_port=%d, "
        "dns_servers=%r) for f in (4, 6)]\n"
        "host = [rules.host_rules(f, tag=%r, veth_host='pnh-e', subnet=s, "
        "dns_servers=['10.0.0.2', '2001:db8:ff::53']) for f, s in ((4, '10.250.0.0/24'), "
        "(6, 'fd99:1::/64'))]\n"
        "firewall.apply_each([(jail, sys.argv[1]), (host, None)])\n"
    ) % (PROXY_UID, T, D, DNS, tag)
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = in_ns(h, "env", f"PYTHONPATH={repo}", sys.executable, "-c", code, j, check=False)
    assert out.returncode == 0, out.stderr
    assert firewall.verify([jail(4), jail(6)], j) == []
    assert firewall.verify([host(4, tag, "pnh-e"), host(6, tag, "pnh-e")], h) == []
    for family in (4, 6):
        in_jail, in_host = in_ns(j, SAVE[family]).stdout, in_ns(h, SAVE[family]).stdout
        assert f"PANO-{tag.upper()}" not in in_jail
        assert ":OUTPUT DROP" in in_jail and ":OUTPUT DROP" not in in_host
        assert "REDIRECT" not in in_host


def test_prestarted_children_serve_start_and_teardown_in_the_right_namespaces(make_ns):
    """`prestart` (panopticon run): the same two warm children apply the jail's and the
    host's rules, then remove the host's; a warm child killed while it waits is replaced
    by a fresh one, and the operation still happens. Run from inside a "host" namespace."""
    j, h = make_ns("pj"), make_ns("ph")
    tag = "f4c5d6e7"
    code = (
        "import os, signal, sys; from panopticond import firewall, rules\n"
        "jail = [rules.jail_rules(f, proxy_uid=%d, transparent_port=%d, dns_port=%d, "
        "dns_servers=%r) for f in (4, 6)]\n"
        "host = [rules.host_rules(f, tag=%r, veth_host='pnh-p', subnet=s, "
        "dns_servers=['10.0.0.2', '2001:db8:ff::53']) for f, s in ((4, '10.250.0.0/24'), "
        "(6, 'fd99:1::/64'))]\n"
        "pids = lambda: {f: [p.pid for p, _ in pool] for f, pool in firewall._warm.items()}\n"
        "firewall.prestart()\n"
        "before = pids()\n"
        "firewall.apply_each([(jail, sys.argv[1]), (host, None)])\n"
        "assert pids() == before, (before, pids())\n"
        "print('applied', flush=True)\n"
        "sys.stdin.readline()\n"
        "os.kill(firewall._warm[4][0][0].pid, signal.SIGKILL)\n"
        "firewall.remove_host_rules(%r)\n"
        "assert pids()[6] == before[6] and pids().get(4) != before[4], (before, pids())\n"
        "firewall.discard_prestarted()\n"
    ) % (PROXY_UID, T, D, DNS, tag, tag)
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.Popen(["ip", "netns", "exec", h, "env", f"PYTHONPATH={repo}",
                             sys.executable, "-c", code, j], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "applied\n", proc.stderr.read()
        assert firewall.verify([jail(4), jail(6)], j) == []
        assert firewall.verify([host(4, tag, "pnh-p"), host(6, tag, "pnh-p")], h) == []
        proc.stdin.write("\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert firewall.verify([jail(4), jail(6)], j) == []
    for family in (4, 6):
        assert f"PANO-{tag.upper()}" not in in_ns(h, SAVE[family]).stdout
        assert ":OUTPUT DROP" in in_ns(j, SAVE[family]).stdout


_PARAMS_CHECK = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from panopticond import firewall, rules
fam, ns = int(sys.argv[2]), sys.argv[3]
iptc = firewall._import_iptc()
firewall._enter_netns(ns)
out = {"rules": 0, "differ": []}
for table in ("filter", "nat"):
    t = (iptc.Table if fam == 4 else iptc.Table6)(table)
    t.refresh()
    for chain in t.chains:
        for r in chain.rules:
            out["rules"] += 1
            for m in [*r.matches, r.target]:
                if m is None:
                    continue
                ours, theirs = firewall._all_parameters(m), m.get_all_parameters()
                if ours != theirs:
                    out["differ"].append([chain.name, m.name, ours, theirs])
print(json.dumps(out))
"""


@pytest.mark.parametrize("family", [4, 6])
def test_the_fast_read_back_reads_what_python_iptables_reads(make_ns, family):
    """firewall.py skips python-iptables' save/parse round trip when adding a rule and
    splits the saved text without shlex where it has no quoting (rules.py allows no
    match that could quote): applied and read back through that path, every rule of the
    jail and the host reads the same as through python-iptables' own code."""
    ns = make_ns("params")
    firewall.apply([jail(family)], ns)
    firewall.apply([host(family, secrets.token_hex(4))], make_ns("params-host"))
    for where, least in ((ns, 40), (f"{ns}-host", 10)):
        p = subprocess.run([sys.executable, "-c", _PARAMS_CHECK, str(Path(__file__).parents[2]),
                            str(family), where], capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        out = json.loads(p.stdout)
        assert out["rules"] > least and out["differ"] == [], out


def test_worker_spread_is_applied_read_back_and_checked(make_ns):
    ns = make_ns("w")
    planned = [rules.jail_rules(f, proxy_uid=PROXY_UID, transparent_port=T, dns_port=D,
                                dns_servers=DNS, workers=3) for f in (4, 6)]
    firewall.apply(planned, ns)
    assert firewall.verify(planned, ns) == []
    saved = in_ns(ns, SAVE[4]).stdout
    assert (f"-A OUTPUT -p tcp -m tcp --dport 443 -m statistic --mode nth --every 3 "
            f"--packet 0 -j REDIRECT --to-ports {T}") in saved
    assert f"-A OUTPUT -p tcp -m tcp --dport 443 -j REDIRECT --to-ports {T + 2}" in saved
    # A spread changed behind our back is drift.
    in_ns(ns, LEGACY[4], "-t", "nat", "-R", "OUTPUT", "5", "-p", "tcp", "--dport", "80", "-m",
          "statistic", "--mode", "nth", "--every", "2", "--packet", "0", "-j", "REDIRECT",
          "--to-ports", str(T))
    diffs = firewall.verify(planned, ns)
    assert diffs and all("IPv4 nat OUTPUT" in d for d in diffs), diffs
