"""The iptables rules of an instance, as data.

Pure: no iptc here. `firewall.py` turns a `RuleSet` into python-iptables calls, commits
each table once and reads every chain back to compare it with the plan, rendered by the
same `format_rule` this module uses for `describe()`.

python-iptables silently ignores fields it does not know, so a typo would make a broader
rule. `Rule` therefore accepts only the tables, chains, matches, keys and targets listed
below, and normalises values to the form the kernel reports back (CIDR networks,
conntrack states in a fixed order), so that plan and read-back compare as strings.

Two kinds of rule set:

* untagged (`tag=None`): the rule set owns every table it names. Applying it flushes
  those tables, deletes their user chains and sets every built-in chain's policy (to
  ACCEPT where `policies` says nothing). This is the jail, inside the instance's own
  network namespace.
* tagged: the rule set owns only the chains `PANO-<TAG>-*` and, in built-in chains, the
  rules that jump to them (inserted at the top, in plan order). This is the host side:
  other software's rules are never touched and removal by tag is exact.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from panopticond import addresses

BUILTIN_CHAINS: dict[str, tuple[str, ...]] = {
    "filter": ("INPUT", "FORWARD", "OUTPUT"),
    "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
}

CHAIN_PREFIX = "PANO-"
# The kernel's chain names hold 28 characters plus the terminating NUL.
MAX_CHAIN_NAME = 28

_USER_CHAIN = re.compile(r"^PANO-[A-Za-z0-9_-]+$")
_TAG = re.compile(r"^[0-9A-Fa-f]{8}$")
_IFACE = re.compile(r"^[A-Za-z0-9_.:@+-]{1,15}$")
_PORT = re.compile(r"^[0-9]{1,5}(:[0-9]{1,5})?$")
_NUMBER = re.compile(r"^[0-9]+$")
_ICMP_TYPE = re.compile(r"^[0-9]{1,3}(/[0-9]{1,3})?$")

PROTOCOLS = ("tcp", "udp", "icmp", "icmpv6")

# In the order iptables prints them, so that plan and read-back compare equal.
CTSTATES = ("INVALID", "NEW", "RELATED", "ESTABLISHED", "UNTRACKED", "SNAT", "DNAT")


def _port(value: str) -> None:
    if not _PORT.match(value) or any(not 0 <= int(p) <= 65535 for p in value.split(":")):
        raise ValueError(f"not a port or port range: {value!r}")


def _number(value: str) -> None:
    if not _NUMBER.match(value) or int(value) >= 2**32:
        raise ValueError(f"not a numeric id: {value!r}")


def _icmp_type(value: str) -> None:
    if not _ICMP_TYPE.match(value) or any(int(p) > 255 for p in value.split("/")):
        raise ValueError(f"not a numeric ICMP type[/code]: {value!r}")


_ADDRTYPES = ("UNSPEC", "UNICAST", "LOCAL", "BROADCAST", "ANYCAST", "MULTICAST", "BLACKHOLE",
              "UNREACHABLE", "PROHIBIT", "THROW", "NAT", "XRESOLVE")


def _addrtype(value: str) -> None:
    if value not in _ADDRTYPES:
        raise ValueError(f"unknown address type {value!r} (known: {', '.join(_ADDRTYPES)})")


def _to_destination(value: str) -> None:
    """`ADDR:PORT` or `[ADDR6]:PORT`: one address and one port, as the kernel reports it."""
    host, sep, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if ipaddress.ip_address(host).version != 6:
            raise ValueError(f"not an IPv6 address in brackets: {value!r}")
    elif not sep or ipaddress.ip_address(host).version != 4:
        raise ValueError(f"not ADDR:PORT or [ADDR6]:PORT: {value!r}")
    if ":" in port or not 1 <= int(port) <= 65535:
        raise ValueError(f"not a port: {value!r}")
    if str(ipaddress.ip_address(host)) != host:
        raise ValueError(f"write the address canonically: {value!r}")


def _nth_mode(value: str) -> None:
    # Only nth: "random" would spread connections unevenly, and other modes are unused.
    if value != "nth":
        raise ValueError(f"only --mode nth is used, not {value!r}")


def _every(value: str) -> None:
    if not _NUMBER.match(value) or not 2 <= int(value) < 2**31:
        raise ValueError(f"--every is a count of at least 2: {value!r}")


def _ctstate(value: str) -> None:
    states = value.split(",")
    unknown = [s for s in states if s not in CTSTATES]
    if unknown or len(set(states)) != len(states):
        raise ValueError(f"bad conntrack state list {value!r} (known: {', '.join(CTSTATES)})")


# match name -> key -> validator of the value (without a leading "!").
MATCHES: dict[str, dict[str, Any]] = {
    "owner": {"uid-owner": _number, "gid-owner": _number},
    "conntrack": {"ctstate": _ctstate},
    "tcp": {"dport": _port, "sport": _port},
    "udp": {"dport": _port, "sport": _port},
    "icmp": {"icmp-type": _icmp_type},
    "icmp6": {"icmpv6-type": _icmp_type},
    "addrtype": {"dst-type": _addrtype},
    "statistic": {"mode": _nth_mode, "every": _every, "packet": _number},
}

# A protocol match is only valid on a rule of that protocol.
_MATCH_PROTOCOL = {"tcp": "tcp", "udp": "udp", "icmp": "icmp", "icmp6": "icmpv6"}

REJECT_WITH = {
    4: (
        "icmp-net-unreachable",
        "icmp-host-unreachable",
        "icmp-port-unreachable",
        "icmp-proto-unreachable",
        "icmp-net-prohibited",
        "icmp-host-prohibited",
        "icmp-admin-prohibited",
        "tcp-reset",
    ),
    6: (
        "icmp6-no-route",
        "icmp6-adm-prohibited",
        "icmp6-addr-unreachable",
        "icmp6-port-unreachable",
        "tcp-reset",
    ),
}

# target -> (tables it is valid in, built-in chains it is valid in or None for any,
#            required argument keys, optional argument keys)
TARGETS: dict[
    str, tuple[tuple[str, ...], tuple[str, ...] | None, tuple[str, ...], tuple[str, ...]]
] = {
    "ACCEPT": (("filter", "nat"), None, (), ()),
    "RETURN": (("filter", "nat"), None, (), ()),
    # The kernel refuses DROP in nat.
    "DROP": (("filter",), None, (), ()),
    # REJECT's default message differs per family: always spell it out.
    "REJECT": (("filter",), None, ("reject-with",), ()),
    "REDIRECT": (("nat",), ("PREROUTING", "OUTPUT"), ("to-ports",), ()),
    "MASQUERADE": (("nat",), ("POSTROUTING",), (), ()),
    # Only in user chains jumped to from PREROUTING/OUTPUT (inbound.py); one address:port.
    "DNAT": (("nat",), ("PREROUTING", "OUTPUT"), ("to-destination",), ()),
}

POLICIES = ("ACCEPT", "DROP")

# Ranges the proxy user and forwarded instance traffic must never reach: one list with
# the proxy's own check of every address it dials (addresses.py).
BLOCKED_RANGES = addresses.BLOCKED_RANGES

# Neighbour discovery under a DROP policy: router solicitation (133, sent),
# router advertisement (134, received), neighbour solicitation and advertisement
# (135, 136, both ways). Without them IPv6 stops working after the neighbour cache expires.
ND_OUT = ("133", "135", "136")
ND_IN = ("134", "135", "136")


class RuleError(ValueError):
    """A rule or rule set that python-iptables would misread or the kernel would refuse."""


def _split_neg(value: str) -> tuple[str, str]:
    return ("!", value[1:]) if value.startswith("!") else ("", value)


def _canonical_net(value: str) -> str:
    neg, rest = _split_neg(value)
    try:
        net = ipaddress.ip_network(rest, strict=True)
    except ValueError as e:
        raise RuleError(f"bad address {value!r}: {e}") from None
    return neg + str(net)


def canonical_match_value(match: str, key: str, value: str) -> str:
    """`value` as the kernel reports it back: negation as a leading "!", states in order."""
    neg, rest = _split_neg(value.strip())
    if match == "conntrack" and key == "ctstate":
        rest = ",".join(s for s in CTSTATES if s in rest.split(","))
    return neg + rest


def format_rule(
    chain: str,
    *,
    protocol: str | None = None,
    src: str | None = None,
    dst: str | None = None,
    in_iface: str | None = None,
    out_iface: str | None = None,
    matches: Iterable[tuple[str, Iterable[tuple[str, str]]]] = (),
    target: str = "",
    target_args: Iterable[tuple[str, str]] = (),
    command: str = "-A",
) -> str:
    """One rule in iptables-save syntax, from raw fields (also for rules read back)."""

    def opt(flag: str, value: str | None) -> list[str]:
        if value is None:
            return []
        neg, rest = _split_neg(value)
        return (["!"] if neg else []) + [flag, rest]

    parts = [command, chain]
    parts += opt("-s", src) + opt("-d", dst) + opt("-i", in_iface) + opt("-o", out_iface)
    parts += opt("-p", protocol)
    for name, params in matches:
        parts += ["-m", name]
        for key, value in sorted(params):
            parts += opt(f"--{key}", value)
    parts += ["-j", target]
    for key, value in sorted(target_args):
        parts += [f"--{key}", value]
    return " ".join(parts)


def _pairs(value: Any, what: str) -> tuple[tuple[str, str], ...]:
    if isinstance(value, Mapping):
        value = tuple(value.items())
    try:
        pairs = tuple((k, v) for k, v in value)
    except (TypeError, ValueError):
        raise RuleError(f"{what} must be (key, value) pairs, not {value!r}") from None
    for k, v in pairs:
        if not isinstance(k, str) or not isinstance(v, str):
            raise RuleError(f"{what}: keys and values must be strings, not {k!r}: {v!r}")
    if len({k for k, _ in pairs}) != len(pairs):
        raise RuleError(f"{what}: duplicate key in {pairs!r}")
    return pairs


@dataclasses.dataclass(frozen=True)
class Rule:
    """One iptables rule. Every field is checked here; values may start with "!" to negate.

    `matches` is a tuple of (match name, ((key, value), ...)), e.g.
    ``("owner", (("uid-owner", "998"),))``; `target_args` likewise, e.g.
    ``(("to-ports", "901"),)``. `target` is a built-in target or a `PANO-` chain.
    Raises `RuleError` (a ValueError) on anything unknown or malformed.
    """

    table: str
    chain: str
    target: str
    protocol: str | None = None
    src: str | None = None
    dst: str | None = None
    in_iface: str | None = None
    out_iface: str | None = None
    matches: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = ()
    target_args: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        def fix(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        if self.table not in BUILTIN_CHAINS:
            raise RuleError(f"unknown table {self.table!r} (known: {', '.join(BUILTIN_CHAINS)})")
        builtin = self.chain in BUILTIN_CHAINS[self.table]
        if not builtin:
            _check_user_chain(self.chain)
        if self.protocol is not None and self.protocol not in PROTOCOLS:
            raise RuleError(f"unknown protocol {self.protocol!r} (known: {', '.join(PROTOCOLS)})")
        for name in ("src", "dst"):
            value = getattr(self, name)
            if value is not None:
                fix(name, _canonical_net(value))
        for name in ("in_iface", "out_iface"):
            value = getattr(self, name)
            if value is not None and not _IFACE.match(_split_neg(value)[1]):
                raise RuleError(f"bad interface name {value!r}")
        if builtin and self.in_iface is not None and self.chain in ("OUTPUT", "POSTROUTING"):
            raise RuleError(f"{self.chain} has no input interface")
        if builtin and self.out_iface is not None and self.chain in ("INPUT", "PREROUTING"):
            raise RuleError(f"{self.chain} has no output interface")

        matches = []
        seen = set()
        for item in self.matches:
            try:
                name, params = item
            except (TypeError, ValueError):
                raise RuleError(f"a match is (name, ((key, value), ...)), not {item!r}") from None
            if name not in MATCHES:
                raise RuleError(f"unknown match {name!r} (known: {', '.join(MATCHES)})")
            params = _pairs(params, f"match {name}")
            if not params:
                raise RuleError(f"match {name} without parameters")
            if name in _MATCH_PROTOCOL and self.protocol != _MATCH_PROTOCOL[name]:
                raise RuleError(f"match {name} needs protocol {_MATCH_PROTOCOL[name]}")
            if (name, params) in seen:
                raise RuleError(f"duplicate match {name}")
            seen.add((name, params))
            canon = []
            for key, value in params:
                check = MATCHES[name].get(key)
                if check is None:
                    raise RuleError(
                        f"unknown key {key!r} for match {name} (known: {', '.join(MATCHES[name])})"
                    )
                try:
                    check(_split_neg(value)[1])
                except ValueError as e:
                    raise RuleError(f"match {name} --{key}: {e}") from None
                canon.append((key, canonical_match_value(name, key, value)))
            if name == "statistic":
                _check_nth(dict(canon))
            matches.append((name, tuple(canon)))
        fix("matches", tuple(matches))

        args = _pairs(self.target_args, f"target {self.target}")
        fix("target_args", args)
        if self.target in TARGETS:
            tables, chains, required, optional = TARGETS[self.target]
            if self.table not in tables:
                raise RuleError(f"target {self.target} is not valid in table {self.table}")
            if builtin and chains is not None and self.chain not in chains:
                raise RuleError(f"target {self.target} is not valid in chain {self.chain}")
            keys = [k for k, _ in args]
            unknown = [k for k in keys if k not in required + optional]
            missing = [k for k in required if k not in keys]
            if unknown or missing:
                raise RuleError(
                    f"target {self.target}: unknown {unknown} / missing {missing} arguments"
                )
            for key, value in args:
                if key == "to-ports":
                    try:
                        _port(value)
                    except ValueError as e:
                        raise RuleError(f"target {self.target} --to-ports: {e}") from None
                if key == "to-destination":
                    if self.protocol != "tcp":
                        raise RuleError("DNAT --to-destination with a port needs protocol tcp")
                    try:
                        _to_destination(value)
                    except ValueError as e:
                        raise RuleError(f"target {self.target} --to-destination: {e}") from None
                if key == "reject-with":
                    if value not in REJECT_WITH[4] + REJECT_WITH[6]:
                        raise RuleError(f"unknown --reject-with {value!r}")
                    if value == "tcp-reset" and self.protocol != "tcp":
                        raise RuleError("--reject-with tcp-reset needs protocol tcp")
        else:
            _check_user_chain(self.target)
            if args:
                raise RuleError(f"a jump to chain {self.target} takes no arguments")

    def describe(self, command: str = "-A", position: int | None = None) -> str:
        return format_rule(
            self.chain if position is None else f"{self.chain} {position}",
            protocol=self.protocol,
            src=self.src,
            dst=self.dst,
            in_iface=self.in_iface,
            out_iface=self.out_iface,
            matches=self.matches,
            target=self.target,
            target_args=self.target_args,
            command=command,
        )

    def addresses(self) -> list[str]:
        return [a for a in (self.src, self.dst) if a is not None]


def _check_nth(params: dict[str, str]) -> None:
    """`--mode nth --every N --packet P`, all three, P < N, none negated: the kernel
    would take a missing one as 0 and the rule would match never or always."""
    if set(params) != {"mode", "every", "packet"} or any(v.startswith("!") for v in
                                                         params.values()):
        raise RuleError(f"match statistic needs mode nth, every and packet, not negated: "
                        f"{params!r}")
    if int(params["packet"]) >= int(params["every"]):
        raise RuleError(f"match statistic: --packet {params['packet']} must be below "
                        f"--every {params['every']}")


def _check_user_chain(name: str) -> None:
    if not _USER_CHAIN.match(name) or len(name) > MAX_CHAIN_NAME:
        raise RuleError(
            f"unknown chain or target {name!r}: not built in, and our own chains are named "
            f"{CHAIN_PREFIX}... with at most {MAX_CHAIN_NAME} characters"
        )


def chain_prefix(tag: str) -> str:
    """`PANO-<TAG>-`: the prefix of every host chain of the instance tagged `tag`."""
    if not isinstance(tag, str) or not _TAG.match(tag):
        raise RuleError(f"an instance tag is 8 hexadecimal characters, not {tag!r}")
    return f"{CHAIN_PREFIX}{tag.upper()}-"


@dataclasses.dataclass(frozen=True)
class RuleSet:
    """The rules of one address family (see the module docstring for `tag`).

    `policies` maps (table, built-in chain) to ACCEPT or DROP; `chains` lists the user
    chains to create as (table, name); `rules` are in order, per chain. Raises
    `RuleError` if a rule does not fit the family or refers to an undeclared chain.
    """

    family: int
    rules: tuple[Rule, ...] = ()
    policies: dict[tuple[str, str], str] = dataclasses.field(default_factory=dict, hash=False)
    chains: tuple[tuple[str, str], ...] = ()
    tag: str | None = None

    def __post_init__(self) -> None:
        if self.family not in (4, 6):
            raise RuleError(f"family is 4 or 6, not {self.family!r}")
        object.__setattr__(self, "rules", tuple(self.rules))
        object.__setattr__(self, "chains", tuple((t, c) for t, c in self.chains))
        object.__setattr__(self, "policies", dict(self.policies))
        prefix = None
        if self.tag is not None:
            prefix = chain_prefix(self.tag)
            object.__setattr__(self, "tag", self.tag.upper())
            if self.policies:
                raise RuleError("a tagged rule set must not change built-in chain policies")

        for (table, chain), policy in self.policies.items():
            if chain not in BUILTIN_CHAINS.get(table, ()):
                raise RuleError(f"policy for {table} {chain}: not a built-in chain")
            if policy not in POLICIES or (table == "nat" and policy != "ACCEPT"):
                raise RuleError(f"policy {policy!r} not valid for {table} {chain}")
        if len(set(self.chains)) != len(self.chains):
            raise RuleError(f"duplicate chain in {self.chains!r}")
        for table, chain in self.chains:
            if table not in BUILTIN_CHAINS:
                raise RuleError(f"unknown table {table!r}")
            _check_user_chain(chain)
            if prefix is not None and not chain.startswith(prefix):
                raise RuleError(
                    f"chain {chain} of a rule set tagged {self.tag} must start {prefix}"
                )

        for rule in self.rules:
            if not isinstance(rule, Rule):
                raise RuleError(f"not a Rule: {rule!r}")
            where = rule.describe()
            builtin = rule.chain in BUILTIN_CHAINS[rule.table]
            if not builtin and (rule.table, rule.chain) not in self.chains:
                raise RuleError(f"{where}: chain {rule.chain} is not declared in {rule.table}")
            if rule.target not in TARGETS and (rule.table, rule.target) not in self.chains:
                raise RuleError(f"{where}: target chain {rule.target} is not declared")
            if prefix is not None and builtin and not rule.target.startswith(prefix):
                raise RuleError(f"{where}: a tagged rule set adds only jumps to its own chains")
            for addr in rule.addresses():
                if ipaddress.ip_network(_split_neg(addr)[1]).version != self.family:
                    raise RuleError(f"{where}: {addr} is not an IPv{self.family} network")
            if rule.protocol == ("icmpv6" if self.family == 4 else "icmp"):
                raise RuleError(f"{where}: protocol {rule.protocol} in IPv{self.family}")
            for key, value in rule.target_args:
                if key == "reject-with" and value not in REJECT_WITH[self.family]:
                    raise RuleError(f"{where}: --reject-with {value} is not for IPv{self.family}")
                if key == "to-destination" and value.startswith("[") != (self.family == 6):
                    raise RuleError(f"{where}: {value} is not an IPv{self.family} destination")

    @property
    def tables(self) -> tuple[str, ...]:
        """The tables this rule set touches, filter first."""
        used = {t for t, _ in self.policies} | {t for t, _ in self.chains}
        used |= {r.table for r in self.rules}
        return tuple(t for t in BUILTIN_CHAINS if t in used)

    def owns_chain(self, chain: str) -> bool:
        """Whether a chain of this name belongs to this rule set (tagged sets only)."""
        return self.tag is not None and chain.startswith(chain_prefix(self.tag))

    def chain_rules(self, table: str, chain: str) -> list[Rule]:
        return [r for r in self.rules if r.table == table and r.chain == chain]

    def describe(self) -> list[str]:
        """The plan in iptables-save syntax; jumps a tagged set inserts are shown as -I."""
        tool = "iptables-legacy-save" if self.family == 4 else "ip6tables-legacy-save"
        scope = "whole tables" if self.tag is None else f"only chains {chain_prefix(self.tag)}*"
        lines = [f"# IPv{self.family}, {scope} (compare: {tool})"]
        for table in self.tables:
            lines.append(f"*{table}")
            for chain in BUILTIN_CHAINS[table]:
                if self.tag is None:
                    lines.append(f":{chain} {self.policies.get((table, chain), 'ACCEPT')}")
            lines += [f":{c} -" for t, c in self.chains if t == table]
            positions: dict[str, int] = {}
            for rule in self.rules:
                if rule.table != table:
                    continue
                if self.tag is not None and rule.chain in BUILTIN_CHAINS[table]:
                    positions[rule.chain] = positions.get(rule.chain, 0) + 1
                    lines.append(rule.describe("-I", positions[rule.chain]))
                else:
                    lines.append(rule.describe())
            lines.append("COMMIT")
        return lines


def _family_addresses(family: int, addresses: Iterable[str], what: str) -> list[str]:
    out = []
    for a in addresses:
        try:
            ip = ipaddress.ip_address(a)
        except ValueError:
            raise RuleError(f"{what}: {a!r} is not an IP address") from None
        if ip.version == family:
            out.append(f"{ip}/{ip.max_prefixlen}")
    return out


def _blocked(family: int, blocked_ranges: Sequence[str] | None) -> list[str]:
    ranges = BLOCKED_RANGES[family] if blocked_ranges is None else blocked_ranges
    out = []
    for r in ranges:
        net = ipaddress.ip_network(_canonical_net(r))
        if net.version == family:
            out.append(str(net))
    return out


def _family_networks(family: int, networks: Sequence[str]) -> list[str]:
    out = []
    for n in networks:
        net = ipaddress.ip_network(_canonical_net(n))
        if net.version == family:
            out.append(str(net))
    return out


def _tcp_ports(ports: Sequence[int]) -> list[str]:
    """The ports of TCP rules, checked, sorted; never 53, 80 or 443 (handled already)."""
    out = sorted({int(_check_port(p, "tcp port")) for p in ports})
    if {53, 80, 443} & set(out):
        raise RuleError("a TCP rule port cannot be 53, 80 or 443")
    return [str(p) for p in out]


def _check_port(value: int, what: str) -> str:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 65535:
        raise RuleError(f"{what} must be a port number, not {value!r}")
    return str(value)


def _reject(family: int) -> tuple[tuple[str, str], ...]:
    return (("reject-with", "icmp-port-unreachable" if family == 4 else "icmp6-port-unreachable"),)


_RESET = (("reject-with", "tcp-reset"),)
Match = tuple[str, tuple[tuple[str, str], ...]]


def _ct(states: str) -> Match:
    return ("conntrack", (("ctstate", states),))


def _dport(proto: str, port: int | str) -> Match:
    return (proto, (("dport", str(port)),))


def _nd(family: int, chain: str, types: Sequence[str]) -> list[Rule]:
    if family != 6:
        return []
    icmp6 = [("icmp6", (("icmpv6-type", t),)) for t in types]
    return [Rule("filter", chain, "ACCEPT", protocol="icmpv6", matches=(m,)) for m in icmp6]


def _to_dns(chain: str, servers: Sequence[str], *first: Match, **fields: Any) -> list[Rule]:
    return [
        Rule("filter", chain, "ACCEPT", protocol=proto, dst=server,
             matches=(*first, _dport(proto, 53)), **fields)
        for server in servers
        for proto in ("udp", "tcp")
    ]  # fmt: skip


def _refuse(family: int, chain: str, *matches: Match, **fields: Any) -> list[Rule]:
    """REJECT, with a reset for TCP.

    An ICMP error that reaches a socket still inside connect() is only a soft error, and
    the connection hangs until the SYN is resent (measured: 1 s over IPv6); a reset ends
    it at once.
    """
    return [
        Rule("filter", chain, "REJECT", protocol="tcp", matches=matches, target_args=_RESET,
             **fields),
        Rule("filter", chain, "REJECT", matches=matches, target_args=_reject(family), **fields),
    ]  # fmt: skip


def killswitch(family: int) -> RuleSet:
    """DROP on every filter chain, loopback only: what an instance gets before anything else."""
    return RuleSet(
        family,
        policies={("filter", c): "DROP" for c in BUILTIN_CHAINS["filter"]},
        rules=(
            Rule("filter", "INPUT", "ACCEPT", in_iface="lo"),
            Rule("filter", "OUTPUT", "ACCEPT", out_iface="lo"),
        ),
    )


def jail_rules(
    family: int,
    *,
    proxy_uid: int,
    transparent_port: int,
    dns_port: int,
    dns_servers: Sequence[str],
    blocked_ranges: Sequence[str] | None = None,
    inbound: Sequence[tuple[int, Sequence[str]]] = (),
    veth: str | None = None,
    tcp_ports: Sequence[int] = (),
    workers: int = 1,
) -> RuleSet:
    """The rules inside the instance namespace, owning its filter and nat tables.

    Everything the agent sends to TCP 80/443 or to port 53 is redirected to the proxy's
    listeners on loopback; only the proxy user (`proxy_uid`) leaves the namespace, and
    only to the DNS servers of this family (port 53) and to addresses outside
    `blocked_ranges` on TCP 80 and 443. `blocked_ranges` defaults to
    `BLOCKED_RANGES[family]`; entries of the other family are ignored. `tcp_ports`
    (the ports of TCP rules, destinations.py) are redirected and let out like 80 and 443:
    the proxy decides what may pass on them.

    `inbound` lists the proxy's inbound listeners as (port, source networks): reachable
    only through the veth `veth`, only from those sources, and never from inside the
    jail (see inbound.py). Sources of the other family are ignored.

    `workers` proxies listen on `transparent_port`, `transparent_port + 1`, ...: each
    redirected TCP port gets one REDIRECT per worker, and new connections are spread
    over them in turn (`statistic --mode nth`, see `spread`). The nat table sees only a
    connection's first packet, so a connection stays on the worker it was given.
    """
    if family not in (4, 6):
        raise RuleError(f"family is 4 or 6, not {family!r}")
    if not isinstance(proxy_uid, int) or isinstance(proxy_uid, bool) or proxy_uid < 0:
        raise RuleError(f"proxy_uid must be a uid, not {proxy_uid!r}")
    uid: Match = ("owner", (("uid-owner", str(proxy_uid)),))
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise RuleError(f"workers must be a count of at least 1, not {workers!r}")
    ts = [_check_port(transparent_port + i, "transparent_port") for i in range(workers)]
    d = _check_port(dns_port, "dns_port")
    if d in ts:
        raise RuleError("the transparent ports and dns_port must differ")
    servers = _family_addresses(family, dns_servers, "dns_servers")
    blocked = _blocked(family, blocked_ranges)
    reject = _reject(family)
    if inbound and veth is None:
        raise RuleError("inbound listeners need the jail's veth")
    published = [(_check_port(port, "inbound port"), _family_networks(family, sources))
                 for port, sources in inbound]
    if {*ts, d} & {p for p, _ in published}:
        raise RuleError("an inbound port collides with the transparent or DNS port")
    extra = _tcp_ports(tcp_ports)

    def redirect(proto: str, port: int, to: str, *more: Match) -> Rule:
        return Rule("nat", "OUTPUT", "REDIRECT", protocol=proto,
                    matches=(_dport(proto, port), *more), target_args=(("to-ports", to),))

    def to_workers(port: int) -> list[Rule]:
        return [redirect("tcp", port, to, *nth) for to, nth in zip(ts, spread(workers))]

    def out(target: str, *matches: Match, **fields: Any) -> Rule:
        return Rule("filter", "OUTPUT", target, matches=matches, **fields)

    nat = [
        Rule("nat", "OUTPUT", "RETURN", matches=(uid,)),
        # Before the loopback RETURN, or a stub resolver on 127.0.0.53 would escape.
        redirect("udp", 53, d),
        redirect("tcp", 53, d),
        Rule("nat", "OUTPUT", "RETURN", out_iface="lo"),
        *to_workers(80),
        *to_workers(443),
        *[r for port in extra for r in to_workers(port)],
    ]
    f_in = [
        Rule("filter", "INPUT", "ACCEPT", in_iface="lo"),
        Rule("filter", "INPUT", "ACCEPT", matches=(_ct("ESTABLISHED,RELATED"),)),
        *_nd(family, "INPUT", ND_IN),
        *[Rule("filter", "INPUT", "ACCEPT", protocol="tcp", in_iface=veth, src=src,
               matches=(_dport("tcp", port),))
          for port, sources in published for src in sources],
    ]  # fmt: skip
    # Direct connections to the proxy's listeners are refused: the agent must come
    # through the REDIRECT (ctstate DNAT), and the proxy user reaching them would make
    # the transparent proxy loop to itself. ESTABLISHED,RELATED is accepted before these
    # so that a reply whose destination port happens to equal a listener port (the
    # client's ephemeral port) is never refused.
    no_listeners = [
        out("REJECT", _dport(proto, port), who, protocol=proto, out_iface="lo", target_args=how)
        for proto, port, how in (*[("tcp", p, _RESET) for p in ts], ("udp", d, reject),
                                 ("tcp", d, _RESET))
        for who in (_ct("!DNAT"), uid)
    ] + [
        # The inbound listeners serve the veth only: the agent would otherwise reach
        # its own services through the proxy as if it were an allowed client.
        out("REJECT", _dport("tcp", port), protocol="tcp", out_iface="lo", target_args=_RESET)
        for port, _ in published
    ]
    f_out = [
        out("ACCEPT", _ct("ESTABLISHED,RELATED")),
        *no_listeners,
        out("ACCEPT", out_iface="lo"),
        # A REDIRECTed packet keeps its original output interface, so `-o lo` misses it.
        out("ACCEPT", _ct("DNAT")),
        *_nd(family, "OUTPUT", ND_OUT),
        *_to_dns("OUTPUT", servers, uid),
        *[r for net in blocked for r in _refuse(family, "OUTPUT", uid, dst=net)],
        out("ACCEPT", uid, _dport("tcp", 80), protocol="tcp"),
        out("ACCEPT", uid, _dport("tcp", 443), protocol="tcp"),
        *[out("ACCEPT", uid, _dport("tcp", port), protocol="tcp") for port in extra],
        # Refused rather than dropped: QUIC falls back to TCP at once, TCP fails at once.
        out("REJECT", _dport("udp", 443), protocol="udp", target_args=reject),
        *_refuse(family, "OUTPUT"),
    ]  # fmt: skip
    return RuleSet(
        family,
        policies={("filter", c): "DROP" for c in BUILTIN_CHAINS["filter"]},
        rules=tuple(nat + f_in + f_out),
    )


def spread(workers: int) -> list[tuple[Match, ...]]:
    """The extra matches of each worker's REDIRECT, in rule order, so that new
    connections go to the workers in turn.

    Each nth match keeps its own counter and sees only what the rules before it let
    through: rule i of N sees N - i of every N connections and takes one of them
    (`--every N-i --packet 0`), and the last takes whatever is left (no match at all,
    so that no connection can fall through the REDIRECTs and go unproxied).
    """
    return [(("statistic", (("mode", "nth"), ("every", str(workers - i)), ("packet", "0"))),)
            for i in range(workers - 1)] + [()]


def host_chains(tag: str) -> dict[str, tuple[str, str]]:
    """The host chains of an instance: role -> (table, name)."""
    prefix = chain_prefix(tag)
    return {
        "IN": ("filter", prefix + "IN"),
        "FWD": ("filter", prefix + "FWD"),
        "NAT": ("nat", prefix + "NAT"),
    }


def host_rules(
    family: int,
    *,
    tag: str,
    veth_host: str,
    subnet: str,
    dns_servers: Sequence[str],
    blocked_ranges: Sequence[str] | None = None,
    tcp_ports: Sequence[int] = (),
) -> RuleSet:
    """The rules in the host namespace for one instance, in chains `PANO-<TAG>-*` only.

    Input from the instance's veth is refused except DNS to `dns_servers` (a resolver on
    a host address) and, for IPv6, neighbour discovery. Forwarding from the veth allows
    DNS to `dns_servers` and TCP 80/443 (and `tcp_ports`) to anything outside
    `blocked_ranges` (default `BLOCKED_RANGES[family]`), plus the return traffic; the
    instance `subnet` is masqueraded on the way out.
    """
    if family not in (4, 6):
        raise RuleError(f"family is 4 or 6, not {family!r}")
    chains = host_chains(tag)
    c_in, c_fwd, c_nat = chains["IN"][1], chains["FWD"][1], chains["NAT"][1]
    net = _canonical_net(subnet)
    if net.startswith("!") or ipaddress.ip_network(net).version != family:
        raise RuleError(f"subnet {subnet!r} is not an IPv{family} network")
    servers = _family_addresses(family, dns_servers, "dns_servers")
    blocked = _blocked(family, blocked_ranges)
    extra = _tcp_ports(tcp_ports)
    veth = {"in_iface": veth_host}

    def fwd(target: str, *matches: Match, **fields: Any) -> Rule:
        return Rule("filter", c_fwd, target, matches=matches, **fields)

    rules = [
        Rule("filter", "INPUT", c_in, in_iface=veth_host),
        Rule("filter", "FORWARD", c_fwd, in_iface=veth_host),
        Rule("filter", "FORWARD", c_fwd, out_iface=veth_host),
        Rule("nat", "POSTROUTING", c_nat, src=net),
        # The proxy user must not reach the host's own services.
        *_nd(family, c_in, ND_OUT),
        *_to_dns(c_in, servers),
        *_refuse(family, c_in),
        fwd("ACCEPT", _ct("ESTABLISHED,RELATED"), out_iface=veth_host),
        *_to_dns(c_fwd, servers, **veth),
        *[fwd("REJECT", dst=net, target_args=_reject(family), **veth) for net in blocked],
        fwd("ACCEPT", _dport("tcp", 80), protocol="tcp", **veth),
        fwd("ACCEPT", _dport("tcp", 443), protocol="tcp", **veth),
        *[fwd("ACCEPT", _dport("tcp", port), protocol="tcp", **veth) for port in extra],
        *_refuse(family, c_fwd),
        Rule("nat", c_nat, "MASQUERADE", src=net, out_iface="!" + veth_host),
    ]  # fmt: skip
    return RuleSet(family, rules=tuple(rules), chains=tuple(chains.values()), tag=tag)
