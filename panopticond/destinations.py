"""Destinations beyond plain HTTP(S) host rules: addresses, passthrough and TCP ports.

Pure: data in, decision out, like policy.py (whose `Policy` carries a `Destinations` in
its `destinations` field and in its compiled JSON). Three operator settings:

    allow_cidrs = ["10.20.0.0/16", "198.51.100.7"]
        Addresses the agent may reach by IP literal (or TLS without a server name), and
        that the proxy may connect to although they lie in a blocked range (addresses.py).
    passthrough = ["*.pinned.example"]
        TLS to these names is relayed without decryption (certificate pinning, mTLS):
        judged on the SNI, dialled only to an address the jail's DNS returned for it.
    allow = [{ host = "github.com", port = 22 }]
        Raw TCP on that port (not 53, 80 or 443) to addresses the jail's DNS returned for
        that name (or to that address, for an IP literal).

Deny rules win over all three, as over allow.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Iterable
from typing import Any

from panopticond.addresses import Network, parse_network
from panopticond.policy import Decision, HostPattern, canonical_host

# Ports a port rule may not name, and why.
RESERVED_PORTS = {
    53: "DNS is answered by the jail itself",
    80: "HTTP is judged request by request: allow the host instead",
    443: "HTTPS is judged request by request: allow the host, or use passthrough",
}


def check_port(port: Any) -> int:
    """A port a port rule may name, or ValueError saying why not."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"{port!r} is not a port number (1-65535)")
    if port in RESERVED_PORTS:
        raise ValueError(f"port {port} cannot be given a TCP rule: {RESERVED_PORTS[port]}")
    return port


@dataclasses.dataclass(frozen=True)
class PortRule:
    """`{ host = "github.com", port = 22 }`."""

    host: HostPattern
    port: int

    @classmethod
    def parse(cls, host: str, port: Any) -> PortRule:
        return cls(_pattern(host), check_port(port))

    def __str__(self) -> str:
        return f"{self.host} port {self.port}"


@dataclasses.dataclass(frozen=True)
class Destinations:
    allow_cidrs: tuple[Network, ...] = ()
    passthrough: tuple[HostPattern, ...] = ()
    ports: tuple[PortRule, ...] = ()

    @classmethod
    def build(
        cls, allow_cidrs: Iterable[str] = (), passthrough: Iterable[str] = (),
        ports: Iterable[tuple[str, int]] = (),
    ) -> Destinations:
        """From the config's texts; ValueError (saying why) on anything invalid."""
        return cls(
            allow_cidrs=tuple(dict.fromkeys(parse_network(c) for c in allow_cidrs)),
            passthrough=tuple(dict.fromkeys(_pattern(p) for p in passthrough)),
            ports=tuple(dict.fromkeys(PortRule.parse(h, p) for h, p in ports)),
        )

    @property
    def tcp_ports(self) -> tuple[int, ...]:
        """The ports the jail redirects to the proxy besides 80 and 443, sorted."""
        return tuple(sorted({r.port for r in self.ports}))

    def cidr_for(self, host: str) -> str | None:
        """The `allow_cidrs` entry covering IP literal `host` (canonical), or None."""
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return None
        for net in self.allow_cidrs:
            if ip.version == net.version and ip in net:
                return str(net)
        return None

    def passthrough_for(self, host: str) -> HostPattern | None:
        return next((p for p in self.passthrough if p.matches(host)), None)

    def port_rule_for(self, host: str, port: int) -> PortRule | None:
        return next((r for r in self.ports if r.port == port and r.host.matches(host)), None)

    def names_port(self, host: str) -> bool:
        """Whether some port rule names `host` (so the jail's DNS must answer for it)."""
        return any(r.host.matches(host) for r in self.ports)

    def to_dict(self) -> dict[str, Any]:
        return {
            "allow_cidrs": [str(n) for n in self.allow_cidrs],
            "passthrough": [str(p) for p in self.passthrough],
            "ports": [{"host": str(r.host), "port": r.port} for r in self.ports],
        }

    @classmethod
    def from_dict(cls, d: Any) -> Destinations:
        """Strict: anything unexpected raises ValueError (the proxy then denies everything)."""
        if not isinstance(d, dict) or set(d) != {"allow_cidrs", "passthrough", "ports"}:
            raise ValueError("policy 'destinations' has exactly the keys allow_cidrs, "
                             "passthrough and ports")
        for k in ("allow_cidrs", "passthrough"):
            if not isinstance(d[k], list) or not all(isinstance(x, str) for x in d[k]):
                raise ValueError(f"policy destinations {k!r} must be a list of strings")
        ports = d["ports"]
        if not isinstance(ports, list) or not all(
                isinstance(r, dict) and set(r) == {"host", "port"}
                and isinstance(r["host"], str) for r in ports):
            raise ValueError("policy destinations 'ports' must be a list of {host, port}")
        return cls.build(d["allow_cidrs"], d["passthrough"],
                         [(r["host"], r["port"]) for r in ports])


def _pattern(text: str) -> HostPattern:
    """Parsed from its canonical form, so that equal rules compare equal however written."""
    return HostPattern.parse(str(HostPattern.parse(text)))


def _denied(policy, h: str) -> Decision | None:
    for p in policy.deny:
        if p.matches(h):
            return Decision(False, str(p), f"denied by {p}")
    return None


def _canonical(host: str) -> str | None:
    try:
        return canonical_host(host)
    except ValueError:
        return None


def decide_dns(policy, host: str) -> Decision:
    """Whether the jail's DNS answers A/AAAA for `host`: the policy allows it, or a
    passthrough or port rule names it (deny wins). `policy` is a `Policy`."""
    d = policy.decide(host)
    if d.allowed:
        return d
    h = _canonical(host)
    dest = policy.destinations
    if h is None or dest is None or _denied(policy, h):
        return d
    p = dest.passthrough_for(h)
    if p is not None:
        return Decision(True, f"passthrough {p}", f"named by passthrough {p}")
    r = next((r for r in dest.ports if r.host.matches(h)), None)
    if r is not None:
        return Decision(True, str(r), f"named by the rule for {r}")
    return d


def decide_passthrough(policy, host: str) -> Decision:
    """Whether TLS with server name `host` is relayed undecrypted."""
    h = _canonical(host)
    if h is None:
        return Decision(False, None, "invalid host name")
    dest = policy.destinations
    denied = _denied(policy, h)
    if denied:
        return denied
    p = dest.passthrough_for(h) if dest is not None else None
    if p is None:
        return Decision(False, None, "not a passthrough host")
    return Decision(True, f"passthrough {p}", f"passed through (not decrypted) by {p}")


def decide_port(policy, host: str, port: int) -> Decision:
    """Whether raw TCP to `host` (a name the jail's DNS returned the destination for, or
    the destination's own address) on `port` is relayed."""
    h = _canonical(host)
    if h is None:
        return Decision(False, None, "invalid host name")
    denied = _denied(policy, h)
    if denied:
        return denied
    dest = policy.destinations
    r = dest.port_rule_for(h, port) if dest is not None else None
    if r is None:
        return Decision(False, None, f"no rule allows TCP port {port} to {h}")
    return Decision(True, str(r), f"allowed by the rule for {r}")


def of_agent(agent) -> Destinations | None:
    """The destinations of an AgentConfig (config.py), or None if it names none."""
    if not (agent.allow_cidrs or agent.passthrough or agent.ports):
        return None
    return Destinations.build(agent.allow_cidrs, agent.passthrough, agent.ports)
