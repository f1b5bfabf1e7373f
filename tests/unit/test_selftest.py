"""selftest: choosing what to probe, and judging what the probe saw (pure parts)."""

from __future__ import annotations

from panopticond.selftest import FALLBACK_OUTSIDE, Targets, allowed_target, choose_targets, judge


def allows_from(patterns):
    def allows(host):
        for p in patterns:
            base = p[2:] if p.startswith("*.") else p
            if host == base or (p.startswith("*.") and host.endswith("." + base)):
                return True
        return False
    return allows


def test_the_allowed_target_prefers_an_exact_name_then_a_wildcard_base_then_an_address():
    allow = ["203.0.113.7", "*.example.com", "api.example.org"]
    assert allowed_target(allow, allows_from(allow)) == "api.example.org"
    assert allowed_target(allow[:2], allows_from(allow)) == "example.com"
    assert allowed_target(allow[:1], allows_from(allow)) == "203.0.113.7"
    assert allowed_target([], allows_from([])) is None
    # A pattern that a deny overrides is not a target.
    assert allowed_target(["a.example"], lambda h: False) is None


def test_outside_addresses_are_the_resolvers_else_documentation_addresses():
    t = choose_targets(["x.example"], allows_from(["x.example"]), ["9.9.9.9"], token="t")
    assert t.outside == {"4": "9.9.9.9", "6": FALLBACK_OUTSIDE["6"]}
    t = choose_targets([], allows_from([]), ["2620:fe::fe", "9.9.9.9", "1.1.1.1"])
    assert t.outside == {"4": "9.9.9.9", "6": "2620:fe::fe"}
    assert t.denied and len(t.token) == 12


def test_the_denied_name_is_one_the_policy_denies():
    t = choose_targets(["*.invalid"], allows_from(["*.invalid"]), [])
    assert t.denied == "panopticon-selftest.test"
    # Discover mode allows everything: there is no denial to test.
    assert choose_targets([], lambda h: True, []).denied is None


T = Targets("api.example.org", "panopticon.invalid", {"4": "9.9.9.9", "6": "2620:fe::fe"}, "tok")
DENIAL = "panopticon: blocked request to panopticon.invalid: not in the allowlist.\n"


def good() -> dict:
    dns = {"a_denied": {"answered": True, "rcode": 3, "answers": 0},
           "txt_denied": {"answered": True, "rcode": 5, "answers": 0}}
    r = {"allowed": {"status": 404, "body": "not found"},
         "denied_https": {"status": 403, "body": DENIAL},
         "denied_dns": {"resolved": False, "error": "Name or service not known"}}
    for fam in ("4", "6"):
        r[f"direct_tcp_{fam}"] = {"connected": False, "error": "ConnectionRefusedError"}
        r[f"udp_{fam}"] = {"answered": False, "outcomes": {}}
        r[f"dns_{fam}"] = {k: dict(v) for k, v in dns.items()}
    return r


def test_everything_as_expected_passes():
    out = judge(good(), T)
    assert out.passed and out.summary() == "passed"


def test_a_connection_an_answer_or_a_resolution_outside_is_a_leak():
    for key, value in [("direct_tcp_4", {"connected": True}),
                       ("udp_6", {"answered": True, "outcomes": {"443": "answered"}}),
                       ("denied_dns", {"resolved": True, "addresses": ["198.51.100.20"]}),
                       ("denied_https", {"tls_error": "certificate verify failed"}),
                       ("denied_https", {"status": 200, "body": "hello"})]:
        r = good()
        r[key] = value
        out = judge(r, T)
        assert out.hard and not out.passed, (key, out)
    r = good()
    r["dns_4"]["txt_denied"] = {"answered": True, "rcode": 0, "answers": 1}
    assert judge(r, T).hard


def test_a_proxy_not_serving_yet_is_soft():
    r = good()
    r["denied_https"] = {"error": "ConnectionRefusedError: [Errno 111]"}
    r["allowed"] = {"error": "timed out"}
    out = judge(r, T)
    assert not out.hard and len(out.soft) == 2
    r = good()
    r["denied_https"] = {"status": 403, "body": DENIAL + "The proxy has no valid policy"}
    assert judge(r, T).soft and not judge(r, T).hard


def test_the_allowed_probe_denied_by_the_proxy_fails_and_a_gateway_error_is_a_note():
    r = good()
    r["allowed"] = {"status": 403, "body": "panopticon: blocked request to api.example.org"}
    assert judge(r, T).soft
    r["allowed"] = {"status": 502, "body": "Bad Gateway"}
    out = judge(r, T)
    assert out.passed and "502" in out.summary()


def test_missing_results_never_pass():
    out = judge({}, T)
    assert not out.passed and not out.hard
    assert judge(good(), Targets(None, None, T.outside, "t")).passed
