"""Inbound routes: a controlled way in to an agent's own services, as data.

Pure: config values in, proxy modes and iptables rules out. Nothing here touches the
host; `instance.py` applies the plan, `addons/inbound.py` is the proxy's side.

Config (`[agents.NAME.inbound.ROUTE]`, ROUTE like an agent name)::

    listen = "*:443"        # on the host: "*" every address of both families,
                            # "0.0.0.0:443" every IPv4 one, "[::]:443" every IPv6 one,
                            # or one address ("203.0.113.7:443", "[2001:db8::7]:443")
    to = 8443               # the agent's port inside the jail (on 127.0.0.1), or
                            # "127.0.0.1:8443" / "[::1]:8443"; 1024 or above
    tls = "self"            # "self": TLS with a certificate from the instance CA (the
                            # default); { cert = "/abs", key = "/abs" }: the operator's;
                            # "none": plain HTTP
    allow_from = ["203.0.113.0/24", "2001:db8::/32"]   # required; nobody else gets in
    websocket = false       # allow WebSocket upgrades (frames are logged)
    block_patterns = []     # regular expressions; a request whose query or body matches
                            # one is refused with 403 and never reaches the agent

The path of a connection (both families alike; J = the jail's veth address, I = the
proxy's inbound port for the route, L = the listen port)::

  LAN / internet client C        host namespace                  instance namespace
  ───────────────────────     ─────────────────────────────      ─────────────────────────
  C:eph ──▶ H:L  ──uplink──▶ nat PREROUTING (! -i pnh+)           filter INPUT
                             └ PANO-T-DNAT: dst-type LOCAL,       -i pnjT -s allow_from
                               dport L ─▶ DNAT J:I                --dport I: ACCEPT
                             filter FORWARD -o pnhT                      │
                             └ PANO-T-INB: -s allow_from          mitmdump reverse@I (proxy
                               ctstate DNAT, dport I: ACCEPT        uid): source checked
                               other to J:I: DROP                   again, block_patterns,
                               ───── pnhT ══ veth ══ pnjT ─────▶    log direction=inbound
                                                                     │ lo
                             replies: FORWARD -i pnhT, from       agent's server
                             J sport I, ESTABLISHED: ACCEPT;        127.0.0.1:to
                             un-DNAT makes them H:L again

  host process ──▶ H:L       nat OUTPUT ─▶ PANO-T-DNAT (as above); filter OUTPUT -o pnhT
  (source H)                 ─▶ PANO-T-INB (same allow_from check: H must be listed);
                             replies arrive on INPUT -i pnhT ─▶ PANO-T-INB ESTABLISHED

- The client's address survives (DNAT only, no SNAT), so the jail and the proxy check
  the real source: the allowlist is enforced by the host firewall, the jail's INPUT
  chain and the proxy (which also logs it). The agent sees the proxy (127.0.0.1) as
  its peer, with `X-Forwarded-For` set by the proxy (any the client sent is replaced).
- A connection straight to J (to I or to the agent's port) is not DNATed: PANO-T-INB
  drops it (I); anything else is refused by PANO-T-FWD (forwarded) or dropped by the
  jail's INPUT policy (from a host process), as before inbound existed.
- The DNAT applies only to packets addressed to the host itself (`addrtype LOCAL`;
  forwarded traffic to port L is untouched) and never to packets arriving from a
  jail's veth (`! -i pnh+`): no agent reaches another instance's (or its own) routes
  by way of the host. Loopback destinations are left alone (`127.0.0.1:L` and `[::1]:L`
  keep reaching a host service there): a DNAT from loopback to the veth would need
  route_localnet, a host-wide switch we do not flip. So a host process reaches a
  route through a host address, and only if that address is in allow_from.
- Nothing binds on the host, so a port below 1024 needs no privilege, and a host
  service listening on L is shadowed for everyone the DNAT matches (instance.py warns).
  mitmproxy's own `block_global` (which kills clients with public addresses) is off
  while routes exist: allow_from decides.
- Until the jail's link-local address finishes duplicate address detection it answers
  no neighbour solicitation, so netns.py turns DAD off on the veth: IPv6 routes work
  from the moment the jail is ready.
- Inside the jail the proxy's inbound listeners are bound on the wildcard addresses
  (the veth address does not exist yet when the proxy starts); the jail's INPUT accepts
  them from the veth only, and its OUTPUT refuses them over loopback, so the agent
  cannot play an allowed client of its own services.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal, NoReturn, Protocol

from panopticond.rules import Rule, RuleSet, chain_prefix

# Inside the instance namespace: route i listens on BASE_PORT + i, below 1024 as the
# proxy's other ports (plan.py): the agent cannot take them.
BASE_PORT = 960
MAX_ROUTES = 32
# Every instance's host-side veth starts with this (plan.Names); traffic from any of
# them is never DNATed into a jail.
VETH_HOST_PREFIX = "pnh"
# Listening ports an unprivileged agent may bind in its namespace start here.
UNPRIVILEGED_PORT_START = 1024
# The proxy's ports in the jail (its transparent and DNS ports, the routes') are below it:
# a route's `to`, where the agent listens, can never be one of them.

ROUTE_KEYS = ("listen", "to", "tls", "allow_from", "websocket", "block_patterns")
_ROUTE_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
_HOST_PORT = re.compile(r"^(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:\[\]]*)):(?P<port>[0-9]{1,5})$")
MAX_PATTERN = 1000

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Path = tuple[str | int, ...]

_LISTEN_HINT = ('listen = "*:PORT" (every host address, IPv4 and IPv6), "0.0.0.0:PORT", '
                '"[::]:PORT", or one host address such as "203.0.113.7:443"')
_TO_HINT = 'to = 8443 (the agent\'s port on 127.0.0.1 in the jail), or "[::1]:8443"'
_TLS_HINT = 'tls = "self", "none" or { cert = "/path/cert.pem", key = "/path/key.pem" }'


@dataclasses.dataclass(frozen=True)
class Route:
    """One validated inbound route. `listen_addr` None: every host address of
    `listen_families`; `allow_from` holds only networks of those families."""

    name: str
    listen_port: int
    listen_families: tuple[int, ...]
    listen_addr: Address | None = None
    to_addr: str = "127.0.0.1"
    to_port: int = 0
    tls: Literal["self", "none", "custom"] = "self"
    cert: str | None = None
    key: str | None = None
    allow_from: tuple[Network, ...] = ()
    websocket: bool = False
    block_patterns: tuple[str, ...] = ()

    @property
    def families(self) -> tuple[int, ...]:
        """The families this route serves: listened on, and with an allowed source."""
        return tuple(f for f in self.listen_families
                     if any(n.version == f for n in self.allow_from))

    @property
    def listen(self) -> str:
        port = self.listen_port
        if self.listen_addr is not None:
            a = self.listen_addr
            return f"[{a}]:{port}" if a.version == 6 else f"{a}:{port}"
        return {(4, 6): f"*:{port}", (4,): f"0.0.0.0:{port}", (6,): f"[::]:{port}"}[
            self.listen_families]

    @property
    def to(self) -> str:
        a = self.to_addr
        return f"[{a}]:{self.to_port}" if ":" in a else f"{a}:{self.to_port}"

    def overlaps(self, other: Route) -> bool:
        """Whether both would claim some host address and port."""
        if self.listen_port != other.listen_port:
            return False
        if not set(self.listen_families) & set(other.listen_families):
            return False
        return None in (self.listen_addr, other.listen_addr) or (
            self.listen_addr == other.listen_addr)

    def to_dict(self) -> dict[str, Any]:
        return {
            "listen": self.listen, "to": self.to,
            "tls": self.tls if self.tls != "custom" else {"cert": self.cert, "key": self.key},
            "allow_from": [str(n) for n in self.allow_from], "websocket": self.websocket,
            "block_patterns": list(self.block_patterns),
        }


class Checker(Protocol):
    """What parsing needs of config.py's checker (kept apart to avoid an import cycle)."""

    def fail(self, path: Path, message: str, hint: str | None = None) -> NoReturn: ...
    def table(self, value: Any, path: Path, known: tuple[str, ...] | None) -> dict: ...
    def string(self, value: Any, path: Path) -> str: ...
    def boolean(self, value: Any, path: Path) -> bool: ...
    def array(self, value: Any, path: Path) -> list: ...
    def abspath(self, value: str, path: Path) -> str: ...


# --- config ------------------------------------------------------------------------------


def parse_routes(c: Checker, raw: Any, path: Path) -> tuple[Route, ...]:
    """The routes of one agent's `inbound` table, or `c.fail(...)` on the first problem."""
    t = c.table(raw, path, None)
    routes: list[Route] = []
    for name, value in t.items():
        p = (*path, name)
        if not _ROUTE_NAME.fullmatch(name):
            c.fail(p, f"invalid route name {name!r}",
                   hint="a route name is 1-32 characters of a-z, 0-9, '_' and '-'")
        routes.append(_route(c, name, value, p))
    if len(routes) > MAX_ROUTES:
        c.fail(path, f"{len(routes)} routes: at most {MAX_ROUTES} per agent")
    check_overlaps(c, [((*path, r.name, "listen"), r) for r in routes])
    return tuple(routes)


def check_overlaps(c: Checker, routes: Sequence[tuple[Path, Route]]) -> None:
    """Fail on the first route that claims a host address and port an earlier one has."""
    for i, (path, r) in enumerate(routes):
        for other_path, other in routes[:i]:
            if r.overlaps(other):
                c.fail(path, f"{r.listen!r} overlaps {other.listen!r} of "
                       f"{_dotted(other_path[:-1])}",
                       hint="each host port can go to one route only (across all agents): "
                       "choose another port, or distinct host addresses")


def check_ipv6(c: Checker, path: Path, route: Route, ipv6: bool) -> None:
    """A route that only serves IPv6 is an error when the jail has no IPv6."""
    if not ipv6 and route.families and 4 not in route.families:
        c.fail(path, f"route {route.name!r} serves IPv6 only, but [network] ipv6 = false",
               hint="listen on IPv4 (and allow IPv4 sources), or turn IPv6 on")


def _route(c: Checker, name: str, raw: Any, path: Path) -> Route:
    t = c.table(raw, path, ROUTE_KEYS)
    for key in ("listen", "to", "allow_from"):
        if key not in t:
            c.fail(path, f"route {name!r} has no {key!r}",
                   hint={"listen": _LISTEN_HINT, "to": _TO_HINT,
                         "allow_from": 'e.g. allow_from = ["203.0.113.0/24"]'}[key])
    addr, families, port = _listen(c, t["listen"], (*path, "listen"))
    to_addr, to_port = _to(c, t["to"], (*path, "to"))
    tls, cert, key = _tls(c, t.get("tls", "self"), (*path, "tls"))
    allow = _allow_from(c, t["allow_from"], (*path, "allow_from"), families)
    return Route(
        name=name, listen_port=port, listen_families=families, listen_addr=addr,
        to_addr=to_addr, to_port=to_port, tls=tls, cert=cert, key=key, allow_from=allow,
        websocket=c.boolean(t["websocket"], (*path, "websocket")) if "websocket" in t else False,
        block_patterns=_patterns(c, t.get("block_patterns", []), (*path, "block_patterns")),
    )


def _split_host_port(c: Checker, value: Any, path: Path, hint: str) -> tuple[str, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        c.fail(path, f"{value} has no address", hint=hint)
    text = c.string(value, path)
    if text.count(":") > 1 and not text.startswith("["):
        host, _, port_text = text.rpartition(":")
        c.fail(path, f"{text!r}: write an IPv6 address in brackets, \"[{host}]:{port_text}\"",
               hint=hint)
    m = _HOST_PORT.match(text)
    if not m:
        c.fail(path, f"{text!r} is not ADDRESS:PORT", hint=hint)
    port = int(m.group("port"))
    if not 1 <= port <= 65535:
        c.fail(path, f"{text!r}: {port} is not a port (1-65535)", hint=hint)
    host = m.group("v6") if m.group("v6") is not None else m.group("host")
    if m.group("v6") is not None and ":" not in host:
        c.fail(path, f"{text!r}: only an IPv6 address goes in brackets", hint=hint)
    return host, port


def _listen(c: Checker, value: Any, path: Path) -> tuple[Address | None, tuple[int, ...], int]:
    host, port = _split_host_port(c, value, path, _LISTEN_HINT)
    if host == "*":
        return None, (4, 6), port
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        c.fail(path, f"{host!r} is not an IP address or '*'", hint=_LISTEN_HINT)
    if ip.is_unspecified:
        return None, (ip.version,), port
    if ip.is_loopback:
        c.fail(path, f"{host!r} is a loopback address: the route could not reach the jail",
               hint="connections to loopback never leave the host's lo; listen on a host "
               "address (local clients then connect to that address)")
    if ip.is_multicast or ip.is_link_local or (ip.version == 6 and ip.ipv4_mapped):
        c.fail(path, f"{host!r} cannot be a listening address", hint=_LISTEN_HINT)
    return ip, (ip.version,), port


def _to(c: Checker, value: Any, path: Path) -> tuple[str, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        host, port = "127.0.0.1", value
    else:
        host, port = _split_host_port(c, value, path, _TO_HINT)
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            c.fail(path, f"{host!r} is not an IP address", hint=_TO_HINT)
        if not ip.is_loopback:
            c.fail(path, f"{host!r}: the proxy connects to the agent over loopback only",
                   hint="have the agent's server listen on 127.0.0.1 (or ::1) in the jail")
        host = str(ip)
    if not 1 <= port <= 65535:
        c.fail(path, f"{port} is not a port (1-65535)", hint=_TO_HINT)
    if port < UNPRIVILEGED_PORT_START:
        c.fail(path, f"port {port} is privileged: the agent runs without privileges and "
               f"cannot listen on it in the jail",
               hint=f"have the agent listen on a port from {UNPRIVILEGED_PORT_START} up "
               "(e.g. 8443); `listen` on the host may still be 443")
    return host, port


def _tls(c: Checker, value: Any, path: Path) -> tuple[Any, str | None, str | None]:
    if isinstance(value, str):
        if value in ("self", "none"):
            return value, None, None
        c.fail(path, f"unknown TLS mode {value!r}", hint=_TLS_HINT)
    if not isinstance(value, dict):
        c.fail(path, "expected \"self\", \"none\" or a table", hint=_TLS_HINT)
    t = c.table(value, path, ("cert", "key"))
    for k in ("cert", "key"):
        if k not in t:
            c.fail(path, f"the TLS table has no {k!r}", hint=_TLS_HINT)
    cert = c.abspath(c.string(t["cert"], (*path, "cert")), (*path, "cert"))
    key = c.abspath(c.string(t["key"], (*path, "key")), (*path, "key"))
    return "custom", cert, key


def _allow_from(c: Checker, value: Any, path: Path, families: tuple[int, ...],
                ) -> tuple[Network, ...]:
    items = c.array(value, path)
    if not items:
        c.fail(path, "allow_from is empty: nobody could connect",
               hint='list the client networks, e.g. ["203.0.113.0/24", "2001:db8::/32"]; '
               '"0.0.0.0/0" and "::/0" mean everyone')
    out: list[Network] = []
    for i, item in enumerate(items):
        text = c.string(item, (*path, i))
        try:
            net = ipaddress.ip_network(text)
        except ValueError as e:
            hint = "a network is ADDRESS/PREFIX, e.g. \"203.0.113.0/24\" or \"2001:db8::/32\""
            try:
                hint = (f"did you mean {str(ipaddress.ip_network(text, strict=False))!r}? "
                        "(the address has bits set past the prefix)")
            except ValueError:
                pass
            c.fail((*path, i), f"{text!r} is not a network: {e}", hint=hint)
        if isinstance(net, ipaddress.IPv6Network) and net.network_address.ipv4_mapped \
                and net.prefixlen >= 96:
            c.fail((*path, i), f"{text!r} is an IPv4-mapped network",
                   hint="write the IPv4 network itself")
        if net.version not in families:
            c.fail((*path, i), f"{text!r} is an IPv{net.version} network, but the route "
                   f"listens on IPv{families[0]} only",
                   hint='listen = "*:PORT" serves both families')
        if net not in out:
            out.append(net)
    return tuple(out)


def _patterns(c: Checker, value: Any, path: Path) -> tuple[str, ...]:
    out = []
    for i, item in enumerate(c.array(value, path)):
        text = c.string(item, (*path, i))
        if not text:
            c.fail((*path, i), "an empty pattern matches every request",
                   hint="remove it, or write what must never reach the agent")
        if len(text) > MAX_PATTERN:
            c.fail((*path, i), f"the pattern is longer than {MAX_PATTERN} characters")
        try:
            re.compile(text)
        except re.error as e:
            c.fail((*path, i), f"{text!r} is not a regular expression: {e}",
                   hint="Python syntax; escape literal characters such as '.', '?', '(' "
                   "with a backslash (in TOML, '...' strings keep backslashes as they are)")
        out.append(text)
    return tuple(dict.fromkeys(out))


def _dotted(path: Path) -> str:
    from panopticond.config import dotted_key  # config imports this module

    return dotted_key(path)


# --- plan --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Published:
    """A route as one instance publishes it: `port` is the proxy's listener in the jail."""

    route: Route
    port: int
    families: tuple[int, ...]

    def sources(self, family: int) -> list[str]:
        return [str(n) for n in self.route.allow_from if n.version == family]


def plan(routes: Iterable[Route], *, ipv6: bool) -> tuple[Published, ...]:
    """Give each route its listener port; drop the families the jail does not have."""
    out = []
    for i, r in enumerate(routes):
        families = tuple(f for f in r.families if f == 4 or ipv6)
        if families:
            out.append(Published(r, BASE_PORT + i, families))
    return tuple(out)


def proxy_modes(published: Iterable[Published]) -> list[str]:
    """mitmproxy `mode` entries: one reverse listener per route and family."""
    modes = []
    for p in published:
        for f in p.families:
            bind = "0.0.0.0" if f == 4 else "::"
            modes.append(f"reverse:http://{p.route.to}@{bind}:{p.port}")
    return modes


def cert_file(run_dir: str, route: Route) -> str:
    """Where the start copies a custom certificate chain and key for the proxy to read."""
    return f"{run_dir}/inbound-{route.name}.pem"


def proxy_config(published: Iterable[Published], run_dir: str) -> dict[str, Any]:
    """What `addons/inbound.py` reads (option panopticon_inbound), keyed by listener."""
    return {"routes": [
        {
            "name": p.route.name,
            "port": p.port,
            "to": [p.route.to_addr, p.route.to_port],
            "tls": p.route.tls,
            "cert_file": cert_file(run_dir, p.route) if p.route.tls == "custom" else None,
            "allow_from": [str(n) for n in p.route.allow_from if n.version in p.families],
            "websocket": p.route.websocket,
            "block_patterns": list(p.route.block_patterns),
        }
        for p in published
    ]}


def jail_inbound(published: Iterable[Published], family: int) -> tuple[tuple[int, list[str]], ...]:
    """`rules.jail_rules(inbound=...)`: (listener port, allowed sources) of `family`."""
    return tuple((p.port, p.sources(family)) for p in published if family in p.families)


def host_chains(tag: str) -> dict[str, tuple[str, str]]:
    prefix = chain_prefix(tag)
    return {"DNAT": ("nat", prefix + "DNAT"), "INB": ("filter", prefix + "INB")}


def with_host_rules(base: RuleSet, published: Iterable[Published], *, veth_host: str,
                    jail: Address) -> RuleSet:
    """`base` (the instance's tagged host rule set) plus the routes of its family.

    The inbound jumps go first: the accept of allowed, DNATed connections must come
    before `base`'s refusal of everything else towards the veth.
    """
    family = base.family
    pubs = [p for p in published if family in p.families]
    if not pubs or base.tag is None:
        return base
    if jail.version != family:
        raise ValueError(f"jail address {jail} is not IPv{family}")
    chains = host_chains(base.tag)
    dnat, inb = chains["DNAT"][1], chains["INB"][1]
    jail_net = f"{jail}/{jail.max_prefixlen}"
    loopback = "127.0.0.0/8" if family == 4 else "::1/128"

    def tcp(key: str, port: int) -> tuple[str, tuple[tuple[str, str], ...]]:
        return ("tcp", ((key, str(port)),))

    def ct(states: str) -> tuple[str, tuple[tuple[str, str], ...]]:
        return ("conntrack", (("ctstate", states),))

    rules: list[Rule] = [
        Rule("nat", "PREROUTING", dnat, in_iface=f"!{VETH_HOST_PREFIX}+"),
        Rule("nat", "OUTPUT", dnat),
        Rule("filter", "INPUT", inb, in_iface=veth_host),
        Rule("filter", "FORWARD", inb, in_iface=veth_host),
        Rule("filter", "FORWARD", inb, out_iface=veth_host),
        Rule("filter", "OUTPUT", inb, out_iface=veth_host),
        Rule("nat", dnat, "RETURN", dst=loopback),
    ]
    for p in pubs:
        r = p.route
        to = f"[{jail}]:{p.port}" if family == 6 else f"{jail}:{p.port}"
        rules.append(Rule(
            "nat", dnat, "DNAT", protocol="tcp",
            dst=None if r.listen_addr is None else f"{r.listen_addr}/{jail.max_prefixlen}",
            matches=(("addrtype", (("dst-type", "LOCAL"),)), tcp("dport", r.listen_port)),
            target_args=(("to-destination", to),),
        ))
    for p in pubs:
        rules.append(Rule("filter", inb, "ACCEPT", protocol="tcp", in_iface=veth_host,
                          src=jail_net, matches=(tcp("sport", p.port), ct("ESTABLISHED"))))
        rules += [Rule("filter", inb, "ACCEPT", protocol="tcp", out_iface=veth_host, src=src,
                       dst=jail_net, matches=(tcp("dport", p.port), ct("DNAT")))
                  for src in p.sources(family)]
        rules.append(Rule("filter", inb, "DROP", protocol="tcp", out_iface=veth_host,
                          dst=jail_net, matches=(tcp("dport", p.port),)))
    return RuleSet(family, rules=(*rules, *base.rules),
                   chains=(*base.chains, *chains.values()), tag=base.tag)


def shadowed(published: Iterable[Published], listening: Mapping[int, Iterable[str]],
             ) -> list[str]:
    """Routes whose host port a host socket already listens on (`listening`: port ->
    bound addresses, e.g. from /proc/net/tcp), as warnings for the operator."""
    out = []
    for p in published:
        for bound in listening.get(p.route.listen_port, ()):
            ip = ipaddress.ip_address(bound)
            if ip.is_loopback:
                continue
            if p.route.listen_addr is None or ip.is_unspecified or ip == p.route.listen_addr:
                out.append(f"route {p.route.name!r}: a host service listens on "
                           f"{bound}:{p.route.listen_port}; remote clients (and local ones "
                           "using a host address) now reach the agent instead")
                break
    return out


def parse_proc_net_tcp(text: str, family: int) -> dict[int, list[str]]:
    """Listening sockets in /proc/net/tcp (family 4) or tcp6 text: port -> addresses."""
    out: dict[int, list[str]] = {}
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 4 or fields[3] != "0A":  # TCP_LISTEN
            continue
        addr_hex, port_hex = fields[1].split(":")
        raw = bytes.fromhex(addr_hex)
        # The kernel prints each 32-bit word in host (little-endian) order.
        raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
        ip = ipaddress.ip_address(raw) if family == 4 else ipaddress.IPv6Address(raw)
        out.setdefault(int(port_hex, 16), []).append(str(ip))
    return out

