"""The upstream resolvers the proxy uses, when the config names none: the host's own.

A stub resolver on loopback (systemd-resolved's 127.0.0.53) is unreachable from inside
the instance namespace, so it is replaced by the servers that stub forwards to.
"""

from __future__ import annotations

import ipaddress

from .errors import PanopticonError

RESOLV_CONF = "/etc/resolv.conf"
RESOLVED_UPSTREAM = "/run/systemd/resolve/resolv.conf"


def parse(text: str) -> list[str]:
    """Name servers of a resolv.conf, in order, without scope ids; loopback kept."""
    out = []
    for line in text.splitlines():
        parts = line.split("#", 1)[0].split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            addr = parts[1].split("%", 1)[0]
            try:
                out.append(str(ipaddress.ip_address(addr)))
            except ValueError:
                continue
    return out


def _usable(servers: list[str]) -> list[str]:
    """What the proxy can reach from inside the jail (the rule config.py applies too)."""
    out = []
    for s in servers:
        a = ipaddress.ip_address(s)
        if not (a.is_loopback or a.is_link_local or a.is_unspecified or a.is_multicast):
            out.append(s)
    return out


def host_resolvers(paths: tuple[str, ...] = (RESOLV_CONF, RESOLVED_UPSTREAM)) -> list[str]:
    for path in paths:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                servers = _usable(parse(f.read()))
        except OSError:
            continue
        if servers:
            return servers
    raise PanopticonError(
        "no usable upstream DNS server: the host's resolv.conf names only loopback "
        "resolvers, which the jail cannot reach",
        hint="set dns_servers = [\"...\"] in [network] of the config",
    )
