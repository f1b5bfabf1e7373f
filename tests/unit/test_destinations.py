import json
import types

import pytest

from panopticond.destinations import (
    Destinations,
    PortRule,
    check_port,
    decide_dns,
    decide_passthrough,
    decide_port,
    of_agent,
)
from panopticond.policy import Policy

DEST = Destinations.build(["10.99.0.0/24", "198.51.100.11"], ["*.pinned.example"],
                          [("git.example", 22), ("*.ssh.example", 2222), ("198.51.100.30", 22)])


def policy(allow=("www.allowed.example",), deny=("bad.pinned.example",), dest=DEST):
    return Policy.build("x", list(allow), list(deny), destinations=dest)


def test_build_canonicalises_and_dedupes():
    d = Destinations.build(["10.0.0.0/8", "10.0.0.0/8", "2001:DB8::1"], ["*.A.example"],
                           [("Git.Example.", 22), ("git.example", 22)])
    assert [str(n) for n in d.allow_cidrs] == ["10.0.0.0/8", "2001:db8::1/128"]
    assert [str(p) for p in d.passthrough] == ["*.a.example"]
    assert d.ports == (PortRule.parse("git.example", 22),)
    assert str(d.ports[0]) == "git.example port 22"
    assert DEST.tcp_ports == (22, 2222)


@pytest.mark.parametrize("port, problem", [
    (53, "DNS"), (80, "HTTP"), (443, "HTTPS"), (0, "not a port"), (70000, "not a port"),
    (True, "not a port"), ("22", "not a port"),
])
def test_check_port(port, problem):
    with pytest.raises(ValueError, match=problem):
        check_port(port)


def test_round_trip_is_exact_and_strict():
    d = json.loads(json.dumps(DEST.to_dict()))
    assert Destinations.from_dict(d) == DEST
    p = policy()
    assert Policy.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    for bad in ({}, {**d, "x": 1}, {**d, "ports": [{"host": "a.example"}]},
                {**d, "allow_cidrs": "10.0.0.0/8"}, {**d, "allow_cidrs": ["127.0.0.1"]},
                {**d, "ports": [{"host": "a.example", "port": 80}]}):
        with pytest.raises(ValueError):
            Destinations.from_dict(bad)


def test_ip_literals_need_an_operator_allowance():
    p = policy()
    assert p.decide("10.99.0.5").allowed and p.decide("10.99.0.5").rule == "10.99.0.0/24"
    assert p.decide("198.51.100.11").allowed
    assert not p.decide("198.51.100.12").allowed
    # A private address is refused whatever allows it, in any mode, unless allow_cidrs does.
    d = Policy.build("x", ["10.1.2.3"], [], mode="discover").decide("10.1.2.3")
    assert not d.allowed and d.final and "private" in d.reason


def test_dns_answers_for_passthrough_and_port_rule_names_deny_wins():
    p = policy()
    assert decide_dns(p, "www.allowed.example").allowed
    assert decide_dns(p, "a.pinned.example").rule == "passthrough *.pinned.example"
    assert decide_dns(p, "git.example").rule == "git.example port 22"
    assert decide_dns(p, "h.ssh.example").allowed
    assert not decide_dns(p, "bad.pinned.example").allowed
    assert not decide_dns(p, "other.example").allowed
    assert not decide_dns(policy(dest=None), "a.pinned.example").allowed


def test_passthrough_is_only_for_passthrough_names():
    p = policy()
    assert decide_passthrough(p, "A.Pinned.Example.").allowed
    assert not decide_passthrough(p, "www.allowed.example").allowed
    assert decide_passthrough(p, "bad.pinned.example").rule == "bad.pinned.example"
    assert not decide_passthrough(p, "bad name").allowed
    # Passthrough names are not thereby allowed for HTTP.
    assert not p.decide("a.pinned.example").allowed


def test_port_rules_match_host_and_port():
    p = policy()
    assert decide_port(p, "git.example", 22).allowed
    assert not decide_port(p, "git.example", 2222).allowed
    assert decide_port(p, "a.ssh.example", 2222).allowed
    assert decide_port(p, "198.51.100.30", 22).allowed
    assert not decide_port(p, "www.allowed.example", 22).allowed
    assert not decide_port(policy(deny=["git.example"]), "git.example", 22).allowed


def test_of_agent():
    a = types.SimpleNamespace(allow_cidrs=(), passthrough=(), ports=())
    assert of_agent(a) is None
    a = types.SimpleNamespace(allow_cidrs=("10.0.0.0/8",), passthrough=(),
                              ports=(("g.example", 22),))
    assert of_agent(a) == Destinations.build(["10.0.0.0/8"], [], [("g.example", 22)])
