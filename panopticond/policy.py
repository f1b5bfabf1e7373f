"""Host matching and decisions: data in, decision out.

Pure: no iptc, pyroute2 or mitmproxy here. The daemon compiles an agent's effective
policy into a small JSON document (`Policy.to_dict`), writes it into the instance's
runtime directory, and the proxy's addons load it with `Policy.from_dict`. The same
object answers `panopticon policy test` without a jail.

Matching is on a canonical form (lower case, IDNA, no trailing dot, no port):
`*.example.com` matches `example.com` and any name under it, never `badexample.com`
nor `example.com.evil.test`. Deny wins over allow; anything not allowed is denied.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from typing import Any

import idna

POLICY_VERSION = 1

_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")


def canonical_host(host: str) -> str:
    """The canonical form of a host name or IP literal, or ValueError.

    Lower case, IDNA (A-labels), no trailing dot, no port, IPv6 without brackets.
    """
    h = host.strip()
    if not h:
        raise ValueError("empty host name")
    if h.startswith("["):
        end = h.find("]")
        if end < 0:
            raise ValueError(f"unbalanced bracket in {host!r}")
        rest = h[end + 1 :]
        if rest and not (rest.startswith(":") and rest[1:].isdigit()):
            raise ValueError(f"junk after the bracketed address in {host!r}")
        h = h[1:end]
        try:
            return str(ipaddress.IPv6Address(h))
        except ValueError:
            raise ValueError(f"only an IPv6 address may stand in brackets: {host!r}") from None
    elif h.count(":") == 1:
        h, _, port = h.partition(":")
        if not port.isdigit():
            raise ValueError(f"bad port in {host!r}")
    try:
        return str(ipaddress.ip_address(h))
    except ValueError:
        pass
    h = h.rstrip(".") if h.endswith(".") and not h.endswith("..") else h
    try:
        # IDNA 2008 with UTS 46 mapping, as browsers do: Python's own "idna" codec is
        # IDNA 2003, which maps "ß" to "ss" and so names another domain.
        h = idna.encode(h, uts46=True).decode("ascii") if not h.isascii() else h
    except idna.IDNAError as e:
        raise ValueError(f"{host!r} is not a valid host name ({e})") from None
    h = h.lower()
    if len(h) > 253:
        raise ValueError(f"{host!r} is longer than 253 characters")
    for label in h.split("."):
        if not _LABEL.match(label):
            raise ValueError(f"{host!r} is not a valid host name (label {label!r})")
    return h


@dataclasses.dataclass(frozen=True)
class HostPattern:
    """`example.com` (exactly that name) or `*.example.com` (it and every name under it)."""

    text: str  # as the operator wrote it, for messages
    base: str  # canonical name without the `*.`
    wildcard: bool

    @classmethod
    def parse(cls, text: str) -> HostPattern:
        t = text.strip()
        wildcard = t.startswith("*.")
        body = t[2:] if wildcard else t
        if "*" in body:
            raise ValueError(
                f"{text!r}: '*' may only stand alone as the first label, as in '*.example.com'"
            )
        if body.startswith("[") or (":" in body and body.count(":") == 1):
            raise ValueError(f"{text!r}: a host pattern has no port or brackets")
        base = canonical_host(body)
        if wildcard and _is_ip(base):
            raise ValueError(f"{text!r}: a wildcard cannot apply to an IP address")
        return cls(text=t, base=base, wildcard=wildcard)

    def matches(self, host: str) -> bool:
        """`host` must already be canonical."""
        if host == self.base:
            return True
        # "*.113.7" must not match the address 203.0.113.7.
        return self.wildcard and host.endswith("." + self.base) and not _is_ip(host)

    def __str__(self) -> str:
        return ("*." if self.wildcard else "") + self.base


def _is_ip(h: str) -> bool:
    try:
        ipaddress.ip_address(h)
        return True
    except ValueError:
        return False


@dataclasses.dataclass(frozen=True)
class Decision:
    allowed: bool
    rule: str | None  # the pattern that decided, or None for the default
    reason: str  # short, safe to show to the agent and to log

    @property
    def action(self) -> str:
        return "allow" if self.allowed else "deny"


@dataclasses.dataclass(frozen=True)
class Policy:
    """An agent's compiled host policy."""

    instance: str
    allow: tuple[HostPattern, ...] = ()
    deny: tuple[HostPattern, ...] = ()
    # Where an operator adds a host so that it is allowed, e.g. "agents.openclaw.allow"
    # in /etc/panopticon/config.toml; quoted in 403 pages and summaries.
    allow_hint: str = ""

    @classmethod
    def build(
        cls, instance: str, allow: tuple[str, ...] | list[str], deny: tuple[str, ...] | list[str],
        allow_hint: str = "",
    ) -> Policy:
        return cls(
            instance=instance,
            allow=tuple(HostPattern.parse(p) for p in allow),
            deny=tuple(HostPattern.parse(p) for p in deny),
            allow_hint=allow_hint,
        )

    def decide(self, host: str) -> Decision:
        try:
            h = canonical_host(host)
        except ValueError:
            return Decision(False, None, "invalid host name")
        for p in self.deny:
            if p.matches(h):
                return Decision(False, str(p), f"denied by {p}")
        for p in self.allow:
            if p.matches(h):
                return Decision(True, str(p), f"allowed by {p}")
        return Decision(False, None, "not in the allowlist")

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": POLICY_VERSION,
            "instance": self.instance,
            "allow": [str(p) for p in self.allow],
            "deny": [str(p) for p in self.deny],
            "allow_hint": self.allow_hint,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Policy:
        """Strict: anything unexpected raises ValueError (the proxy then denies everything)."""
        if not isinstance(d, dict) or type(d.get("version")) is not int \
                or d["version"] != POLICY_VERSION:
            raise ValueError("not a panopticon policy of a known version")
        unknown = set(d) - {"version", "instance", "allow", "deny", "allow_hint"}
        if unknown:
            raise ValueError(f"unknown policy keys: {sorted(unknown)}")
        for k in ("allow", "deny"):
            if not isinstance(d.get(k), list) or not all(isinstance(x, str) for x in d[k]):
                raise ValueError(f"policy {k!r} must be a list of strings")
        for k in ("instance", "allow_hint"):
            if not isinstance(d.get(k, ""), str):
                raise ValueError(f"policy {k!r} must be a string")
        if "instance" not in d:
            raise ValueError("policy 'instance' is missing")
        return cls.build(d["instance"], d["allow"], d["deny"], d.get("allow_hint", ""))
