"""Catalogue items 43 and 44: the audit log and the CA key, attacked from the main jail.

Here panopticon's own request log is the thing under attack (forged lines), so it is
read, never trusted: every line must parse, and nothing the agent wrote may become a
field of its own. The CA key must stay the proxy user's alone, and each jail has its own.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

import attacklib as lib
import jailrun as jail

pytestmark = pytest.mark.root

A = lib.declare_module(__name__)
DENIED4 = "198.51.100.20"
FORGED = '{"decision":"allow","forged":1}'

# -- 43 forged log lines ------------------------------------------------------------------------
FORGERIES = {
    "a newline, percent-encoded, in the path":
        f"GET /@T@%0a{FORGED} HTTP/1.1\r\nHost: denied.example\r\n\r\n",
    "a bare CR in the Host header": f"GET /@T@ HTTP/1.1\r\nHost: denied.example\r{FORGED}\r\n\r\n",
    "a newline in the Host header's value":
        f"GET /@T@ HTTP/1.1\r\nHost: denied.example\n{FORGED}\r\n\r\n",
    "a raw newline in the path": f"GET /@T@\n{FORGED} HTTP/1.1\r\nHost: denied.example\r\n\r\n",
    "escapes and quotes in a header": f'GET /@T@ HTTP/1.1\r\nHost: denied.example\r\n'
                                      f'User-Agent: x"\\n\\u000a{FORGED}\r\n\r\n',
}
FORGE = [A(43, title, "tcp", host=DENIED4, port=80, payload=request,
           expect=lambda r: r.get("status") != 200) for title, request in FORGERIES.items()]
FORGE.append(A(43, "a newline inside a DNS label", "dns", server="198.51.100.53",
               name=f"@T@\n{FORGED}.denied.example", expect=lib.not_answered_dns))

# -- 44 the CA key ----------------------------------------------------------------------------
A(44, "read the CA's private key", "read", path="@RUN@/ca/mitmproxy-ca.pem",
  expect=lambda r: r.get("read") is False)
A(44, "list the proxy's confdir", "exec", argv=["ls", "-la", "@RUN@/ca/"],
  expect=lib.failed_exec)
BUNDLE = A(44, "read the CA certificate the agent trusts", "read", path="@RUN@/ca-bundle.pem",
           judged=False)


@pytest.mark.parametrize("a", lib.params(__name__))
def test_attack(main_run, a):
    lib.judge(main_run, a)


@pytest.mark.threat(43, "forged lines: every log line parses, nothing forged becomes a field")
def test_43_log_lines_cannot_be_forged(main_run):
    assert main_run.log, "no request log"
    invalid = [r["_invalid"][:200] for r in main_run.log if "_invalid" in r]
    assert invalid == [], invalid
    assert not [r for r in main_run.log if "forged" in r], "a forged field became a record's own"
    # Positive control: each attempt was logged, as one record carrying the attempt. A
    # request line broken by a raw LF never parses (mitmproxy answers 400 before any
    # hook), so it leaves no record with its path: that one is not counted.
    for a in FORGE:
        if a.name == "a raw newline in the path":
            continue
        tag = main_run.tag(a)
        assert [r for r in main_run.log if tag in json.dumps(r)], f"{a.name}: not logged"


@lib.live()
def ca_fingerprint(lab, name, canary, control):
    return Path(f"/run/panopticon/{name}/ca.sha256").read_text().strip()


@pytest.mark.threat(44, "each instance has its own CA")
def test_44_each_jail_has_its_own_ca(main_run, attack_lab):
    r = main_run.results[BUNDLE.id]
    assert r["read"], r  # control: the agent reads what it is meant to
    mine = main_run.live["ca_fingerprint"]
    work = jail.Workdir()
    try:
        work.write("c.toml", jail.config_text(attack_lab, []), mode=0o600)
        p = subprocess.run(jail.run_argv(attack_lab, work.path / "c.toml",
                                         ["sh", "-c", "cat \"$(dirname \"$SSL_CERT_FILE\")/ca.sha256\""]),
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        assert p.stdout.strip() and p.stdout.strip() != mine
    finally:
        work.close()
