"""The attack suite's vocabulary: attacks as data, the jail run that carries them out, and
the oracle that judges them without trusting panopticon.

A test module declares its attacks at import time with `attack(...)`; the session's jail
(one per `jail` name, see conftest.py) runs every declared attack in one agent process
(`attack_agent.py`), with packet captures running on both sides of the simulated host.
Each attack is then one test (`params()` + `judge()`):

* the agent's own view must match `expect` (a refusal, a 403, an NXDOMAIN ...);
* its tag (the run's random canary + the attack's number) must appear nowhere outside the
  jail: not in any event of the lab's servers (HTTP, TLS, DNS, the catch-all on every
  port, the simulated host's own services) and not in either packet capture;
* a positive control (`control=True`) carries a different canary and must arrive, so a
  broken lab, jail or capture cannot make the suite pass.
"""

from __future__ import annotations

import dataclasses
import json
import pwd
from collections.abc import Callable
from typing import Any

import pytest

try:
    PROXY_UID, PROXY_GID = pwd.getpwnam("panopticon-proxy")[2:4]
except KeyError:  # not installed: the root tests are skipped or fail on their own
    PROXY_UID = PROXY_GID = -1

# The simulated internet the attacks aim at (beside the lab's DEFAULT_NAMES and jailrun's
# one-family names); conftest.attack_lab builds it.
HOST_V4, HOST_V6 = "203.0.113.2", "2001:db8:ffff::2"  # the simulated host (lab.HOST_V4/6)
WWW = "www.allowed.example"
DEFAULT_WWW = ("198.51.100.10", "2001:db8:10::10")  # its addresses in the lab's zone
DENIED = "denied.example"
CDN = ("198.51.100.80", "2001:db8:80::80")
CDN_ALLOWED, CDN_DENIED = "a.cdn.example", "b.cdn.example"
# Names a careless matcher of "*.wild.example" or "a.cdn.example" would let through;
# all served by the CDN, which answers only for the sites it knows.
HOMOGRAPHS = ("w\u0456ld.example", "\u0430.cdn.example")  # Cyrillic i and a
LOOKALIKES = ["evilwild.example", "wild.example.evil.test", "x.wild.example.evil.test",
              "a.cdn.example.evil.test", "aa.cdn.example",
              *(h.encode("idna").decode() for h in HOMOGRAPHS)]
CDN_SITES = [CDN_ALLOWED, CDN_DENIED, "x.wild.example", "wild.example", "dns.wild.example",
             *LOOKALIKES]
LAN = "10.20.0.5"
UPLOAD = ("up.allowed.example", "198.51.100.30")
PINNED = ("a.pinned.example", "198.51.100.50")
# Allowed names that resolve where no one may go (9, 17): name -> (v4, v6, served).
BAD_TARGETS = {
    "meta.wild.example": ("169.254.169.254", None, True),
    "v6meta.wild.example": (None, "fd00:ec2::254", True),
    "lan.wild.example": (LAN, None, True),
    "loop.wild.example": ("127.0.0.1", "::1", False),
    "host.wild.example": (HOST_V4, None, False),
    "mapped.wild.example": (None, "::ffff:169.254.169.254", False),
    "cgnat.wild.example": ("100.64.0.7", None, False),
}
REBIND = "rb.wild.example"  # first www's address, then the metadata service's

REGISTRY: dict[str, list[Attack]] = {}
LIVE: dict[str, list[Callable]] = {}
_COUNT = [0]


@dataclasses.dataclass
class Attack:
    id: str
    item: int
    name: str
    kind: str
    args: dict[str, Any]
    control: bool = False
    serial: bool = False
    # The agent's view: a predicate over its outcome dict, with a label for the report.
    expect: Callable[[dict], bool] | None = None
    # Where the tag may legitimately show up ("none": nowhere). A dict: lab events
    # carrying the tag must match it (and the captures are not searched: the allowed
    # part of the request crossed the wire in clear). "paths": no event may carry the
    # tag in its path (it may ride inside a refused request's body).
    may_reach: str | dict = "none"
    xfail: str | None = None

    def plan(self) -> dict:
        return {"id": self.id, "kind": self.kind, "args": self.args,
                "control": self.control, "serial": self.serial}


def attack(item: int, title: str, kind: str, /, *, jail: str = "main", control: bool = False,
           serial: bool = False, expect: Callable[[dict], bool] | None = None,
           may_reach: str | dict = "none", xfail: str | None = None, **args: Any) -> Attack:
    """Declare one attack (or positive control) of catalogue `item` for `jail`'s run."""
    _COUNT[0] += 1
    a = Attack(f"n{_COUNT[0]:03d}", item, title, kind, args, control, serial, expect,
               may_reach, xfail)
    REGISTRY.setdefault(jail, []).append(a)
    return a


def live(jail: str = "main"):
    """Register `fn(lab, run)` to run from the test's side while `jail` is up; its return
    value is kept in `run.live[fn.__name__]`."""
    def wrap(fn):
        LIVE.setdefault(jail, []).append(fn)
        return fn
    return wrap


def params(module: str, jail: str = "main") -> list:
    """The attacks a module declared, as pytest params marked with their threat item."""
    out = []
    for a in REGISTRY.get(jail, []):
        if a.args.get("_module", module) != module or a.args.get("judged") is False:
            continue
        marks = [pytest.mark.threat(a.item, ("control: " if a.control else "") + a.name)]
        if a.xfail:
            marks.append(pytest.mark.xfail(strict=True, reason=a.xfail))
        out.append(pytest.param(a, id=f"{a.item}-{a.name}".replace(" ", "_"), marks=marks))
    return out


def declare_module(module: str):
    """`attack` bound to a module, so that `params(module)` finds its attacks only."""
    def bound(item: int, title: str, kind: str, /, **kw: Any) -> Attack:
        kw["_module"] = module
        return attack(item, title, kind, **kw)
    return bound


@dataclasses.dataclass
class Run:
    """What one jail run left: the agent's outcomes and every independent record."""

    canary: str
    control: str
    results: dict[str, dict]
    events: list[dict]
    net: bytes  # capture on the internet's end of the link
    host: bytes  # capture on every interface of the simulated host
    log: list[dict]  # panopticon's own request log (judged, never trusted as an oracle)
    log_text: str
    stderr: str
    name: str
    live: dict[str, Any]
    vars: dict[str, Any]

    def tag(self, a: Attack) -> str:
        return (self.control if a.control else self.canary) + a.id

    def events_with(self, needle: str) -> list[dict]:
        return [e for e in self.events if needle in json.dumps(e)]

    def trace(self, needle: str, captures: bool = True) -> list[str]:
        """Every place outside the jail where `needle` was seen."""
        found = [f"{e['kind']} event at {e['server_ip']}:{e['port']}"
                 + (" (catch-all)" if e.get("catchall") else "")
                 + (" (simulated host)" if e.get("origin") == "host" else "")
                 for e in self.events_with(needle)]
        if captures:
            data = needle.encode()
            found += [f"{where} capture" for where, cap in (("internet", self.net),
                                                             ("host", self.host))
                      if data in cap]
        return found


def judge(run: Run, a: Attack) -> None:
    """Assert an attack failed without a trace, or a control succeeded and arrived."""
    r = run.results.get(a.id)
    assert r is not None, f"the agent did not report {a.id}"
    tag = run.tag(a)
    if a.control:
        assert r.get("ok"), r
        if a.expect is not None:
            assert a.expect(r), f"control {a.name}: unexpected outcome {r}"
        assert run.events_with(tag), f"control {a.name} never arrived: {r}"
        return
    if a.expect is not None:
        assert a.expect(r), f"{a.name}: the agent saw {r}"
    if a.may_reach == "none":
        leaks = run.trace(tag)
    elif a.may_reach == "paths":
        leaks = [f"{e['kind']} {e.get('path')} at {e['server_ip']}" for e in run.events_with(tag)
                 if tag in str(e.get("path") or "")]
    else:
        leaks = [f"{e['kind']} at {e['server_ip']}:{e['port']} {e.get('site') or e.get('host')}"
                 for e in run.events_with(tag)
                 if not all(e.get(k) == v for k, v in a.may_reach.items())]
    assert not leaks, f"LEAK: {a.name} reached {leaks}; the agent saw {r}"


# -- expectations (the agent's view) --------------------------------------------------------

def status(*codes: int) -> Callable[[dict], bool]:
    f = lambda r: r.get("status") in codes  # noqa: E731
    f.__name__ = f"status in {codes}"
    return f


def not_ok_status(r: dict) -> bool:
    """No 2xx/3xx answer from anywhere."""
    return not 200 <= (r.get("status") or 0) < 400


def no_connect(r: dict) -> bool:
    return r.get("connected") is False


def refused(r: dict) -> bool:
    return r.get("connected") is False and "Refused" in r.get("error", "")


def no_answer(r: dict) -> bool:
    """A datagram that got no reply (or an error), or could not be sent."""
    return not r.get("answered")


def nxdomain(r: dict) -> bool:
    return r.get("rcode") == 3


def not_answered_dns(r: dict) -> bool:
    """Anything but an answer with records."""
    return "error" in r or r.get("rcode") != 0 or r.get("answers") == 0


def failed_exec(r: dict) -> bool:
    return r.get("rc") not in (0, None) or r.get("error")


def curl_failed(r: dict) -> bool:
    return r.get("rc") != 0 or not 200 <= r.get("status", 0) < 400
