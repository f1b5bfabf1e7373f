"""instance: the pure helpers of reload (what needs a restart, what narrows a policy)."""

from __future__ import annotations

import dataclasses

from panopticond import config
from panopticond.instance import policy_narrowed, restart_only_changes

BASE = '[agents.a]\ncommand = ["x"]\nuser = "agent"\nallow = ["a.example"]\nhealth = "127.0.0.1:9180"\n'


def test_only_policy_changes_need_no_restart():
    old = config.loads(BASE)
    new = config.loads(BASE.replace('["a.example"]', '["a.example", "b.example"]'))
    assert restart_only_changes(old, old.agents["a"], new, new.agents["a"]) == []
    new = config.loads('[network]\nipv6 = false\n' + BASE.replace('["x"]', '["y"]')
                       .replace("9180", "9181"))
    assert restart_only_changes(old, old.agents["a"], new, new.agents["a"]) == [
        "agents.a.command", "agents.a.health", "network.ipv6"]


def test_narrowing():
    p = {"version": 1, "instance": "a", "allow": ["a.example", "b.example"], "deny": [],
         "allow_hint": "x"}
    assert not policy_narrowed(p, dict(p, allow=p["allow"] + ["c.example"]))
    assert not policy_narrowed(p, dict(p, allow_hint="y"))
    assert policy_narrowed(p, dict(p, allow=["a.example"]))
    assert policy_narrowed(p, dict(p, deny=["a.example"]))
    assert policy_narrowed(p, dict(p, mode="enforce"))  # anything else: assume narrower
    assert dataclasses.is_dataclass(config.loads(BASE).agents["a"])
