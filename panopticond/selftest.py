"""The self-test that readiness rests on: the jail, tried from inside by the agent's uid.

Before `READY=1`, and again after every proxy restart and reload, a probe
(`_selftest_probe.py`) runs inside the instance namespace with the agent's uid, groups
and no privileges, exactly as the agent will, and tries:

    allowed        HTTPS to an allowed host, verified against the instance CA alone: it
                   must get an answer through the proxy that is not a panopticon denial
    denied_https   HTTPS with a denied name as SNI, sent straight to an outside address:
                   the redirect must take it to the proxy, which must answer its own 403
    denied_dns     the denied name must not resolve
    direct_tcp_4/6 TCP to port 853 of an outside address: must not connect
    udp_4/6        UDP to 443 and 853 of it: must get no answer
    dns_4/6        DNS to it (an A query for a denied name, a TXT query): never a real answer

The outside addresses are the upstream resolvers the proxy uses (a real server that
would answer if anything got through), or documentation addresses when a family has
none. A failure is `hard` when something outside answered (the jail leaks: the daemon
closes it), else `soft` (the proxy is not serving yet, the allowed host is down: the
daemon retries and stays not ready).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import secrets
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from . import privs

# Used for a family that has no upstream resolver; nothing answers there.
FALLBACK_OUTSIDE = {"4": "198.51.100.1", "6": "2001:db8::1"}
DENIED_CANDIDATES = ("panopticon.invalid", "selftest.panopticon.invalid", "panopticon-selftest.test")
PROBE_TIMEOUT = 3.0
RUN_TIMEOUT = 20.0

_PROBE_SOURCE: str | None = None


@dataclasses.dataclass(frozen=True)
class Targets:
    allowed: str | None  # None: the policy allows no name we could probe
    denied: str | None  # None: the policy denies nothing (discover mode): nothing to test
    outside: Mapping[str, str]  # family ("4"/"6") -> address
    token: str


@dataclasses.dataclass(frozen=True)
class Outcome:
    hard: tuple[str, ...] = ()  # something outside answered: the jail is not closed
    soft: tuple[str, ...] = ()  # not working yet, nothing leaked
    notes: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        return not self.hard and not self.soft

    def summary(self) -> str:
        if self.passed:
            return "passed" + (f" ({'; '.join(self.notes)})" if self.notes else "")
        return "; ".join(self.hard + self.soft)


def allowed_target(allow: Iterable[str], allows: Callable[[str], bool]) -> str | None:
    """A host to probe by name among the canonical `allow` patterns that `allows`: the
    first exact name, else the base of the first wildcard (`*.example.com` ->
    `example.com`), else an address."""
    bases = [(p[2:], True) if p.startswith("*.") else (p, False) for p in allow]
    names = [(b, w) for b, w in bases if not _is_ip(b)]
    ordered = ([b for b, w in names if not w] + [b for b, w in names if w]
               + [b for b, _ in bases if _is_ip(b)])
    return next((b for b in ordered if allows(b)), None)


def choose_targets(allow: Iterable[str], allows: Callable[[str], bool], resolvers: Iterable[str],
                   token: str | None = None) -> Targets:
    """`allows(host)`: whether the policy in force lets a request to `host` through."""
    denied = next((d for d in DENIED_CANDIDATES if not allows(d)), None)
    outside: dict[str, str] = {}
    for r in resolvers:
        fam = str(ipaddress.ip_address(r).version)
        outside.setdefault(fam, r)
    for fam, addr in FALLBACK_OUTSIDE.items():
        outside.setdefault(fam, addr)
    return Targets(allowed_target(allow, allows), denied, dict(sorted(outside.items())),
                   token or secrets.token_hex(6))


def judge(results: Mapping[str, Any], targets: Targets) -> Outcome:
    """Pure: what the probe's `results` say about the jail."""
    hard: list[str] = []
    soft: list[str] = []
    notes: list[str] = []

    def get(name: str) -> Mapping[str, Any] | None:
        r = results.get(name)
        if not isinstance(r, Mapping):
            soft.append(f"{name}: no result")
            return None
        return r

    if targets.allowed is None:
        notes.append("no allowed host to probe")
    elif (r := get("allowed")) is not None:
        if not isinstance(r.get("status"), int):
            soft.append(f"allowed https://{targets.allowed}/ failed: {r.get('error', r)}")
        elif _is_denial(r):
            soft.append(f"allowed https://{targets.allowed}/ was denied by the proxy "
                        f"({r['status']})")
        elif r["status"] in (502, 504):
            notes.append(f"{targets.allowed} answered {r['status']} through the proxy")

    if targets.denied is None:
        notes.append("the policy denies nothing: no denial to test")
    elif (r := get("denied_https")) is not None:
        if "tls_error" in r:
            hard.append(f"denied_https: an outside server answered ({r['tls_error']})")
        elif not isinstance(r.get("status"), int):
            soft.append(f"denied_https: {r.get('error', r)}")
        elif not _is_denial(r) or r["status"] != 403:
            hard.append(f"denied_https: {targets.denied} was not refused by the proxy "
                        f"(status {r['status']})")
        elif "no valid policy" in r.get("body", ""):
            soft.append("denied_https: the proxy has no valid policy")

    if targets.denied is not None and (r := get("denied_dns")) is not None \
            and r.get("resolved") is not False:
        hard.append(f"denied_dns: {targets.denied} resolved to {r.get('addresses', r)}")

    for fam in targets.outside:
        addr = targets.outside[fam]
        if (r := get(f"direct_tcp_{fam}")) is not None and r.get("connected") is not False:
            hard.append(f"direct_tcp_{fam}: connected to {addr} port 853")
        if (r := get(f"udp_{fam}")) is not None and r.get("answered") is not False:
            hard.append(f"udp_{fam}: {addr} answered over UDP ({r.get('outcomes', r)})")
        if (r := get(f"dns_{fam}")) is not None:
            for q in ("a_denied", "txt_denied"):
                a = r.get(q)
                if not isinstance(a, Mapping):
                    soft.append(f"dns_{fam}: no result for {q}")
                elif a.get("answered") and a.get("rcode") == 0 and a.get("answers"):
                    hard.append(f"dns_{fam}: {addr} answered {q} with {a['answers']} record(s)")
    return Outcome(tuple(hard), tuple(soft), tuple(notes))


def _is_denial(r: Mapping[str, Any]) -> bool:
    return r.get("status") in (403, 421) and str(r.get("body", "")).startswith("panopticon:")


def _is_ip(h: str) -> bool:
    try:
        ipaddress.ip_address(h)
        return True
    except ValueError:
        return False


def probe_source() -> str:
    global _PROBE_SOURCE
    if _PROBE_SOURCE is None:
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_selftest_probe.py")
        with open(path, encoding="utf-8") as f:
            _PROBE_SOURCE = f.read()
    return _PROBE_SOURCE


def run(netns: str, uid: int, gid: int, groups: Iterable[int], ca_cert: str,
        targets: Targets, timeout: float = RUN_TIMEOUT) -> Outcome:
    """Run the probe in `netns` as uid/gid/groups and judge what it saw."""
    spec = {"ca": ca_cert, "allowed": targets.allowed, "denied": targets.denied,
            "outside": dict(targets.outside), "token": targets.token,
            "timeout": PROBE_TIMEOUT}
    group_list = list(groups)

    def preexec() -> None:  # pragma: no cover - runs in the child
        privs.enter_and_drop(netns, uid, gid, group_list, new_session=True, pdeathsig=True,
                            confine=True)

    try:
        p = subprocess.run(
            [sys.executable, "-I", "-S", "-c", probe_source(), json.dumps(spec)],
            capture_output=True, text=True, timeout=timeout, preexec_fn=preexec, cwd="/",
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}, stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        return Outcome(soft=(f"the probe did not finish within {timeout:.0f} s",))
    except (OSError, subprocess.SubprocessError) as e:
        return Outcome(soft=(f"the probe could not start: {e}",))
    try:
        results = json.loads(p.stdout)
    except ValueError:
        tail = p.stderr.strip().splitlines()[-1:] or [f"exit status {p.returncode}"]
        return Outcome(soft=(f"the probe failed: {tail[0][:300]}",))
    return judge(results, targets)
