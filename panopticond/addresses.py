"""Addresses the proxy must never reach for the agent: one list, for both layers.

Pure. The same ranges are refused twice: by the kernel (rules.py: the proxy user's
OUTPUT chain in the jail and the host's FORWARD chain, built from `blocked_networks`)
and by the proxy itself, on every address it is about to connect to and on every
address a DNS answer carries (`AddressGuard`: an allowed name that resolves to the
metadata service is DNS rebinding). The proxy's check also sees through the IPv6 forms
that carry an IPv4 address (IPv4-mapped, IPv4-compatible, NAT64, 6to4, Teredo), which
a netmask cannot follow.

The operator may allow networks (`allow_cidrs` in the config): they are subtracted from
the blocked ranges at both layers. The host's own addresses and the instance subnets
(`extra`) are never subtracted: no setting lets the jail reach the machine it runs on.

The documentation ranges (192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24, 2001:db8::/32)
are deliberately absent: they are the simulated internet of the tests.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# (network, why it is refused), in the order the rules are written.
_BLOCKED: tuple[tuple[str, str], ...] = (
    ("0.0.0.0/8", "'this network' (unspecified)"),
    ("10.0.0.0/8", "private (RFC 1918)"),
    ("100.64.0.0/10", "shared address space (CGNAT)"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local (cloud metadata)"),
    ("172.16.0.0/12", "private (RFC 1918)"),
    ("192.0.0.0/24", "IETF protocol assignments"),
    ("192.88.99.0/24", "6to4 relay anycast"),
    ("192.168.0.0/16", "private (RFC 1918)"),
    ("198.18.0.0/15", "benchmarking"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved (and broadcast)"),
    # ::/96 holds the unspecified address, loopback and the IPv4-compatible form.
    ("::/96", "unspecified, loopback or IPv4-compatible"),
    ("::ffff:0:0/96", "IPv4-mapped"),
    ("64:ff9b::/96", "NAT64"),
    ("64:ff9b:1::/48", "NAT64 (local use)"),
    ("100::/64", "discard-only"),
    ("2001::/32", "Teredo"),
    ("2002::/16", "6to4"),
    ("fc00::/7", "unique local (ULA)"),
    ("fe80::/10", "link-local (cloud metadata)"),
    ("fec0::/10", "site-local"),
    ("ff00::/8", "multicast"),
)

BLOCKED_RANGES: dict[int, tuple[str, ...]] = {
    fam: tuple(n for n, _ in _BLOCKED if ipaddress.ip_network(n).version == fam) for fam in (4, 6)
}

_NETS: tuple[tuple[Network, str], ...] = tuple(
    (ipaddress.ip_network(n), why) for n, why in _BLOCKED)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_COMPAT = ipaddress.IPv6Network("::/96")
# Networks an operator may not open: the proxy's own listeners live on loopback.
_NEVER_ALLOWED = tuple(ipaddress.ip_network(n) for n in ("127.0.0.0/8", "::/127", "0.0.0.0/8"))


def parse_network(text: str) -> Network:
    """`"10.1.2.0/24"` or a single address (`"10.1.2.3"`, `"fd00::1"`); ValueError saying why.

    Host bits must be zero (`10.1.2.3/24` is refused: which was meant?). A network that
    covers loopback or the unspecified address cannot be allowed.
    """
    t = text.strip()
    try:
        net = ipaddress.ip_network(t, strict=True)
    except ValueError as e:
        if "has host bits set" in str(e):
            fixed = ipaddress.ip_network(t, strict=False)
            raise ValueError(f"{text!r} has host bits set (did you mean '{fixed}'?)") from None
        raise ValueError(f"{text!r} is not an address or a network ({e})") from None
    for never in _NEVER_ALLOWED:
        if net.version == never.version and net.overlaps(never):
            raise ValueError(
                f"{text!r} covers {never}: the proxy's own listeners are there, so it can "
                "never be allowed"
            )
    return net


def embedded_ipv4(ip: Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for or tunnels to, if it is such a form."""
    if isinstance(ip, ipaddress.IPv4Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]  # the client's; the server's is another public relay
    if ip in _NAT64 or (ip in _COMPAT and int(ip) > 1):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def blocked_networks(family: int, allowed: Iterable[Network] = (),
                     extra: Iterable[Network] = ()) -> list[str]:
    """The networks of `family` to refuse at L3: the blocked ranges minus `allowed`, then
    `extra` (never reduced). Canonical CIDR strings, in order, without duplicates."""
    allow = [n for n in allowed if n.version == family]
    out: dict[str, None] = {}
    for net, _ in _NETS:
        if net.version != family:
            continue
        for piece in _subtract(net, allow):
            out[str(piece)] = None
    for net in extra:
        if net.version == family:
            out[str(net)] = None
    return list(out)


def _subtract(net: Network, allowed: Sequence[Network]) -> list[Network]:
    pieces = [net]
    for a in allowed:
        nxt: list[Network] = []
        for p in pieces:
            if not p.overlaps(a):
                nxt.append(p)
            elif not p.subnet_of(a):  # type: ignore[arg-type]  # same family here
                nxt.extend(p.address_exclude(a))  # type: ignore[arg-type]
        pieces = nxt
    return sorted(pieces)  # type: ignore[type-var]


_KNOWN_MAX = 4096  # answers an AddressGuard remembers


class AddressGuard:
    """Decides whether the proxy may connect to an address (see the module docstring).

    `allowed`: the operator's networks (`allow_cidrs`); `extra`: the host's addresses and
    the instance subnets, refused whatever `allowed` says.
    """

    def __init__(self, allowed: Iterable[Network] = (), extra: Iterable[Network] = ()):
        self.allowed = tuple(allowed)
        self.extra = tuple(extra)
        # The answer depends on the address alone (a guard never changes): the proxy asks
        # for the same few addresses on every request, and parsing them was 2% of its CPU.
        self._known: dict[str, str | None] = {}

    def refusal(self, address: str | Address) -> str | None:
        """Why the proxy must not connect to `address`, or None if it may. An address that
        cannot be parsed is refused."""
        key = str(address)
        try:
            return self._known[key]
        except KeyError:
            pass
        why = self._refusal(address)
        if len(self._known) >= _KNOWN_MAX:
            self._known.clear()
        self._known[key] = why
        return why

    def _refusal(self, address: str | Address) -> str | None:
        try:
            ip = ipaddress.ip_address(str(address).split("%", 1)[0])
        except ValueError:
            return f"{address!r} is not an IP address"
        why = self._why(ip)
        if why is None:
            inner = embedded_ipv4(ip)
            inner_why = self._why(inner) if inner is not None else None
            if inner_why is None:
                return None
            why = f"a form of {inner}, which is {inner_why}"
        return f"{ip} is {why}: the proxy never connects there"

    def _why(self, ip: Address) -> str | None:
        for net, why in _NETS:
            if ip.version == net.version and ip in net and not self.is_allowed(ip):
                return why
        for net in self.extra:
            if ip.version == net.version and ip in net:
                return "an address of the host or of the jail itself"
        return None

    def is_allowed(self, address: str | Address) -> bool:
        """Whether an operator's network covers `address`."""
        ip = ipaddress.ip_address(str(address).split("%", 1)[0])
        return any(ip.version == n.version and ip in n for n in self.allowed)
