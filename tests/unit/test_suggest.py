import tomllib

import pytest

from panopticond import suggest
from panopticond.policy import Policy


def http(host, method="GET", t=0, decision="allow", reason="allowed", rule=None, **kw):
    return {"schema": 1, "time": f"2024-05-01T10:{t // 60:02d}:{t % 60:02d}.000Z",
            "kind": "http", "instance": "bot", "host": host, "method": method, "path": "/",
            "decision": decision, "reason": reason, "rule": rule, **kw}


def dns(name, decision="allow", reason="allowed", t=0):
    return {"schema": 1, "time": f"2024-05-01T10:00:{t:02d}.000Z", "kind": "dns",
            "instance": "bot", "host": name, "qname": name, "qtype": "A",
            "decision": decision, "reason": reason, "rule": None}


@pytest.mark.parametrize("host,base", [
    ("api.openai.com", "openai.com"),
    ("openai.com", "openai.com"),
    ("a.b.c.example.co.uk", "example.co.uk"),
    ("www.allowed.example", "allowed.example"),  # a TLD the list does not know: rule "*"
    ("api.github.com", "github.com"),
    # Platforms: never a wildcard at or over one; under one tenant, that tenant's.
    ("github.io", None),
    ("alice.github.io", "alice.github.io"),
    ("sts.amazonaws.com", None),  # *.amazonaws.com would cover every S3 bucket
    ("x.blogspot.com", "x.blogspot.com"),
    ("ngrok.io", None),
    # Public suffixes themselves, single labels and addresses.
    ("co.uk", None),
    ("com", None),
    ("localhost", None),
    ("203.0.113.7", None),
    ("2001:db8::1", None),
])
def test_wildcard_base(host, base):
    assert suggest.wildcard_base(host) == base


def test_groups_two_names_under_their_domain_and_keeps_single_names_exact():
    obs = suggest.observe([
        http("api.openai.com", "POST", t=1, secrets=["OPENAI"]),
        http("files.openai.com", t=5),
        http("api.openai.com", t=9),
        http("pypi.org", t=3),
        http("alice.github.io", t=4),
        http("bob.github.io", t=4),  # two tenants of one platform: not grouped
        http("203.0.113.7", t=4),
    ])
    entries = suggest.group(obs.hosts, )
    assert [e.pattern for e in entries] == [
        "*.openai.com", "203.0.113.7", "alice.github.io", "bob.github.io", "pypi.org"]
    top = entries[0]
    assert top.stats.count == 3 and top.stats.methods == {"GET": 2, "POST": 1}
    assert (top.stats.first, top.stats.last) == ("2024-05-01T10:00:01.000Z",
                                                 "2024-05-01T10:00:09.000Z")
    assert top.stats.secrets == {"OPENAI"}
    assert [h.host for h in top.hosts] == ["api.openai.com", "files.openai.com"]
    # A higher threshold keeps them exact.
    assert [e.pattern for e in suggest.group(obs.hosts, min_group=3, )][:2] == [
        "api.openai.com", "203.0.113.7"]


def test_suggestion_is_toml_to_paste_with_comments():
    records = [
        http("api.openai.com", "POST", t=1, secrets=["OPENAI"]),
        http("files.openai.com", t=2),
        http("pypi.org", decision="deny", reason="not in the allowlist", t=3),
        http("evil.example", decision="deny", reason="denied by evil.example",
             rule="evil.example", t=4),
        dns("pypi.org"), dns("only-resolved.example"),
        {"kind": "tripwire", "host": "x.example", "decision": "deny"},
        {"kind": "http", "host": "bad\nname", "decision": "deny"},
    ]
    text = suggest.suggest_toml(suggest.observe(records), sources=["a.jsonl"], )
    assert tomllib.loads(text) == {"allow": ["*.openai.com", "pypi.org"]}
    assert "secrets used: OPENAI" in text
    assert "seen: api.openai.com (1), files.openai.com (1)" in text
    assert "Resolved but never connected to (not listed above): only-resolved.example" in text
    assert "deny rule" in text and "evil.example" in text
    # Every suggested pattern is one the config accepts.
    Policy.build("x", tomllib.loads(text)["allow"], [])


def test_replay_reports_what_the_candidate_would_block():
    records = [
        http("api.openai.com", t=1),
        http("api.openai.com", "POST", t=2),
        http("pypi.org", t=3),
        http("pypi.org", decision="deny", reason="not in the allowlist", t=4),
        dns("pypi.org"),
        dns("api.openai.com"),
        {"kind": "tripwire", "host": "pypi.org", "decision": "deny"},  # not a request
    ]
    pol = Policy.build("bot", ["*.openai.com"], [])

    def decide(rec):
        d = pol.decide(rec["host"])
        return d.allowed, d.reason

    r = suggest.replay(records, decide)
    assert (r.judged, r.would_block, r.newly_blocked, r.newly_allowed) == (6, 3, 2, 0)
    row = r.rows["pypi.org"]
    assert (row.seen, row.would_block, row.was_blocked) == (3, 3, 1)
    table = suggest.replay_table(r)
    assert table.splitlines()[0].split()[:4] == ["HOST", "BLOCKED", "OF", "BEFORE"]
    assert "pypi.org" in table and "api.openai.com" not in table
    assert "would block 3 of 6" in table


def test_replay_counts_what_the_candidate_would_let_through():
    records = [http("pypi.org", decision="deny", reason="not in the allowlist")]
    r = suggest.replay(records, lambda rec: (True, "allowed"))
    assert (r.would_block, r.newly_allowed) == (0, 1)
    assert "would block 0 of 1" in suggest.replay_table(r)


def test_discover_mode_records_count_as_blocked_when_enforce_would_block():
    assert suggest.would_block(http("a.example", mode="discover", would_decision="deny"))
    assert not suggest.would_block(http("a.example", mode="discover", would_decision="allow"))
    assert not suggest.would_block(http("a.example"))
    assert suggest.would_block(http("a.example", decision="deny"))


def test_run_summary():
    records = [
        http("www.allowed.example", t=1),
        http("denied.example", decision="deny", reason="not in the allowlist", t=2),
        http("denied.example", decision="deny", reason="not in the allowlist", t=3),
        dns("denied.example", decision="deny", reason="not in the allowlist"),
        dns("www.allowed.example"),
        http("evil.example", decision="deny", reason="denied by evil.example",
             rule="evil.example"),
        http("www.allowed.example", decision="deny", reason="Host does not match the TLS "
             "server name"),
        {"kind": "tripwire", "instance": "bot", "host": "x.example", "decision": "deny"},
        http("other.example", decision="deny", reason="not in the allowlist") | {
            "instance": "other"},
    ]
    s = suggest.summarize(records, instance="bot")
    assert s.requests == {"allowed": 1, "blocked": 4}
    assert s.dns == {"allowed": 1, "blocked": 1}
    assert s.tripwires == 1
    assert s.allowable == {"denied.example": 3}
    assert s.refused == {"evil.example": "denied by evil.example",
                         "www.allowed.example": "Host does not match the TLS server name"}
    lines = suggest.summary_lines(s, config_key="allow of [agents.bot] in the config",
                                  log_args="bot")
    assert lines[0] == ("requests: 1 allowed, 4 blocked; DNS queries: 1 answered, "
                        "1 refused; 1 TRIPWIRE")
    assert "to allow: --allow denied.example" in lines
    assert 'or add to allow of [agents.bot] in the config: "denied.example"' in lines
    assert any(ln.startswith("also blocked: evil.example (denied by evil.example)")
               for ln in lines)
    assert lines[-1] == "details: panopticon logs bot --blocked"


def test_run_summary_when_nothing_was_blocked():
    s = suggest.summarize([http("a.example")])
    assert suggest.summary_lines(s, config_key="k", log_args="--file /x") == [
        "requests: 1 allowed, 0 blocked; DNS queries: 0 answered, 0 refused"]


def test_run_summary_ignores_records_before_the_run():
    s = suggest.summarize([http("old.example", t=0, decision="deny",
                                reason="not in the allowlist")], since=1e10)
    assert not s.allowable and s.requests["blocked"] == 0
