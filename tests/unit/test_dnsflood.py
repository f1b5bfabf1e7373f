import random
import string

from panopticond.dnsflood import LabelFlood, entropy


class Clock:
    now = 0.0

    def __call__(self):
        return self.now


def data_name(rng, domain="attacker.example"):
    return "".join(rng.choice(string.ascii_lowercase + "234567") for _ in range(32)) + "." + domain


def test_entropy():
    assert entropy("") == 0 and entropy("aaaa") == 0
    assert abs(entropy("abcd") - 2.0) < 1e-9


def test_hex_and_base32_labels_are_suspicious_every_time():
    f = LabelFlood()
    rng = random.Random(3)
    for _ in range(2000):
        label = "".join(rng.choice("0123456789abcdef") for _ in range(32))
        assert f.suspicious(f"{label}.attacker.example") == "attacker.example", label
    assert f.suspicious(data_name(rng)) == "attacker.example"


def test_ordinary_names_are_not_suspicious():
    f = LabelFlood()
    for name in ("www.example.com", "api.github.com", "mail-server-01.corp.example.co.uk",
                 "registry.npmjs.org", "a.b.c.example"):
        assert f.suspicious(name) is None, name


def test_a_flood_under_one_domain_alerts_once_per_window():
    rng = random.Random(1)
    clock = Clock()
    f = LabelFlood(threshold=5, window=60, clock=clock)
    assert f.suspicious(data_name(rng)) == "attacker.example"
    alerts = []
    for _ in range(12):
        clock.now += 1
        alerts.append(f.observe(data_name(rng)))
    fired = [a for a in alerts if a]
    assert len(fired) == 1 and "under attacker.example" in fired[0]
    assert alerts.index(fired[0]) == 4
    clock.now += 61
    for _ in range(4):
        assert f.observe(data_name(rng)) is None  # the window emptied
    assert f.observe(data_name(rng))


def test_the_same_name_asked_again_is_not_a_flood():
    rng = random.Random(4)
    clock = Clock()
    f = LabelFlood(threshold=3, window=60, clock=clock)
    name = data_name(rng)
    assert not any(f.observe(name) for _ in range(10))


def test_slow_drips_and_other_domains_do_not_add_up():
    rng = random.Random(2)
    clock = Clock()
    f = LabelFlood(threshold=3, window=10, clock=clock)
    for i in range(10):
        clock.now += 6
        assert f.observe(data_name(rng, f"d{i % 5}.example")) is None
