"""The config keys of destinations.py, and the scope check of every allowing pattern.

Pure. Used by config.py's `_Checker` (the `checker` argument: its `fail`, `array`,
`string` and `table` report errors with file, line and dotted key):

    allow_cidrs = ["10.20.0.0/16", "198.51.100.7"]     # [defaults] and [agents.NAME]
    passthrough = ["*.pinned.example"]
    allow = [{ host = "github.com", port = 22 }]       # beside host strings and rules

An agent's lists are added to those of [defaults], like allow.
"""

from __future__ import annotations

from typing import Any

from panopticond.addresses import parse_network
from panopticond.destinations import check_port
from panopticond.policy import HostPattern
from panopticond.suffixes import HINT as SCOPE_HINT
from panopticond.suffixes import wildcard_problem

KEYS = ("allow_cidrs", "passthrough")

_CIDR_HINT = ('networks or addresses the agent may reach by address, and the proxy may '
              'connect to although they are private, e.g. ["10.20.0.0/16", "198.51.100.7"]')
_PORT_HINT = 'a TCP rule is { host = "github.com", port = 22 }'
_PATTERN_HINT = "a host pattern is a name ('api.example.com'), '*.example.com' or an IP address"


def scope_problem(pattern: HostPattern) -> str | None:
    """Why an allowing `pattern` reaches too far (a wildcard over a public suffix or a
    multi-tenant platform, or `*`), or None. Deny patterns may be as broad as they like."""
    return wildcard_problem(pattern.base) if pattern.wildcard else None


def is_port_rule(item: Any) -> bool:
    """Whether an element of an allow array is a TCP port rule (a table with a port)."""
    return isinstance(item, dict) and "port" in item


def agent_fields(checker, t: dict[str, Any], p: tuple, defaults=None) -> dict[str, Any]:
    """`allow_cidrs`, `passthrough` and `ports` of an AgentConfig, from table `t` at
    path `p`, added to those of `defaults` (an AgentConfig, or None for [defaults])."""
    base = (defaults.allow_cidrs, defaults.passthrough, defaults.ports) if defaults else ((),) * 3
    return {
        "allow_cidrs": _dedupe(base[0] + _cidrs(checker, t.get("allow_cidrs", []),
                                                (*p, "allow_cidrs"))),
        "passthrough": _dedupe(base[1] + _patterns(checker, t.get("passthrough", []),
                                                   (*p, "passthrough"))),
        "ports": _dedupe(base[2] + _ports(checker, t.get("allow", []), (*p, "allow"))),
    }


def _cidrs(checker, value: Any, path: tuple) -> tuple[str, ...]:
    out = []
    for i, item in enumerate(checker.array(value, path)):
        text = checker.string(item, (*path, i))
        try:
            out.append(str(parse_network(text)))
        except ValueError as e:
            checker.fail((*path, i), str(e), hint=_CIDR_HINT)
    return tuple(out)


def _pattern(checker, text: str, path: tuple) -> HostPattern:
    try:
        pattern = HostPattern.parse(text)
    except ValueError as e:
        checker.fail(path, str(e), hint=_PATTERN_HINT)
    problem = scope_problem(pattern)
    if problem:
        checker.fail(path, problem, hint=SCOPE_HINT)
    return pattern


def _patterns(checker, value: Any, path: tuple) -> tuple[str, ...]:
    return tuple(str(_pattern(checker, checker.string(item, (*path, i)), (*path, i)))
                 for i, item in enumerate(checker.array(value, path)))


def _ports(checker, value: Any, path: tuple) -> tuple[tuple[str, int], ...]:
    out = []
    for i, item in enumerate(checker.array(value, path)):
        if not is_port_rule(item):
            continue  # host strings and method/path rules: config.py
        p = (*path, i)
        t = checker.table(item, p, ("host", "port"))
        if "host" not in t:
            checker.fail(p, "a TCP rule has no 'host'", hint=_PORT_HINT)
        host = _pattern(checker, checker.string(t["host"], (*p, "host")), (*p, "host"))
        try:
            port = check_port(t["port"])
        except ValueError as e:
            checker.fail((*p, "port"), str(e), hint=_PORT_HINT)
        out.append((str(host), port))
    return tuple(out)


def _dedupe(items: tuple) -> tuple:
    return tuple(dict.fromkeys(items))
