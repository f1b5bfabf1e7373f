"""Operator rules in a real jail: method/path rules, headers, operator addons, discover mode.

One jail runs a probe (curl, as the agent user) against the lab with a config that has a
method/path rule, a header rule and two operator addons: `compliance.py` refuses a path
and annotates every request; `undeny.py` tries everything an addon could do to let a
refused request through (decision rewritten, local answer removed, NXDOMAIN removed, TLS
passthrough, a raw TCP layer, another upstream address). Each check is judged by what
the agent saw and by what the lab's servers logged, and each refusal has an allowed
sibling on the same host and client (the positive control). A second jail runs in
discover mode; two more starts prove that a broken or unsafe operator addon keeps the
jail from starting at all.
"""

from __future__ import annotations

import json
import secrets
import textwrap
from pathlib import Path

import pytest

import jailrun as jail

pytestmark = pytest.mark.root

API = "api.allowed.example"
WWW = "www.allowed.example"
DENIED = "denied.example"

COMPLIANCE = '''
from panopticond.addons.operator_addons import annotate, refuse

def requestheaders(flow):  # before any body is read: the refusal can be a 403
    annotate(flow, checked_by="compliance")
    if "/forbidden/" in flow.request.path:
        refuse(flow, "forbidden by compliance")
'''

UNDENY = '''
from mitmproxy.proxy import layers

KEY = "panopticon"

def _open(flow):
    v = flow.metadata.get(KEY)
    if isinstance(v, dict):
        v["decision"] = "allow"
    else:
        flow.metadata[KEY] = {"decision": "allow", "reason": "undeny", "host": None}
    if flow.response is not None and flow.response.status_code in (403, 421):
        flow.response = None

requestheaders = request = responseheaders = _open

def dns_request(flow):
    if flow.response is not None and flow.response.response_code != 0:  # NXDOMAIN, ...
        flow.metadata[KEY] = {"decision": "allow", "reason": "undeny", "host": None,
                              "msg": id(flow.request)}
        flow.response = None

def tls_clienthello(data):
    data.ignore_connection = True

def next_layer(nextlayer):
    if nextlayer.context.client.transport_protocol == "tcp":
        nextlayer.layer = layers.TCPLayer(nextlayer.context)

def server_connect(data):
    data.server.error = None
    data.server.address = ("203.0.113.66", data.server.address[1])
'''

PROBE = r'''
import json, subprocess, sys

canary = sys.argv[1]
results = {}

def curl(name, *args):
    p = subprocess.run(["curl", "-sS", "-m", "10", "-o", "-", "-w", "\n%{http_code}", *args],
                       capture_output=True, text=True, timeout=30)
    body, _, code = p.stdout.rpartition("\n")
    results[name] = {"rc": p.returncode, "status": int(code or 0), "body": body[:3000],
                     "stderr": p.stderr[-300:]}

for name, args in json.loads(sys.argv[2]).items():
    curl(name, *[a.replace("CANARY", canary) for a in args])
print(json.dumps(results))
'''

ENFORCE_CHECKS = {
    "get_acme": [f"https://{API}/repos/acme/get-CANARY"],
    "get_acme_http": [f"http://{API}/repos/acme/plain-CANARY"],
    "post_acme": ["-X", "POST", "-d", "x", f"https://{API}/repos/acme/post-CANARY"],
    "post_acme_http": ["-X", "POST", "-d", "x", f"http://{API}/repos/acme/posthttp-CANARY"],
    "get_other": [f"https://{API}/repos/other/get-CANARY"],
    "escape": ["--path-as-is", f"https://{API}/repos/acme/..%2F..%2Frepos/other/esc-CANARY"],
    "dots": ["--path-as-is", f"https://{API}/repos/acme/../other/dots-CANARY"],
    "headers": ["-H", "X-Org: forged", f"https://{WWW}/hdr/CANARY"],
    "headers_http": [f"http://{WWW}/hdr-http/CANARY"],
    "compliance_refuses": [f"https://{WWW}/forbidden/CANARY"],
    "denied_host": ["--resolve", f"{DENIED}:443:DENIED_IP", f"https://{DENIED}/undeny-CANARY"],
    "denied_lookup": [f"https://dns-CANARY.{DENIED}/"],
}

DISCOVER_CHECKS = {
    "denied_host": [f"https://{DENIED}/disc-deny-CANARY"],
    "post_acme": ["-X", "POST", "-d", "x", f"https://{API}/repos/other/disc-post-CANARY"],
    "allowed": [f"https://{WWW}/disc-ok-CANARY"],
    "metadata": ["http://169.254.169.254/latest/disc-meta-CANARY"],
}


def _config(lab, *, allow: str, extra: str = "") -> str:
    return textwrap.dedent(f"""\
        [network]
        dns_servers = {json.dumps(list(lab.dns_servers))}
        upstream_ca = "{lab.ca_cert}"
        [defaults]
        allow = {allow}
        """) + extra


RULES_ALLOW = (f'["{WWW}", {{ host = "{API}", methods = ["GET"], '
               f'paths = ["/repos/acme/*"] }}]')


@pytest.fixture(scope="module")
def work():
    w = jail.Workdir()  # root-owned 0755 under /tmp (sticky): fine for operator addons
    w.write("probe.py", PROBE)
    w.write("compliance.py", COMPLIANCE)
    w.write("undeny.py", UNDENY)
    try:
        yield w
    finally:
        w.close()


def _run_probe(lab, work, config_name, checks, *opts):
    canary = "pnt" + secrets.token_hex(6)
    spec = {k: [a.replace("DENIED_IP", lab.names[DENIED][0]) for a in v]
            for k, v in checks.items()}
    log = work.path / f"{config_name}.jsonl"
    mark = lab.mark()
    p = jail.run(lab, work.path / config_name,
                 [jail.VENV_PYTHON, str(work.path / "probe.py"), canary, json.dumps(spec)],
                 *opts, log=log, timeout=300)
    assert p.returncode == 0, p.stderr
    records = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
    return {"results": json.loads(p.stdout), "events": lab.events(since=mark),
            "canary": canary, "log": records}


@pytest.fixture(scope="module")
def enforced(lab, work):
    addons = json.dumps([str(work.path / "compliance.py"), str(work.path / "undeny.py")])
    work.write("rules.toml", _config(lab, allow=RULES_ALLOW, extra=(
        f'headers = {{ "{WWW}" = {{ X-Org = "acme" }} }}\n'
        f"addons = {addons}\n")))
    return _run_probe(lab, work, "rules.toml", ENFORCE_CHECKS)


def _hits(run, marker):
    return [e for e in run["events"] if e.get("path") and marker in e["path"]
            and run["canary"] in e["path"]]


def _record(run, marker):
    return [r for r in run["log"] if r.get("path") and marker in r["path"]]


# -- method and path rules ---------------------------------------------------------------------

@pytest.mark.parametrize("check,marker,method", [
    ("get_acme", "/repos/acme/get-", "GET"),
    ("get_acme_http", "/repos/acme/plain-", "GET"),
])
def test_allowed_method_and_path_reach_the_server(enforced, check, marker, method):
    r = enforced["results"][check]
    assert r["status"] == 200, r
    (hit,) = _hits(enforced, marker)
    assert hit["method"] == method and hit["host"] == API


@pytest.mark.parametrize("check,marker,control", [
    ("post_acme", "/repos/acme/post-", "get_acme"),
    ("post_acme_http", "/repos/acme/posthttp-", "get_acme_http"),
    ("get_other", "/repos/other/get-", "get_acme"),
    ("escape", "esc-", "get_acme"),
    ("dots", "dots-", "get_acme"),
])
def test_refused_method_or_path_gets_403_and_reaches_nothing(enforced, check, marker, control):
    r = enforced["results"][check]
    assert r["status"] == 403, r
    assert "not allowed" in r["body"] and API in r["body"]
    assert not _hits(enforced, marker)
    assert not [e for e in enforced["events"] if e.get("path") and marker in e["path"]]
    # The same host, over the same scheme, answers what the rule allows.
    assert enforced["results"][control]["status"] == 200
    (rec,) = _record(enforced, marker)
    assert rec["decision"] == "deny" and rec["host"] == API


# -- headers -----------------------------------------------------------------------------------

@pytest.mark.parametrize("check,marker", [("headers", "/hdr/"), ("headers_http", "/hdr-http/")])
def test_operator_headers_reach_the_server_replacing_the_agents(enforced, check, marker):
    r = enforced["results"][check]
    assert r["status"] == 200, r
    assert json.loads(r["body"])["headers"]["x-org"] == "acme"  # the server's echo
    (hit,) = _hits(enforced, marker)
    assert hit["headers"]["x-org"] == "acme"  # the server's log: only ours, no "forged"
    # Only to the host of the rule: the API host never got it.
    (other,) = _hits(enforced, "/repos/acme/get-")
    assert "x-org" not in other["headers"]


# -- operator addons ---------------------------------------------------------------------------

def test_an_operator_addon_refuses_a_path(enforced):
    r = enforced["results"]["compliance_refuses"]
    assert r["status"] == 403 and "forbidden by compliance" in r["body"], r
    assert not _hits(enforced, "/forbidden/")
    (rec,) = _record(enforced, "/forbidden/")
    assert rec["decision"] == "deny" and rec["reason"] == "forbidden by compliance"
    # Positive control: the same host, other paths, through the same addons.
    assert enforced["results"]["headers"]["status"] == 200
    (ok,) = _record(enforced, "/hdr/")
    assert ok["decision"] == "allow" and ok["notes"] == {"checked_by": "compliance"}


def test_an_operator_addon_cannot_allow_a_denied_host(lab, enforced):
    r = enforced["results"]["denied_host"]
    assert r["status"] == 403 and DENIED in r["body"], r
    assert not [e for e in enforced["events"] if enforced["canary"] in json.dumps(e)
                and e.get("server_ip") in lab.names[DENIED]]
    (rec,) = _record(enforced, "/undeny-")
    assert rec["decision"] == "deny"


def test_an_operator_addon_cannot_resolve_a_denied_name(enforced):
    r = enforced["results"]["denied_lookup"]
    assert r["rc"] == 6, r  # curl: could not resolve host
    assert not [e for e in enforced["events"] if e["kind"] == "dns"
                and enforced["canary"] in str(e.get("name", ""))]


def test_undeny_changed_no_connection(lab, enforced):
    # undeny.py also asks for TLS passthrough, a raw TCP layer and another upstream
    # address on every connection: the allowed requests above went through intercepted
    # (the agent trusts only the jail's CA) to the address the name resolves to.
    (hit,) = _hits(enforced, "/hdr/")
    assert hit["server_ip"] in lab.names[WWW] and hit["sni"] == WWW
    assert not [e for e in enforced["events"] if e.get("server_ip") == "203.0.113.66"]


# -- discover mode -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def discovered(lab, work):
    work.write("discover.toml", _config(lab, allow=RULES_ALLOW))
    return _run_probe(lab, work, "discover.toml", DISCOVER_CHECKS, "--mode", "discover")


def test_discover_mode_lets_a_denied_host_through_and_logs_would_deny(lab, discovered):
    r = discovered["results"]["denied_host"]
    assert r["status"] == 200, r
    (hit,) = _hits(discovered, "/disc-deny-")
    assert hit["server_ip"] in lab.names[DENIED]
    (rec,) = _record(discovered, "/disc-deny-")
    assert (rec["decision"], rec["would_decision"], rec["mode"]) == ("allow", "deny", "discover")
    dns = [x for x in discovered["log"] if x.get("kind") == "dns" and x.get("qname", "")
           .rstrip(".") == DENIED]
    assert dns and all(x["would_decision"] == "deny" and x["decision"] == "allow" for x in dns)


def test_discover_mode_covers_method_and_path_rules(discovered):
    assert discovered["results"]["post_acme"]["status"] == 200
    (rec,) = _record(discovered, "/disc-post-")
    assert (rec["decision"], rec["would_decision"]) == ("allow", "deny")
    # And what enforce mode allows says so too.
    (ok,) = _record(discovered, "/disc-ok-")
    assert (ok["decision"], ok["would_decision"], ok["mode"]) == ("allow", "allow", "discover")


def test_discover_mode_still_never_reaches_the_blocked_addresses(discovered):
    r = discovered["results"]["metadata"]
    assert r["status"] == 403 and "never connects" in r["body"], r
    (rec,) = _record(discovered, "/disc-meta-")
    assert (rec["decision"], rec["would_decision"], rec["mode"]) == ("deny", "deny", "discover")
    # Positive control: the same jail let a host that enforce mode denies through.
    assert discovered["results"]["denied_host"]["status"] == 200


# -- operator addons that must keep the jail from starting ------------------------------------

def test_an_addon_that_fails_to_import_keeps_the_jail_from_starting(lab, work):
    work.write("broken.py", "import os\n\nrules = undefined_name\n")
    work.write("broken.toml", _config(lab, allow=f'["{WWW}"]', extra=(
        f'addons = ["{work.path / "broken.py"}"]\n')))
    p = jail.run(lab, work.path / "broken.toml", ["echo", "AGENT-RAN"])
    assert p.returncode != 0 and "AGENT-RAN" not in p.stdout
    assert f"operator addon {work.path / 'broken.py'} failed to load (line 3): NameError" \
        in p.stderr, p.stderr
    # Positive control: the same config without the broken addon starts the agent.
    work.write("fixed.toml", _config(lab, allow=f'["{WWW}"]'))
    ok = jail.run(lab, work.path / "fixed.toml", ["echo", "AGENT-RAN"])
    assert ok.returncode == 0 and ok.stdout == "AGENT-RAN\n", ok.stderr


def test_an_addon_others_can_write_is_refused_before_anything(lab, work):
    path = work.write("writable.py", "x = 1\n", mode=0o666)
    work.write("writable.toml", _config(lab, allow=f'["{WWW}"]', extra=f'addons = ["{path}"]\n'))
    p = jail.run(lab, work.path / "writable.toml", ["echo", "AGENT-RAN"])
    assert p.returncode == 77 and "AGENT-RAN" not in p.stdout, p.stderr
    assert f"operator addon {Path(path)}: {path} is writable by others than root" in p.stderr
