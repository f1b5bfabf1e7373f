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
import functools
import ipaddress
import re
from typing import TYPE_CHECKING, Any

import idna

from panopticond.addresses import AddressGuard
from panopticond.paths import PathPattern, RequestPath

if TYPE_CHECKING:  # destinations.py imports this module
    from panopticond.destinations import Destinations

POLICY_VERSION = 1

ENFORCE, DISCOVER = "enforce", "discover"
MODES = (ENFORCE, DISCOVER)

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
    if _is_ip(h):
        return str(ipaddress.ip_address(h))
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


class _PatternIndex:
    """Host patterns indexed for lookup in time independent of their number.

    A canonical name matches a pattern whose base is the name itself, or a wildcard whose
    base is one of the name's dot-separated suffixes (never for an IP address): so one
    dict probe per label replaces a scan of every pattern. Lookups give the position of
    every matching pattern, so that callers keep the first-in-order semantics of a scan.
    """

    def __init__(self, patterns: tuple[HostPattern, ...]):
        self.exact: dict[str, list[int]] = {}  # base -> positions of every pattern on it
        self.wild: dict[str, list[int]] = {}  # base -> positions of its wildcards
        for i, p in enumerate(patterns):
            self.exact.setdefault(p.base, []).append(i)
            if p.wildcard:
                self.wild.setdefault(p.base, []).append(i)

    def positions(self, host: str, is_ip: bool | None = None) -> list[int]:
        """Sorted positions of the patterns that match canonical `host`."""
        found = list(self.exact.get(host, ()))
        if self.wild and not (_is_ip(host) if is_ip is None else is_ip):
            dot = host.find(".")
            while dot >= 0:
                found += self.wild.get(host[dot + 1 :], ())
                dot = host.find(".", dot + 1)
        found.sort()
        return found

    def first(self, host: str, is_ip: bool | None = None) -> int | None:
        found = self.positions(host, is_ip)
        return found[0] if found else None


def _is_ip(h: str) -> bool:
    # Cheap and exact: an IPv4 literal ends in a digit and an IPv6 one holds a colon.
    # Names are judged on every request, and most end in a letter.
    if not h or (not h[-1].isdigit() and ":" not in h):
        return False
    try:
        ipaddress.ip_address(h)
        return True
    except ValueError:
        return False


@dataclasses.dataclass(frozen=True)
class Decision:
    """What the policy decided. In discover mode `allowed` is true and `would` holds what
    enforce mode would have decided; a decision with `final` set (the addresses the proxy
    must never reach) is never relaxed by any mode: whatever decides those sets it."""

    allowed: bool
    rule: str | None  # the pattern that decided, or None for the default
    reason: str  # short, safe to show to the agent and to log
    mode: str = ENFORCE
    would: Decision | None = None
    final: bool = False

    @property
    def action(self) -> str:
        return "allow" if self.allowed else "deny"

    @property
    def would_action(self) -> str:
        """What enforce mode does (or would do) with this request."""
        return (self.would or self).action


_METHOD = re.compile(r"[A-Z][A-Z0-9_-]{0,31}")


@dataclasses.dataclass(frozen=True)
class RequestRule:
    """`{ host = "api.github.com", methods = ["GET"], paths = ["/repos/acme/*"] }`.

    Allows a request to a host the pattern matches whose method is one of `methods` and
    whose path (every reading of it, see paths.py) matches one of `paths`; None means any
    method, or any path. The query string is never looked at.
    """

    host: HostPattern
    methods: tuple[str, ...] | None = None
    paths: tuple[PathPattern, ...] | None = None

    @classmethod
    def parse(
        cls, host: str, methods: list[str] | tuple[str, ...] | None = None,
        paths: list[str] | tuple[str, ...] | None = None,
    ) -> RequestRule:
        """ValueError (saying why) on a bad host pattern, method or path pattern."""
        return cls(
            host=HostPattern.parse(host),
            methods=None if methods is None else _dedupe(parse_method(m) for m in methods),
            paths=None if paths is None else _dedupe(PathPattern.parse(p) for p in paths),
        )

    def allows(self, method: str | None, path: RequestPath | None) -> bool:
        """The host is already matched; None (not known yet) is taken as possible."""
        if method is not None and self.methods is not None and method not in self.methods:
            return False
        if path is not None and self.paths is not None:
            return any(p.matches(path) for p in self.paths)
        return True

    def to_dict(self) -> dict[str, Any]:
        return {
            "host": str(self.host),
            "methods": None if self.methods is None else list(self.methods),
            "paths": None if self.paths is None else [str(p) for p in self.paths],
        }

    def __str__(self) -> str:
        parts = [str(self.host)]
        if self.methods is not None:
            parts.append(",".join(self.methods))
        if self.paths is not None:
            parts.append(" ".join(str(p) for p in self.paths))
        return " ".join(parts)


def parse_method(text: str) -> str:
    """An HTTP method as rules hold it (upper case), or ValueError."""
    m = text.strip().upper()
    if not _METHOD.fullmatch(m):
        raise ValueError(f"{text!r} is not an HTTP method")
    if m == "CONNECT":
        raise ValueError("CONNECT is never allowed: the proxy relays no tunnels")
    return m


# Headers that frame the message or name its destination: setting them would smuggle a
# request or front another host.
FORBIDDEN_HEADERS = frozenset({
    "host", "content-length", "transfer-encoding", "connection", "keep-alive", "te",
    "trailer", "upgrade", "expect", "proxy-connection", "proxy-authorization",
    "proxy-authenticate",
})
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_HEADER_VALUE = re.compile(r"[\x20-\x7e\t]*")


def header_problem(name: str, value: str | None = None) -> str | None:
    """Why `name: value` cannot be added to requests, or None if it can."""
    if not _TOKEN.fullmatch(name):
        return f"{name!r} is not a valid header name"
    if name.lower() in FORBIDDEN_HEADERS:
        return f"the {name} header cannot be set: it frames the request or names its host"
    if value is not None and not _HEADER_VALUE.fullmatch(value):
        return f"the value of {name} holds a line break, NUL or non-ASCII character"
    return None


@dataclasses.dataclass(frozen=True)
class HeaderRule:
    """Request headers set (replacing any the agent sent) on requests to matching hosts."""

    host: HostPattern
    headers: tuple[tuple[str, str], ...]

    @classmethod
    def parse(cls, host: str, headers: dict[str, str] | list | tuple) -> HeaderRule:
        items = tuple(headers.items() if isinstance(headers, dict) else headers)
        for item in items:
            if (not isinstance(item, (list, tuple)) or len(item) != 2
                    or not all(isinstance(x, str) for x in item)):
                raise ValueError(f"a header is a [name, value] pair of strings, not {item!r}")
            problem = header_problem(item[0], item[1])
            if problem:
                raise ValueError(problem)
        return cls(HostPattern.parse(host), tuple((str(n), str(v)) for n, v in items))


def _dedupe(items):
    return tuple(dict.fromkeys(items))


@dataclasses.dataclass(frozen=True)
class Policy:
    """An agent's compiled host policy."""

    instance: str
    allow: tuple[HostPattern, ...] = ()
    deny: tuple[HostPattern, ...] = ()
    # Where an operator adds a host so that it is allowed, e.g. "agents.openclaw.allow"
    # in /etc/panopticon/config.toml; quoted in 403 pages and summaries.
    allow_hint: str = ""
    # Method/path rules, beside the plain host patterns of `allow` (which allow any request).
    rules: tuple[RequestRule, ...] = ()
    mode: str = ENFORCE
    headers: tuple[HeaderRule, ...] = ()
    # allow_cidrs, passthrough and port rules (destinations.py); None: none of them.
    destinations: Destinations | None = None

    @classmethod
    def build(
        cls, instance: str, allow: tuple[str, ...] | list[str], deny: tuple[str, ...] | list[str],
        allow_hint: str = "", *, rules: tuple[RequestRule, ...] | list[RequestRule] = (),
        mode: str = ENFORCE, headers: tuple[HeaderRule, ...] | list[HeaderRule] = (),
        destinations: Destinations | None = None,
    ) -> Policy:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}")
        return cls(
            instance=instance,
            allow=tuple(HostPattern.parse(p) for p in allow),
            deny=tuple(HostPattern.parse(p) for p in deny),
            allow_hint=allow_hint,
            rules=tuple(rules),
            mode=mode,
            headers=tuple(headers),
            destinations=destinations,
        )

    def decide(self, host: str, method: str | None = None, path: str | None = None) -> Decision:
        """The decision on a request to `host` (the name judged: SNI, Host, DNS question).

        `method` and `path` (the request target; its query is ignored) are those of an
        HTTP request. Without them (at DNS or TLS time) the question is whether the host
        may be reached at all: a host with only method/path rules is allowed, and each
        request on it is judged again with its method and path.
        """
        d = self._enforce(host, method, path)
        if self.mode == DISCOVER:
            if d.final:  # refused in every mode; the log still says which mode judged it
                return dataclasses.replace(d, mode=DISCOVER)
            reason = d.reason if d.allowed else f"{d.reason} (allowed in discover mode)"
            return Decision(True, d.rule, reason, mode=DISCOVER, would=d)
        return d

    def _enforce(self, host: str, method: str | None, path: str | None) -> Decision:
        try:
            h = canonical_host(host)
        except ValueError:
            return Decision(False, None, "invalid host name")
        ip = _is_ip(h)
        if (i := self._index[0].first(h, ip)) is not None:
            p = self.deny[i]
            return Decision(False, str(p), f"denied by {p}")
        if ip:
            # Whatever allows it, and in any mode, unless allow_cidrs covers it.
            why = AddressGuard(self.destinations.allow_cidrs if self.destinations else ()
                               ).refusal(h)
            if why:
                return Decision(False, None, why, final=True)
        if (i := self._index[1].first(h, ip)) is not None:
            p = self.allow[i]
            return Decision(True, str(p), f"allowed by {p}")
        cidr = self.destinations.cidr_for(h) if self.destinations is not None else None
        if cidr is not None:
            return Decision(True, cidr, f"allowed by allow_cidrs {cidr}")
        rules = [self.rules[i] for i in self._index[2].positions(h, ip)]
        if not rules:
            return Decision(False, None, "not in the allowlist")
        rp = None if path is None else RequestPath.of(path)
        for r in rules:
            if r.allows(method, rp):
                partly = method is None or path is None
                return Decision(True, str(r), f"allowed{' for some requests' if partly else ''} "
                                f"by {r}")
        # Say which part failed, without quoting the agent's path (it may hold anything).
        if method is not None and not any(r.allows(method, None) for r in rules):
            shown = method if _METHOD.fullmatch(method) else "this method"
            return Decision(False, None, f"{shown} is not allowed by the rules for {h}")
        if rp is not None and rp.path is None:
            return Decision(False, None, f"the path is invalid or ambiguous, and the rules "
                            f"for {h} allow only some paths")
        return Decision(False, None, f"the path is not allowed by the rules for {h}")

    @functools.cached_property
    def _index(self) -> tuple[_PatternIndex, _PatternIndex, _PatternIndex]:
        """deny, allow and rules indexed once per policy (a policy may hold 10,000 rules)."""
        return (_PatternIndex(self.deny), _PatternIndex(self.allow),
                _PatternIndex(tuple(r.host for r in self.rules)))

    def headers_for(self, host: str) -> list[tuple[str, str]]:
        """The headers to set on an allowed request to `host`, in config order (a later
        rule's value for the same name wins)."""
        try:
            h = canonical_host(host)
        except ValueError:
            return []
        out: dict[str, tuple[str, str]] = {}
        for rule in self.headers:
            if rule.host.matches(h):
                for name, value in rule.headers:
                    out[name.lower()] = (name, value)
        return list(out.values())

    def to_dict(self) -> dict[str, Any]:
        d = {
            "version": POLICY_VERSION,
            "instance": self.instance,
            "allow": [str(p) for p in self.allow],
            "deny": [str(p) for p in self.deny],
            "allow_hint": self.allow_hint,
            "rules": [r.to_dict() for r in self.rules],
            "mode": self.mode,
            "headers": [{"host": str(h.host), "set": [list(kv) for kv in h.headers]}
                        for h in self.headers],
        }
        if self.destinations is not None:
            d["destinations"] = self.destinations.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Policy:
        """Strict: anything unexpected raises ValueError (the proxy then denies everything)."""
        if not isinstance(d, dict) or type(d.get("version")) is not int \
                or d["version"] != POLICY_VERSION:
            raise ValueError("not a panopticon policy of a known version")
        unknown = set(d) - {"version", "instance", "allow", "deny", "allow_hint", "rules",
                            "mode", "headers", "destinations"}
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
        mode = d.get("mode", ENFORCE)
        if mode not in MODES:
            raise ValueError(f"policy 'mode' must be one of {list(MODES)}")
        return cls.build(d["instance"], d["allow"], d["deny"], d.get("allow_hint", ""),
                         rules=[_rule_from_dict(r) for r in _list(d, "rules")], mode=mode,
                         headers=[_headers_from_dict(h) for h in _list(d, "headers")],
                         destinations=_destinations_from_dict(d.get("destinations")))


def _destinations_from_dict(d: Any) -> Destinations | None:
    from panopticond.destinations import Destinations

    return None if d is None else Destinations.from_dict(d)


def _list(d: dict[str, Any], key: str) -> list[Any]:
    value = d.get(key, [])
    if not isinstance(value, list):
        raise ValueError(f"policy {key!r} must be a list")
    return value


def _rule_from_dict(r: Any) -> RequestRule:
    if not isinstance(r, dict) or set(r) != {"host", "methods", "paths"}:
        raise ValueError("a policy rule has exactly the keys host, methods and paths")
    if not isinstance(r["host"], str):
        raise ValueError("a rule's host must be a string")
    for k in ("methods", "paths"):
        v = r[k]
        if v is not None and (not isinstance(v, list) or not v
                              or not all(isinstance(x, str) for x in v)):
            raise ValueError(f"a rule's {k} must be null or a non-empty list of strings")
    return RequestRule.parse(r["host"], r["methods"], r["paths"])


def _headers_from_dict(h: Any) -> HeaderRule:
    if not isinstance(h, dict) or set(h) != {"host", "set"} or not isinstance(h["host"], str) \
            or not isinstance(h["set"], list):
        raise ValueError("a policy header rule is {host: str, set: [[name, value], ...]}")
    return HeaderRule.parse(h["host"], h["set"])
