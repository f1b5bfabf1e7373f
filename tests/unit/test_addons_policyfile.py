import json
import logging
import os

import pytest

from panopticond.addons.policyfile import PolicyFile
from panopticond.policy import Policy


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def write(path, allow=(), deny=(), instance="x"):
    path.write_text(json.dumps(Policy.build(instance, list(allow), list(deny)).to_dict()))


def swap(path, allow=(), deny=()):
    """Replace the file the way the daemon does: write a temporary, rename over."""
    tmp = path.with_name(path.name + ".new")
    write(tmp, allow, deny)
    os.replace(tmp, path)


@pytest.fixture
def clock():
    return Clock()


def test_loads_and_decides(tmp_path, clock):
    p = tmp_path / "policy.json"
    write(p, allow=["api.example"])
    pf = PolicyFile(clock=clock)
    pf.load(str(p))
    assert pf.policy is not None and pf.error is None
    assert pf.decide("api.example").allowed
    assert not pf.decide("other.example").allowed


@pytest.mark.parametrize(
    "content, why",
    [
        (None, "cannot read"),
        ("", "is empty"),
        ("   \n", "is empty"),
        ("{not json", "not a valid policy"),
        ('{"version": 99, "instance": "x", "allow": [], "deny": []}', "not a valid policy"),
        ('{"version": 1, "instance": "x", "allow": ["*"], "deny": []}', "not a valid policy"),
        ("[1, 2]", "not a valid policy"),
        (b"\xff\xfe", "not a valid policy"),
    ],
)
def test_missing_or_broken_file_denies_everything(tmp_path, clock, caplog, content, why):
    p = tmp_path / "policy.json"
    if isinstance(content, bytes):
        p.write_bytes(content)
    elif content is not None:
        p.write_text(content)
    pf = PolicyFile(clock=clock)
    with caplog.at_level(logging.ERROR):
        pf.load(str(p))
    assert pf.policy is None
    assert why in pf.error
    d = pf.decide("anything.example")
    assert not d.allowed and d.reason == "no valid policy is loaded"
    assert any(why in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)


def test_no_path_denies_everything(clock):
    pf = PolicyFile(clock=clock)
    pf.load("")
    assert not pf.decide("api.example").allowed
    assert "no policy file is configured" in pf.error


def test_swap_by_rename_is_picked_up_after_the_interval(tmp_path, clock):
    p = tmp_path / "policy.json"
    write(p, allow=["old.example"])
    pf = PolicyFile(clock=clock)
    pf.load(str(p))
    swap(p, allow=["new.example"])
    # Within the interval the file is not looked at.
    clock.now += 0.5
    assert pf.decide("old.example").allowed
    clock.now += 0.6
    assert pf.decide("new.example").allowed
    assert not pf.decide("old.example").allowed


def test_swap_to_an_invalid_file_denies_everything_then_recovers(tmp_path, clock, caplog):
    p = tmp_path / "policy.json"
    write(p, allow=["api.example"])
    pf = PolicyFile(clock=clock)
    pf.load(str(p))
    tmp = tmp_path / "broken"
    tmp.write_text("{")
    os.replace(tmp, p)
    clock.now += 1
    with caplog.at_level(logging.ERROR):
        assert not pf.decide("api.example").allowed
        clock.now += 1
        assert not pf.decide("api.example").allowed
    # The same failure is logged once, not every second.
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 1
    swap(p, allow=["api.example"])
    clock.now += 1
    assert pf.decide("api.example").allowed


def test_removed_file_denies_everything(tmp_path, clock):
    p = tmp_path / "policy.json"
    write(p, allow=["api.example"])
    pf = PolicyFile(clock=clock)
    pf.load(str(p))
    p.unlink()
    clock.now += 1
    assert not pf.decide("api.example").allowed


def test_unchanged_file_is_not_reparsed(tmp_path, clock, monkeypatch):
    p = tmp_path / "policy.json"
    write(p, allow=["api.example"])
    pf = PolicyFile(clock=clock)
    pf.load(str(p))
    first = pf.policy
    clock.now += 5
    pf.current()
    assert pf.policy is first
