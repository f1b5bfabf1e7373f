"""Host matching and decisions: canonical names, patterns, deny over allow, the JSON form."""

from __future__ import annotations

import ipaddress
import json

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from panopticond.policy import (
    POLICY_VERSION,
    Decision,
    HostPattern,
    Policy,
    canonical_host,
)

# --- canonical_host ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("example.com", "example.com"),
        ("Example.COM", "example.com"),
        ("  api.Example.com\t", "api.example.com"),
        ("example.com.", "example.com"),
        ("example.com:443", "example.com"),
        ("Example.com.:8080", "example.com"),
        ("bücher.example", "xn--bcher-kva.example"),
        ("BÜCHER.Example.", "xn--bcher-kva.example"),
        ("XN--BCHER-KVA.example", "xn--bcher-kva.example"),
        ("example\u3002com", "example.com"),  # ideographic full stop is a dot in IDNA
        ("_dmarc.example.com", "_dmarc.example.com"),
        ("a-b.example", "a-b.example"),
        ("localhost", "localhost"),
        ("203.0.113.7", "203.0.113.7"),
        ("203.0.113.7:80", "203.0.113.7"),
        ("2001:DB8::1", "2001:db8::1"),
        ("2001:0db8:0000::0001", "2001:db8::1"),
        ("[2001:db8::1]", "2001:db8::1"),
        ("[2001:DB8::1]:443", "2001:db8::1"),
        ("[::1]", "::1"),
    ],
)
def test_canonical_host(raw, canonical):
    assert canonical_host(raw) == canonical


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "   ",
        ".",
        "..",
        "example.com..",
        "a..example.com",
        ".example.com",
        "-a.example.com",
        "a-.example.com",
        "a b.example.com",
        "exa!mple.com",
        "example.com/path",
        "user@example.com",
        "example.com:",
        "example.com:https",
        "example.com:-1",
        "[2001:db8::1",
        "a" * 64 + ".example.com",  # a label has at most 63 octets
        "\u00ad.example.com",  # maps to an empty label
    ],
)
def test_canonical_host_rejects(raw):
    with pytest.raises(ValueError):
        canonical_host(raw)


def test_canonical_host_length_limit():
    label = "a" * 63
    ok = ".".join([label] * 3 + ["b" * 61])  # 253 characters: the longest valid name
    assert len(ok) == 253
    assert canonical_host(ok) == ok
    assert canonical_host(ok + ".") == ok  # the root dot is not counted
    with pytest.raises(ValueError, match="253"):
        canonical_host(ok + "b")
    with pytest.raises(ValueError):
        canonical_host(ok.replace("a", "ü", 1) + "bb")  # long after IDNA encoding


def test_canonical_host_label_of_63_is_fine():
    assert canonical_host("a" * 63 + ".example") == "a" * 63 + ".example"


@pytest.mark.parametrize("raw", ["[example.com]", "[2001:db8::1]evil", "[2001:db8::1]:https"])
def test_canonical_host_brackets_only_for_ipv6_with_optional_port(raw):
    with pytest.raises(ValueError):
        canonical_host(raw)


def test_canonical_host_uses_idna_2008():
    assert canonical_host("straße.de") == "xn--strae-oqa.de"


# --- HostPattern --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "base", "wildcard", "shown"),
    [
        ("example.com", "example.com", False, "example.com"),
        ("*.example.com", "example.com", True, "*.example.com"),
        (" *.Example.COM. ", "example.com", True, "*.example.com"),
        ("*.bücher.example", "xn--bcher-kva.example", True, "*.xn--bcher-kva.example"),
        ("203.0.113.7", "203.0.113.7", False, "203.0.113.7"),
        ("2001:DB8::7", "2001:db8::7", False, "2001:db8::7"),
    ],
)
def test_pattern_parse(text, base, wildcard, shown):
    p = HostPattern.parse(text)
    assert (p.base, p.wildcard, str(p)) == (base, wildcard, shown)
    assert p.text == text.strip()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("*", "'\\*' may only stand alone"),
        ("*.*.com", "'\\*' may only stand alone"),
        ("a.*.com", "'\\*' may only stand alone"),
        ("*example.com", "'\\*' may only stand alone"),
        ("example.*", "'\\*' may only stand alone"),
        ("host:443", "no port"),
        ("*.example.com:443", "no port"),
        ("[2001:db8::1]", "no port or brackets"),
        ("*.1.2.3.4", "cannot apply to an IP"),
        ("*.2001:db8::1", None),
        ("*.", None),
        ("", None),
        ("bad label.com", None),
    ],
)
def test_pattern_parse_errors(text, message):
    with pytest.raises(ValueError, match=message):
        HostPattern.parse(text)


def test_pattern_matches_expects_canonical_input():
    p = HostPattern.parse("*.example.com")
    assert p.matches("example.com")
    assert p.matches("a.b.example.com")
    assert not p.matches("badexample.com")
    assert not p.matches("example.com.evil.test")
    assert not p.matches("com")
    exact = HostPattern.parse("example.com")
    assert exact.matches("example.com")
    assert not exact.matches("a.example.com")


# --- Policy.decide ------------------------------------------------------------------------


def policy(allow=(), deny=()) -> Policy:
    return Policy.build("bot", list(allow), list(deny), allow_hint="[agents.bot] allow")


def test_default_deny():
    d = policy().decide("example.com")
    assert d == Decision(False, None, "not in the allowlist")
    assert d.action == "deny"


def test_allowed_names_the_rule():
    d = policy(allow=["*.Example.com"]).decide("API.example.com.")
    assert d.allowed and d.action == "allow"
    assert d.rule == "*.example.com"
    assert d.reason == "allowed by *.example.com"


def test_deny_wins_over_allow_whatever_the_order():
    p = policy(allow=["*.example.com", "secret.example.com"], deny=["secret.example.com"])
    d = p.decide("secret.example.com")
    assert not d.allowed
    assert d.rule == "secret.example.com"
    assert d.reason == "denied by secret.example.com"
    assert p.decide("public.example.com").allowed


def test_deny_wildcard_covers_its_base_and_subtree():
    p = policy(allow=["*.example.com"], deny=["*.internal.example.com"])
    assert not p.decide("internal.example.com").allowed
    assert not p.decide("db.internal.example.com").allowed
    assert p.decide("notinternal.example.com").allowed
    assert p.decide("example.com").allowed


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("example.com", True),
        ("EXAMPLE.COM", True),
        ("example.com.", True),
        ("example.com:443", True),
        ("a.example.com", True),
        ("a.b.c.example.com", True),
        ("badexample.com", False),
        ("example.com.evil.test", False),
        ("example.co", False),
        ("xexample.com", False),
        ("a.example.com.evil.test", False),
        ("example.com..", False),
    ],
)
def test_wildcard_semantics(host, allowed):
    assert policy(allow=["*.example.com"]).decide(host).allowed is allowed


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("api.example.com", True),
        ("API.Example.Com.", True),
        ("example.com", False),
        ("v2.api.example.com", False),
        ("api.example.com.evil.test", False),
    ],
)
def test_exact_semantics(host, allowed):
    assert policy(allow=["api.example.com"]).decide(host).allowed is allowed


def test_ip_literals():
    p = policy(allow=["203.0.113.7", "2001:db8::7"])
    assert p.decide("203.0.113.7").allowed
    assert p.decide("[2001:DB8:0::7]:443").allowed
    assert p.decide("2001:db8::7").allowed
    assert not p.decide("203.0.113.8").allowed
    assert not p.decide("2001:db8::8").allowed


def test_idna_in_pattern_and_host_meet():
    p = policy(allow=["*.bücher.example"])
    assert p.decide("xn--bcher-kva.example").allowed
    assert p.decide("shop.BÜCHER.example").allowed
    assert not p.decide("bucher.example").allowed


@pytest.mark.parametrize("host", ["", "exa mple.com", "a..example.com", "[::1", "x:y"])
def test_invalid_host_is_denied_without_a_rule(host):
    p = policy(allow=["*.example.com"])
    d = p.decide(host)
    assert d == Decision(False, None, "invalid host name")


@pytest.mark.parametrize(("pattern", "host"), [("*.113.7", "203.0.113.7"), ("*.0", "0.0.0.0")])
def test_wildcard_never_matches_an_ip_literal(pattern, host):
    assert not policy(allow=[pattern]).decide(host).allowed


def test_build_rejects_bad_patterns():
    with pytest.raises(ValueError):
        policy(allow=["*.*.com"])
    with pytest.raises(ValueError):
        policy(deny=["host:443"])


# --- to_dict / from_dict --------------------------------------------------------------------


def test_round_trip_through_json():
    p = Policy.build("bot", ["*.Example.com", "api.test", "2001:DB8::1"], ["Bad.example.com."],
                     allow_hint="[agents.bot] allow in /etc/panopticon/config.toml")
    d = json.loads(json.dumps(p.to_dict()))
    assert d == {
        "version": POLICY_VERSION,
        "instance": "bot",
        "allow": ["*.example.com", "api.test", "2001:db8::1"],
        "deny": ["bad.example.com"],
        "allow_hint": "[agents.bot] allow in /etc/panopticon/config.toml",
        "rules": [],
        "mode": "enforce",
        "headers": [],
    }
    q = Policy.from_dict(d)
    assert q.to_dict() == d
    assert (q.instance, q.allow_hint) == (p.instance, p.allow_hint)
    assert [str(x) for x in q.allow] == [str(x) for x in p.allow]
    for host in ("a.example.com", "bad.example.com", "api.test", "2001:db8::1", "other.test"):
        assert q.decide(host) == p.decide(host)


def test_round_trip_of_canonical_patterns_is_identity():
    p = Policy.build("bot", ["*.example.com", "api.test"], ["bad.example.com"], "hint")
    assert Policy.from_dict(p.to_dict()) == p


def test_from_dict_allow_hint_is_optional():
    q = Policy.from_dict({"version": 1, "instance": "x", "allow": ["a.test"], "deny": []})
    assert q.allow_hint == ""
    assert q.decide("a.test").allowed


def _valid() -> dict:
    return {"version": 1, "instance": "x", "allow": ["a.test"], "deny": [], "allow_hint": ""}


def _with(**kw) -> dict:
    d = _valid()
    d.update(kw)
    return d


def _without(key: str) -> dict:
    d = _valid()
    del d[key]
    return d


@pytest.mark.parametrize(
    "doc",
    [
        pytest.param(None, id="none"),
        pytest.param([], id="list"),
        pytest.param("{}", id="string"),
        pytest.param({}, id="empty"),
        pytest.param(_without("version"), id="no-version"),
        pytest.param(_with(version=2), id="version-2"),
        pytest.param(_with(version=0), id="version-0"),
        pytest.param(_with(version="1"), id="version-str"),
        pytest.param(_with(extra=1), id="unknown-key"),
        pytest.param(_with(Allow=["a.test"]), id="unknown-key-case"),
        pytest.param(_without("allow"), id="no-allow"),
        pytest.param(_without("deny"), id="no-deny"),
        pytest.param(_without("instance"), id="no-instance"),
        pytest.param(_with(allow="a.test"), id="allow-str"),
        pytest.param(_with(allow=None), id="allow-none"),
        pytest.param(_with(deny={"a.test": 1}), id="deny-dict"),
        pytest.param(_with(allow=["a.test", 1]), id="allow-int-item"),
        pytest.param(_with(allow=[["a.test"]]), id="allow-nested"),
        pytest.param(_with(instance=1), id="instance-int"),
        pytest.param(_with(instance=None), id="instance-none"),
        pytest.param(_with(allow=["*.*.com"]), id="bad-pattern"),
        pytest.param(_with(deny=["host:443"]), id="bad-deny-pattern"),
        pytest.param(
            _with(version=True), id="version-bool",
        ),
        pytest.param(
            _with(version=1.0), id="version-float",
        ),
        pytest.param(
            _with(allow_hint=["x"]), id="allow-hint-list",
        ),
    ],
)
def test_from_dict_is_strict(doc):
    with pytest.raises(ValueError):
        Policy.from_dict(doc)


# --- properties -----------------------------------------------------------------------------

LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
LABELS = st.lists(LABEL, min_size=1, max_size=4)


def _domain(labels: list[str]) -> str:
    d = ".".join(labels)
    # An all-digit D of four labels is an IPv4 literal, where '*.' is refused.
    assume(not _is_ip(d))
    return d


def _is_ip(d: str) -> bool:
    try:
        ipaddress.ip_address(d)
        return True
    except ValueError:
        return False


def _case_mix(s: str, flips: list[bool]) -> str:
    return "".join(c.upper() if f else c for c, f in zip(s, flips + [False] * len(s)))


@settings(max_examples=300)
@given(base=LABELS, sub=st.lists(LABEL, min_size=1, max_size=3), glue=LABEL,
       evil=LABELS, flips=st.lists(st.booleans(), max_size=60))
def test_wildcard_matches_exactly_base_and_names_under_it(base, sub, glue, evil, flips):
    d = _domain(base)
    p = Policy.build("x", [f"*.{d}"], [])
    pat = p.allow[0]
    assert pat.matches(d)
    assert p.decide(d).allowed
    assert p.decide(_case_mix(d, flips) + ".").allowed
    under = ".".join(sub) + "." + d
    if _is_ip(under):  # a wildcard never matches an address, however it is spelled
        assert not pat.matches(under)
        return
    assert pat.matches(under)
    assert p.decide(under).allowed
    # Ends with D but not on a label boundary: a different registrable name.
    assert not pat.matches(glue + d)
    assert not p.decide(glue + d).allowed
    assert not p.decide(".".join(sub) + d).allowed
    # D followed by more labels is someone else's name.
    longer = d + "." + ".".join(evil)
    if not longer.endswith("." + d):  # else it is under D after all ('0.0' under '*.0')
        assert not p.decide(longer).allowed
    assert not p.decide(d + ".evil.test").allowed
    assert not p.decide(under + ".evil.test").allowed


@settings(max_examples=300)
@given(base=LABELS, sub=LABEL, glue=LABEL, flips=st.lists(st.booleans(), max_size=60))
def test_exact_pattern_matches_only_itself(base, sub, glue, flips):
    d = _domain(base)
    p = Policy.build("x", [d], [])
    assert p.decide(d).allowed
    assert p.decide(_case_mix(d, flips)).allowed
    assert p.decide(d + ".").allowed
    assert p.decide(_case_mix(d, flips) + ".").allowed
    assert not p.decide(sub + "." + d).allowed
    assert not p.decide(glue + d).allowed
    assert not p.decide(d + ".evil.test").allowed
    if len(base) > 1:
        assert not p.decide(".".join(base[1:])).allowed


@settings(max_examples=200)
@given(base=LABELS, sub=st.lists(LABEL, max_size=2), wildcard=st.booleans())
def test_deny_always_wins(base, sub, wildcard):
    d = _domain(base)
    host = ".".join([*sub, d])
    assume(not _is_ip(host))
    pattern = ("*." if wildcard else "") + d
    p = Policy.build("x", [pattern, host, "*." + host], [pattern])
    decision = p.decide(host)
    if HostPattern.parse(pattern).matches(canonical_host(host)):
        assert not decision.allowed
        assert decision.rule == str(HostPattern.parse(pattern))
    else:
        assert decision.allowed


@settings(max_examples=200)
@given(labels=LABELS, flips=st.lists(st.booleans(), max_size=60), dot=st.booleans())
def test_canonical_host_is_idempotent_and_lower_case(labels, flips, dot):
    raw = _case_mix(".".join(labels), flips) + ("." if dot else "")
    c = canonical_host(raw)
    assert c == c.lower()
    assert not c.endswith(".")
    assert canonical_host(c) == c


# --- method and path rules (issue 3) ---------------------------------------------------------

from panopticond.policy import (  # noqa: E402
    DISCOVER,
    HeaderRule,
    RequestRule,
    header_problem,
    parse_method,
)

GH = RequestRule.parse("api.github.com", ["get", "HEAD"], ["/repos/acme/*", "/user"])


def rules_policy(*, allow=(), deny=(), rules=(GH,), mode="enforce", headers=()) -> Policy:
    return Policy.build("x", list(allow), list(deny), rules=list(rules), mode=mode,
                        headers=list(headers))


@pytest.mark.parametrize(("method", "path", "allowed"), [
    ("GET", "/repos/acme/x", True),
    ("HEAD", "/repos/acme", True),
    ("GET", "/user?tab=1", True),
    ("GET", "/repos/acme/x?next=/repos/other", True),
    ("POST", "/repos/acme/x", False),
    ("get", "/repos/acme/x", False),  # methods are compared as sent
    ("GET", "/repos/other", False),
    ("GET", "/repos/acme/../other", False),
    ("GET", "/repos/acme/%2e%2e/other", False),
    ("GET", "/users", False),
])
def test_request_rule(method, path, allowed):
    d = rules_policy().decide("API.github.com.", method, path)
    assert d.allowed is allowed
    if allowed:
        assert d.rule == str(GH) and "GET,HEAD" in d.rule and "/repos/acme/*" in d.rule
    else:
        # Not a deny rule: the 403 page must not call it one.
        assert d.rule is None


def test_request_rule_reasons_name_the_failing_part():
    p = rules_policy()
    assert "POST is not allowed" in p.decide("api.github.com", "POST", "/user").reason
    assert "path is not allowed" in p.decide("api.github.com", "GET", "/x").reason
    assert "ambiguous" in p.decide("api.github.com", "GET", "/repos/acme/%252e").reason
    # An agent-chosen method is not quoted unless it is a plain token.
    assert "\n" not in p.decide("api.github.com", "G\nET", "/user").reason


def test_host_level_question_with_rules_is_possibly_allowed():
    p = rules_policy()
    d = p.decide("api.github.com")
    assert d.allowed and "some requests" in d.reason
    assert p.decide("api.github.com", "GET").allowed
    assert not p.decide("api.github.com", "DELETE").allowed
    assert not p.decide("github.com").allowed


def test_plain_allow_wins_over_rules_and_deny_wins_over_both():
    assert rules_policy(allow=["api.github.com"]).decide("api.github.com", "POST", "/x").allowed
    d = rules_policy(deny=["*.github.com"]).decide("api.github.com", "GET", "/user")
    assert not d.allowed and d.rule == "*.github.com"
    assert not rules_policy(deny=["api.github.com"]).decide("api.github.com").allowed


def test_rules_without_methods_or_paths_mean_any():
    any_method = RequestRule.parse("a.test", None, ["/v1/*"])
    any_path = RequestRule.parse("b.test", ["POST"], None)
    p = rules_policy(rules=[any_method, any_path])
    assert p.decide("a.test", "PATCH", "/v1/x").allowed
    assert not p.decide("a.test", "PATCH", "/v2").allowed
    assert p.decide("b.test", "POST", "/anything/../at/all").allowed
    assert not p.decide("b.test", "GET", "/").allowed


def test_wildcard_rule_host():
    p = rules_policy(rules=[RequestRule.parse("*.example.com", ["GET"], None)])
    assert p.decide("a.b.example.com", "GET", "/").allowed
    assert not p.decide("badexample.com", "GET", "/").allowed


@pytest.mark.parametrize(("host", "methods", "paths"), [
    ("*", None, None), ("a.test", ["CONNECT"], None), ("a.test", ["G ET"], None),
    ("a.test", [""], None), ("a.test", None, ["no-slash"]), ("a.test", None, ["/a/../b"]),
])
def test_request_rule_parse_errors(host, methods, paths):
    with pytest.raises(ValueError):
        RequestRule.parse(host, methods, paths)


def test_parse_method():
    assert parse_method(" patch ") == "PATCH"
    with pytest.raises(ValueError, match="never allowed"):
        parse_method("connect")


# --- discover mode ----------------------------------------------------------------------------

def test_discover_allows_everything_and_says_what_enforce_would_do():
    p = rules_policy(allow=["a.test"], deny=["bad.test"], mode=DISCOVER)
    for host, method, path, would in [
        ("a.test", "GET", "/", "allow"), ("other.test", None, None, "deny"),
        ("bad.test", "GET", "/", "deny"), ("api.github.com", "POST", "/repos/acme/x", "deny"),
        ("api.github.com", "GET", "/user", "allow"),
    ]:
        d = p.decide(host, method, path)
        assert d.allowed and d.mode == DISCOVER and d.would_action == would, (host, d)
        assert d.would == rules_policy(allow=["a.test"], deny=["bad.test"]).decide(
            host, method, path)
    assert "discover" in p.decide("other.test").reason


def test_enforce_mode_decisions_carry_no_would():
    d = rules_policy().decide("other.test")
    assert d.mode == "enforce" and d.would is None and d.would_action == "deny"


def test_discover_never_relaxes_a_final_decision():
    class Final(Policy):
        def _enforce(self, host, method, path):
            return Decision(False, None, "a private address", final=True)

    p = Final(instance="x", mode=DISCOVER)
    d = p.decide("10.0.0.1")
    assert not d.allowed and d.mode == DISCOVER and d.would_action == "deny"


# --- headers ----------------------------------------------------------------------------------

def test_headers_for_matching_hosts_later_rules_win():
    p = rules_policy(headers=[
        HeaderRule.parse("*.example.com", {"X-Org": "acme", "X-Env": "prod"}),
        HeaderRule.parse("api.example.com", {"x-org": "acme-api"}),
    ])
    assert p.headers_for("API.example.com") == [("x-org", "acme-api"), ("X-Env", "prod")]
    assert p.headers_for("example.com") == [("X-Org", "acme"), ("X-Env", "prod")]
    assert p.headers_for("other.test") == []
    assert p.headers_for("not a host") == []


@pytest.mark.parametrize(("name", "value", "problem"), [
    ("X-Org", "acme", None),
    ("X Org", "acme", "not a valid header name"),
    ("Host", "evil.test", "names its host"),
    ("Transfer-Encoding", "chunked", "frames"),
    ("content-length", "0", "frames"),
    ("X-Org", "a\r\nX-Evil: 1", "line break"),
    ("X-Org", "é", "non-ASCII"),
])
def test_header_problem(name, value, problem):
    got = header_problem(name, value)
    assert (got is None) if problem is None else (problem in got)


def test_round_trip_with_rules_mode_and_headers():
    p = rules_policy(allow=["a.test"], mode=DISCOVER, rules=[GH, RequestRule.parse("b.test")],
                     headers=[HeaderRule.parse("a.test", {"X-Org": "acme"})])
    d = json.loads(json.dumps(p.to_dict()))
    assert d["rules"][0] == {"host": "api.github.com", "methods": ["GET", "HEAD"],
                             "paths": ["/repos/acme/*", "/user"]}
    assert d["rules"][1] == {"host": "b.test", "methods": None, "paths": None}
    assert d["mode"] == "discover" and d["headers"] == [{"host": "a.test",
                                                         "set": [["X-Org", "acme"]]}]
    assert Policy.from_dict(d) == p


@pytest.mark.parametrize("doc", [
    _with(mode="learn"), _with(mode=None), _with(rules={}), _with(rules=["a.test"]),
    _with(rules=[{"host": "a.test", "methods": None}]),
    _with(rules=[{"host": "a.test", "methods": [], "paths": None}]),
    _with(rules=[{"host": "a.test", "methods": ["CONNECT"], "paths": None}]),
    _with(rules=[{"host": "a.test", "methods": None, "paths": ["x"], "port": 22}]),
    _with(headers={"a.test": {}}), _with(headers=[{"host": "a.test", "set": [["Host", "x"]]}]),
    _with(headers=[{"host": "a.test", "set": [["X-A"]]}]),
])
def test_from_dict_is_strict_about_rules_mode_and_headers(doc):
    with pytest.raises(ValueError):
        Policy.from_dict(doc)


# The decision indexes names and wildcards (no scan of every pattern): it must answer
# exactly what a scan in order would, the first matching pattern included.
_IDX_LABELS = st.sampled_from(["a", "b", "c", "xn--bcher-kva", "113", "7"])
_IDX_NAMES = st.lists(_IDX_LABELS, min_size=1, max_size=4).map(".".join)


def _idx_is_ip(text):
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


_IDX_PATTERNS = st.tuples(st.booleans(), _IDX_NAMES).filter(
    lambda t: not (t[0] and _idx_is_ip(t[1]))).map(lambda t: ("*." if t[0] else "") + t[1])


def _scan(patterns, host):
    return next((str(p) for p in patterns if p.matches(host)), None)


@settings(max_examples=300, deadline=None)
@given(st.lists(_IDX_PATTERNS, max_size=8), st.lists(_IDX_PATTERNS, max_size=8),
       st.lists(_IDX_PATTERNS, max_size=4),
       st.one_of(_IDX_NAMES, st.sampled_from(["203.0.113.7", "10.0.0.1", "113.7.113.7"])))
def test_indexed_decision_equals_a_scan_in_order(allow, deny, rule_hosts, host):
    rules = [RequestRule.parse(h, ["GET"], None) for h in rule_hosts]
    pol = Policy.build("t", allow, deny, rules=rules)
    d = pol.decide(host, "GET", "/")
    if (denied := _scan(pol.deny, host)) is not None:
        assert (d.allowed, d.rule) == (False, denied)
    elif d.final:  # an address refused whatever allows it (addresses.py)
        assert _idx_is_ip(host) and not d.allowed
    elif (allowed := _scan(pol.allow, host)) is not None:
        assert (d.allowed, d.rule) == (True, allowed)
    else:
        first = next((str(r) for r in pol.rules if r.host.matches(host)), None)
        assert d.allowed == (first is not None) and d.rule == first
