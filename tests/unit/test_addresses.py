import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from panopticond import addresses, rules
from panopticond.addresses import (
    BLOCKED_RANGES,
    AddressGuard,
    blocked_networks,
    embedded_ipv4,
    parse_network,
)

HOST = ipaddress.ip_network("203.0.113.2/32")
POOL = ipaddress.ip_network("10.231.0.0/16")


@pytest.mark.parametrize("address", [
    "127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "100.64.0.1", "169.254.169.254",
    "0.0.0.0", "224.0.0.251", "255.255.255.255", "198.18.0.1", "192.0.0.8",
    "::1", "::", "fd00:ec2::254", "fe80::1", "fe80::1%eth0", "ff02::1", "fc00::1", "fec0::1",
    # IPv4 carried in IPv6: mapped, compatible, NAT64, 6to4, Teredo.
    "::ffff:127.0.0.1", "::ffff:169.254.169.254", "::10.0.0.1", "64:ff9b::a9fe:a9fe",
    "64:ff9b:1::a00:1", "2002:a9fe:a9fe::1", "2001:0:4136:e378:8000:63bf:f5ff:fffe",
])
def test_never_reached(address):
    assert AddressGuard().refusal(address)


@pytest.mark.parametrize("address", [
    "198.51.100.10", "203.0.113.9", "192.0.2.1", "2001:db8::1", "2001:db8:10::10",
    "8.8.8.8", "2606:4700::1111",
])
def test_public_and_documentation_addresses_pass(address):
    assert AddressGuard().refusal(address) is None


def test_the_reason_names_the_range_and_the_carried_address():
    g = AddressGuard(allowed=[parse_network("2001::/32")])
    assert "link-local (cloud metadata)" in AddressGuard().refusal("169.254.169.254")
    teredo = "2001:0:4136:e378:8000:63bf:f5ff:fffe"  # Teredo, client 10.0.0.1
    assert "a form of 10.0.0.1, which is private (RFC 1918)" in g.refusal(teredo)
    assert AddressGuard().refusal("not-an-ip") == "'not-an-ip' is not an IP address"


def test_operator_networks_open_ranges_but_never_the_host():
    g = AddressGuard(allowed=[parse_network("10.99.0.0/24"), parse_network("203.0.113.0/24")],
                     extra=[HOST, POOL])
    assert g.refusal("10.99.0.5") is None
    assert g.refusal("10.99.1.5")
    assert "of the host" in g.refusal("203.0.113.2")
    assert g.refusal("10.231.4.1")
    # The mapped form stays refused: its own range is not allowed.
    assert g.refusal("::ffff:10.99.0.5")


def test_embedded_ipv4():
    e = lambda a: embedded_ipv4(ipaddress.ip_address(a))  # noqa: E731
    assert e("::ffff:1.2.3.4") == ipaddress.ip_address("1.2.3.4")
    assert e("64:ff9b::102:304") == ipaddress.ip_address("1.2.3.4")
    assert e("2002:102:304::") == ipaddress.ip_address("1.2.3.4")
    assert e("::1") is None and e("::") is None
    assert e("2001:db8::1") is None and e("1.2.3.4") is None


@pytest.mark.parametrize("text, problem", [
    ("10.1.2.3/24", "did you mean '10.1.2.0/24'"),
    ("0.0.0.0/0", "covers 127.0.0.0/8"),
    ("127.0.0.1", "covers 127.0.0.0/8"),
    ("::1", "covers ::/127"),
    ("::/0", "covers ::/127"),
    ("nonsense", "not an address or a network"),
])
def test_parse_network_refuses(text, problem):
    with pytest.raises(ValueError, match=problem):
        parse_network(text)


def test_parse_network_accepts_addresses_and_networks():
    assert str(parse_network(" 10.20.0.0/16 ")) == "10.20.0.0/16"
    assert str(parse_network("198.51.100.7")) == "198.51.100.7/32"
    assert str(parse_network("fd00::/8")) == "fd00::/8"


def test_rules_use_the_same_list():
    assert rules.BLOCKED_RANGES is BLOCKED_RANGES
    assert blocked_networks(4) == list(BLOCKED_RANGES[4])
    assert blocked_networks(6) == list(BLOCKED_RANGES[6])


def test_blocked_networks_subtracts_allowed_and_adds_extra():
    nets = blocked_networks(4, [parse_network("10.99.0.0/24")], [HOST, POOL])
    covered = [ipaddress.ip_network(n) for n in nets]
    inside = lambda a: any(ipaddress.ip_address(a) in n for n in covered)  # noqa: E731
    assert not inside("10.99.0.1") and inside("10.99.1.1") and inside("10.0.0.1")
    assert inside("203.0.113.2") and inside("10.231.0.9") and not inside("198.51.100.1")
    # An allowed network never shrinks the host's own addresses.
    nets = blocked_networks(4, [parse_network("203.0.113.0/24")], [HOST])
    assert "203.0.113.2/32" in nets


_v4 = st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address)
_v6 = st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address)
# Bias towards the interesting ranges.
_near = st.sampled_from([n for fam in (4, 6) for n in BLOCKED_RANGES[fam]]).flatmap(
    lambda n: st.integers(0, ipaddress.ip_network(n).num_addresses - 1).map(
        lambda i, n=n: ipaddress.ip_network(n)[i]))
_addr = st.one_of(_v4, _v6, _near)
_allowed = st.lists(st.one_of(
    st.tuples(_near, st.integers(8, 32)), st.tuples(_v4, st.integers(8, 32)),
).map(lambda t: ipaddress.ip_network(f"{t[0]}/{t[1] if t[0].version == 4 else t[1] * 4}",
                                     strict=False)), max_size=3)


@settings(max_examples=300, deadline=None)
@given(_addr, _allowed)
def test_the_kernel_and_the_proxy_agree(address, allowed):
    """What the L3 rules refuse the proxy refuses too; the proxy refuses more only for the
    IPv4 that an IPv6 address carries, which no netmask can see."""
    allowed = [n for n in allowed if not any(n.overlaps(x) for x in (
        ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("0.0.0.0/8")))]
    guard = AddressGuard(allowed=allowed, extra=[HOST])
    l3 = [ipaddress.ip_network(n) for n in blocked_networks(address.version, allowed, [HOST])]
    by_l3 = any(address in n for n in l3)
    by_proxy = guard.refusal(address) is not None
    if by_l3:
        assert by_proxy
    elif by_proxy:
        inner = embedded_ipv4(address)
        assert inner is not None and guard.refusal(inner)


def test_guard_remembers_answers_and_stays_bounded(monkeypatch):
    monkeypatch.setattr(addresses, "_KNOWN_MAX", 3)
    g = addresses.AddressGuard()
    assert g.refusal("127.0.0.1") == g.refusal("127.0.0.1") is not None
    assert g.refusal("198.51.100.7") is None
    assert g.refusal("not an address") is not None
    for i in range(10):
        assert g.refusal(f"203.0.113.{i}") is None
    assert len(g._known) <= 3
    assert g.refusal("127.0.0.1") is not None  # forgotten, answered again the same
