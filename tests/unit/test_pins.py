import pytest

from panopticond.pins import PinTable, canonical_ip


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def table(**kw):
    clock = Clock()
    return PinTable(clock=clock, **kw), clock


def test_pins_live_for_their_ttl_within_bounds():
    t, clock = table(min_ttl=60, max_ttl=600)
    t.add("a.example", ["198.51.100.1"], ttl=5)  # raised to 60
    t.add("b.example", ["198.51.100.2"], ttl=86400)  # lowered to 600
    clock.now += 59
    assert t.has("a.example", "198.51.100.1")
    clock.now += 2
    assert not t.has("a.example", "198.51.100.1") and t.addresses("a.example") == []
    clock.now += 538
    assert t.addresses("b.example") == ["198.51.100.2"]
    clock.now += 1
    assert t.addresses("b.example") == [] and len(t) == 0


def test_a_refresh_extends_and_addresses_are_canonical():
    t, clock = table(min_ttl=10, max_ttl=10)
    t.add("a.example", ["2001:DB8:0::1", "198.51.100.1"], ttl=10)
    assert t.addresses("a.example") == ["2001:db8::1", "198.51.100.1"]
    assert t.has("a.example", "2001:db8:0:0::1")
    clock.now += 8
    t.add("a.example", ["198.51.100.1"], ttl=10)
    clock.now += 5
    assert t.addresses("a.example") == ["198.51.100.1"]


def test_reverse_lookup():
    t, _ = table()
    t.add("a.example", ["198.51.100.1"], ttl=60)
    t.add("b.example", ["198.51.100.1", "198.51.100.2"], ttl=60)
    assert t.names_for("198.51.100.1") == ["a.example", "b.example"]
    assert t.names_for("198.51.100.9") == [] and t.names_for("junk") == []
    assert not t.has("a.example", "junk")


def test_bounded_the_least_recently_refreshed_goes_first():
    t, _ = table(max_entries=3)
    for i in range(3):
        t.add(f"{i}.example", [f"198.51.100.{i}"], ttl=60)
    t.add("0.example", ["198.51.100.0"], ttl=60)  # refreshed: now the newest
    t.add("3.example", ["198.51.100.3"], ttl=60)
    assert len(t) == 3
    assert t.addresses("1.example") == [] and t.names_for("198.51.100.1") == []
    assert t.addresses("0.example") == ["198.51.100.0"]


def test_bounds_are_checked():
    with pytest.raises(ValueError):
        PinTable(min_ttl=10, max_ttl=5)
    with pytest.raises(ValueError):
        canonical_ip("a.example")
    assert canonical_ip("fe80::1%eth0") == "fe80::1"


def test_about_and_add_exact():
    t, clock = table(min_ttl=300, max_ttl=600)
    t.add("a.example", ["198.51.100.1", "198.51.100.2"], 0)
    t.add("b.example", ["198.51.100.1"], 0)
    assert t.about("a.example", "198.51.100.1") == [
        ("a.example", "198.51.100.1", 300), ("a.example", "198.51.100.2", 300),
        ("b.example", "198.51.100.1", 300)]
    assert t.about(None, "bogus") == [] and t.about("a.example", limit=1) == [
        ("a.example", "198.51.100.1", 300)]
    copy, clock2 = table(min_ttl=300, max_ttl=600)
    copy.add_exact("a.example", "198.51.100.1", 10)  # below min_ttl: kept as given
    copy.add_exact("a.example", "198.51.100.2", 10_000)  # above max_ttl: capped
    assert copy.about("a.example") == [("a.example", "198.51.100.1", 10),
                                       ("a.example", "198.51.100.2", 600)]
    clock2.now += 11
    assert copy.addresses("a.example") == ["198.51.100.2"]
