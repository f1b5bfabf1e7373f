"""Names derived from an instance name, and the choice of instance subnets."""

from __future__ import annotations

import hashlib
import ipaddress

import pytest

from panopticond import plan
from panopticond.errors import PanopticonError
from panopticond.plan import Addressing, Names, choose_addressing

IFNAMSIZ = 15  # usable characters of a Linux interface name


# --- Names ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "0", "openclaw", "run-12345", "a_b-c", "z" * 32, "9" * 32])
def test_names_of_valid(name):
    n = Names.of(name)
    assert n.instance == name
    assert n.netns == f"panopticon-{name}"
    assert n.run_dir == f"/run/panopticon/{name}"
    assert n.state_dir == f"/var/lib/panopticon/{name}"
    assert n.log_dir == f"/var/log/panopticon/{name}"
    assert len(n.tag) == 8 and int(n.tag, 16) >= 0
    assert n.tag == hashlib.sha256(name.encode()).hexdigest()[:8]
    assert n.veth_host == f"pnh{n.tag}"
    assert n.veth_jail == f"pnj{n.tag}"
    for ifname in (n.veth_host, n.veth_jail):
        assert 0 < len(ifname) <= IFNAMSIZ
        assert ifname.isascii() and ifname.isalnum()
    # /run/netns/NAME is a file name.
    assert "/" not in n.netns and len(n.netns) <= 255


@pytest.mark.parametrize(
    "name",
    ["", "A", "Bot", "-a", "_a", "a.b", "a/b", "..", "a b", "z" * 33, "bücher", "a:b", "a\tb",
     "/etc", "a\x00"],
)
def test_names_of_invalid(name):
    with pytest.raises(PanopticonError) as info:
        Names.of(name)
    assert "invalid instance name" in info.value.message
    assert info.value.hint and "1-32" in info.value.hint


def test_names_of_rejects_trailing_newline():
    with pytest.raises(PanopticonError):
        Names.of("abc\n")


def test_tag_is_stable_and_distinct():
    assert Names.of("openclaw") == Names.of("openclaw")
    tags = {Names.of(f"agent{i}").tag for i in range(200)}
    assert len(tags) == 200
    assert Names.of("a").veth_host != Names.of("b").veth_host


def test_names_is_frozen():
    n = Names.of("a")
    with pytest.raises(AttributeError):
        n.netns = "other"  # type: ignore[misc]


# --- choose_addressing -------------------------------------------------------------------------

V4_POOL = "10.231.0.0/16"
V6_POOL = "fd7a:7c1d:5e2b::/48"
TAG = Names.of("openclaw").tag


def net(text: str):
    return ipaddress.ip_network(text)


def test_addressing_shape():
    a = choose_addressing(TAG, V4_POOL, V6_POOL, [])
    assert isinstance(a, Addressing)
    assert a.v4_subnet.prefixlen == plan.V4_PREFIX
    assert a.v4_subnet.subnet_of(net(V4_POOL))
    assert a.v4_host == a.v4_subnet.network_address + 1
    assert a.v4_jail == a.v4_subnet.network_address + 2
    assert a.v6_subnet is not None and a.v6_subnet.prefixlen == plan.V6_PREFIX
    assert a.v6_subnet.subnet_of(net(V6_POOL))
    assert a.v6_host == a.v6_subnet.network_address + 1
    assert a.v6_jail == a.v6_subnet.network_address + 2
    assert a.v4_host != a.v4_jail


def test_deterministic_for_a_tag():
    a = choose_addressing(TAG, V4_POOL, V6_POOL, [])
    assert choose_addressing(TAG, V4_POOL, V6_POOL, []) == a
    # Different instances tend to start at different places in the pool.
    others = {choose_addressing(Names.of(f"x{i}").tag, V4_POOL, None, []).v4_subnet
              for i in range(50)}
    assert len(others) > 40


def test_no_ipv6_pool_means_no_ipv6():
    a = choose_addressing(TAG, V4_POOL, None, [])
    assert (a.v6_subnet, a.v6_host, a.v6_jail) == (None, None, None)
    assert a.v4_subnet.subnet_of(net(V4_POOL))


def test_avoids_what_is_in_use():
    first = choose_addressing(TAG, V4_POOL, V6_POOL, [])
    used = [first.v4_subnet, first.v6_subnet]
    second = choose_addressing(TAG, V4_POOL, V6_POOL, used)
    assert not second.v4_subnet.overlaps(first.v4_subnet)
    assert not second.v6_subnet.overlaps(first.v6_subnet)


def test_avoids_routes_that_cover_the_candidate():
    first = choose_addressing(TAG, V4_POOL, None, []).v4_subnet
    # A wider route around the first candidate and a single host address inside the next.
    wide = first.supernet(new_prefix=24)
    a = choose_addressing(TAG, V4_POOL, None, [wide])
    assert not a.v4_subnet.overlaps(wide)
    host_addr = net(f"{a.v4_subnet.network_address + 5}/32")
    b = choose_addressing(TAG, V4_POOL, None, [wide, host_addr])
    assert not b.v4_subnet.overlaps(wide) and not b.v4_subnet.overlaps(host_addr)


def test_other_family_in_use_is_ignored():
    a = choose_addressing(TAG, V4_POOL, V6_POOL, [])
    b = choose_addressing(TAG, V4_POOL, V6_POOL, [net("fd00::/64")])
    assert a.v4_subnet == b.v4_subnet
    c = choose_addressing(TAG, V4_POOL, None, [net("::/0")])
    assert c.v4_subnet == a.v4_subnet


def test_uplink_documentation_range_outside_the_pool_does_not_matter():
    a = choose_addressing(TAG, V4_POOL, V6_POOL, [net("192.0.2.0/24"), net("fd00::/64")])
    assert a == choose_addressing(TAG, V4_POOL, V6_POOL, [])


def test_single_subnet_pool():
    a = choose_addressing(TAG, "10.9.9.8/29", "fd00:1:2:3::/64", [])
    assert a.v4_subnet == net("10.9.9.8/29")
    assert a.v6_subnet == net("fd00:1:2:3::/64")


@pytest.mark.parametrize(
    ("v4", "v6", "what"),
    [
        ("10.9.9.8/30", None, "/29"),
        ("10.9.9.9/32", None, "/29"),
        ("10.9.0.0/16", "fd00:1:2:3::/96", "/64"),
    ],
)
def test_pool_too_small(v4, v6, what):
    with pytest.raises(PanopticonError) as info:
        choose_addressing(TAG, v4, v6, [])
    assert "smaller than one instance subnet" in info.value.message
    assert what in info.value.message
    assert info.value.hint and "pool" in info.value.hint


def test_exhausted_pool():
    pool = "10.9.9.0/28"  # two /29s
    with pytest.raises(PanopticonError) as info:
        choose_addressing(TAG, pool, None, [net("10.9.9.0/29"), net("10.9.9.8/29")])
    e = info.value
    assert "no free /29 left in pool 10.9.9.0/28" in e.message
    assert e.hint and "another pool" in e.hint
    # One left: it is chosen whatever the tag.
    for i in range(10):
        a = choose_addressing(Names.of(f"t{i}").tag, pool, None, [net("10.9.9.0/29")])
        assert a.v4_subnet == net("10.9.9.8/29")


def test_pool_covered_by_a_route_is_exhausted():
    with pytest.raises(PanopticonError, match="no free /29"):
        choose_addressing(TAG, V4_POOL, None, [net("10.0.0.0/8")])
    with pytest.raises(PanopticonError, match="no free /64"):
        choose_addressing(TAG, V4_POOL, V6_POOL, [net("fd00::/8")])


def test_many_instances_get_disjoint_subnets():
    used: list = []
    for i in range(64):
        a = choose_addressing(Names.of(f"i{i}").tag, "10.50.0.0/23", "fd00:50::/58", used)
        assert not any(a.v4_subnet.overlaps(u) for u in used if u.version == 4)
        assert not any(a.v6_subnet.overlaps(u) for u in used if u.version == 6)
        used += [a.v4_subnet, a.v6_subnet]
    with pytest.raises(PanopticonError):
        choose_addressing(Names.of("one-more").tag, "10.50.0.0/23", None, used)
