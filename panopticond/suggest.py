"""From observed traffic to policy: `policy suggest`, `policy replay`, and the summary
that `panopticon run` prints at its end.

Pure: records in (see logread), text out; no mitmproxy. Names are grouped under
`*.DOMAIN` (DOMAIN the registrable domain, from the public suffix list) once `min_group`
distinct names were seen under it, and only where the config accepts that wildcard
(suffixes.py: never at or over a public suffix, private-section ones included, nor over
a multi-tenant platform such as github.io or amazonaws.com); otherwise, and for IP
addresses, names are listed one by one.
"""

from __future__ import annotations

import collections
import dataclasses
import ipaddress
import json
from collections.abc import Callable, Iterable

from . import suffixes
from .logread import Record, clean, record_host, record_time

_CONTACT_KINDS = ("http", "tcp", "udp", "tls")  # the agent connected (or tried to)
NOT_ALLOWED = "not in the allowlist"


def wildcard_base(host: str) -> str | None:
    """The domain under which canonical `host` may be grouped (`*.DOMAIN`), or None."""
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        pass
    base = suffixes.registrable_domain(host)
    return base if suffixes.wildcard_problem(base) is None else None


# -- suggest -----------------------------------------------------------------------

@dataclasses.dataclass
class HostStats:
    host: str
    count: int = 0
    methods: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    first: str | None = None
    last: str | None = None
    secrets: set[str] = dataclasses.field(default_factory=set)

    def add(self, rec: Record) -> None:
        self.count += 1
        if rec.get("kind") == "http":
            self.methods[clean(rec.get("method") or "?", 16)] += 1
        elif rec.get("kind") in ("tcp", "udp"):
            self.methods[f"{rec['kind'].upper()}:{clean(rec.get('port'), 6)}"] += 1
        elif rec.get("kind") == "tls":
            self.methods["TLS"] += 1
        t = rec.get("time")
        if isinstance(t, str):
            if self.first is None or t < self.first:
                self.first = t
            if self.last is None or t > self.last:
                self.last = t
        s = rec.get("secrets")
        if isinstance(s, list):
            self.secrets.update(clean(x, 64) for x in s if isinstance(x, str))

    def merge(self, other: HostStats) -> None:
        self.count += other.count
        self.methods.update(other.methods)
        self.secrets |= other.secrets
        for t in (other.first, other.last):
            if t is not None:
                self.first = t if self.first is None or t < self.first else self.first
                self.last = t if self.last is None or t > self.last else self.last


@dataclasses.dataclass
class Entry:
    pattern: str
    stats: HostStats
    hosts: list[HostStats]  # the names seen, when grouped under a wildcard


@dataclasses.dataclass
class Observed:
    hosts: dict[str, HostStats]
    dns_only: dict[str, int]  # names resolved but never connected to
    denied_by_rule: dict[str, str]  # names a deny rule refused: no allow changes that
    records: int = 0
    first: str | None = None
    last: str | None = None


def observe(records: Iterable[Record]) -> Observed:
    hosts: dict[str, HostStats] = {}
    dns: collections.Counter[str] = collections.Counter()
    denied: dict[str, str] = {}
    obs = Observed(hosts, {}, denied)
    for rec in records:
        obs.records += 1
        t = rec.get("time")
        if isinstance(t, str):
            obs.first = t if obs.first is None or t < obs.first else obs.first
            obs.last = t if obs.last is None or t > obs.last else obs.last
        kind = rec.get("kind")
        host = record_host(rec)
        if host is None:
            continue
        if rec.get("decision") == "deny" and rec.get("rule") and kind in (*_CONTACT_KINDS, "dns"):
            denied[host] = clean(rec.get("reason") or "denied", 120)
            continue
        if kind == "dns":
            dns[host] += 1
        elif kind in _CONTACT_KINDS:
            hosts.setdefault(host, HostStats(host)).add(rec)
    obs.dns_only = {h: n for h, n in sorted(dns.items()) if h not in hosts and h not in denied}
    for h in list(denied):
        if h in hosts:
            del denied[h]  # also allowed at times: the deny rule is not the whole story
    return obs


def group(hosts: dict[str, HostStats], *, min_group: int = 2) -> list[Entry]:
    """Allow entries for `hosts`: wildcards where safe and useful, else exact names;
    most used first."""
    by_base: dict[str | None, list[HostStats]] = collections.defaultdict(list)
    for h, st in hosts.items():
        by_base[wildcard_base(h)].append(st)
    entries: list[Entry] = []
    for base, members in by_base.items():
        if base is not None and len(members) >= min_group:
            total = HostStats(f"*.{base}")
            for m in members:
                total.merge(m)
            members.sort(key=lambda s: (-s.count, s.host))
            entries.append(Entry(f"*.{base}", total, members))
        else:
            entries.extend(Entry(m.host, m, [m]) for m in members)
    entries.sort(key=lambda e: (-e.stats.count, e.pattern))
    return entries


def suggest_toml(obs: Observed, *, sources: Iterable[str] = (), min_group: int = 2) -> str:
    """The `allow = [...]` to paste, with what was seen as comments."""
    entries = group(obs.hosts, min_group=min_group)
    out = [f"# panopticon policy suggest: {obs.records} records"
           + (f", {obs.first} .. {obs.last}" if obs.first else "")]
    srcs = list(sources)
    if srcs:
        out.append(f"# from {', '.join(clean(s) for s in srcs)}")
    out.append("# Review it before use: a wildcard also allows names that were not seen.")
    out.append("allow = [")
    for e in entries:
        st = e.stats
        n = f"{st.count} request{'s' if st.count != 1 else ''}"
        methods = ", ".join(f"{m} {c}" for m, c in st.methods.most_common())
        out.append(f"    # {n} ({methods}); first {st.first}, last {st.last}")
        if len(e.hosts) > 1:
            seen = ", ".join(f"{m.host} ({m.count})" for m in e.hosts[:12])
            more = f", and {len(e.hosts) - 12} more" if len(e.hosts) > 12 else ""
            out.append(f"    #   seen: {seen}{more}")
        if st.secrets:
            out.append(f"    #   secrets used: {', '.join(sorted(st.secrets))}")
        out.append(f"    {json.dumps(e.pattern)},")
    out.append("]")
    if obs.dns_only:
        names = ", ".join(f"{h} ({n})" for h, n in list(obs.dns_only.items())[:20])
        more = f", and {len(obs.dns_only) - 20} more" if len(obs.dns_only) > 20 else ""
        out.append(f"# Resolved but never connected to (not listed above): {names}{more}")
    for h, why in sorted(obs.denied_by_rule.items()):
        out.append(f"# Refused by a deny rule (an allow entry would not change it): {h}: {why}")
    return "\n".join(out) + "\n"


# -- replay ------------------------------------------------------------------------

Decider = Callable[[Record], "tuple[bool, str] | None"]


@dataclasses.dataclass
class ReplayRow:
    host: str
    seen: int = 0
    would_block: int = 0
    was_blocked: int = 0
    methods: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    reasons: collections.Counter = dataclasses.field(default_factory=collections.Counter)


@dataclasses.dataclass
class Replay:
    rows: dict[str, ReplayRow]
    judged: int = 0
    would_block: int = 0
    newly_blocked: int = 0  # allowed in the log, blocked by the candidate
    newly_allowed: int = 0  # blocked in the log, allowed by the candidate


def replay(records: Iterable[Record], decide: Decider) -> Replay:
    """Judge every record that names a host with `decide(record)` -> (allowed, reason),
    or None for records it does not judge."""
    result = Replay({})
    for rec in records:
        if rec.get("kind") not in (*_CONTACT_KINDS, "dns"):
            continue
        host = record_host(rec)
        if host is None:
            continue
        verdict = decide(rec)
        if verdict is None:
            continue
        allowed, reason = verdict
        result.judged += 1
        row = result.rows.setdefault(host, ReplayRow(host))
        row.seen += 1
        was = would_block(rec)
        row.was_blocked += was
        if rec.get("kind") == "http":
            row.methods[clean(rec.get("method") or "?", 16)] += 1
        elif rec.get("kind") == "dns":
            row.methods["DNS"] += 1
        if not allowed:
            result.would_block += 1
            row.would_block += 1
            row.reasons[reason] += 1
            result.newly_blocked += not was
        else:
            result.newly_allowed += was
    return result


def replay_table(r: Replay) -> str:
    rows = sorted((x for x in r.rows.values() if x.would_block),
                  key=lambda x: (-x.would_block, x.host))
    out = []
    if rows:
        head = f"{'HOST':<40}  {'BLOCKED':>7}  {'OF':>6}  {'BEFORE':>6}  {'METHODS':<20}  WHY"
        out.append(head)
        for x in rows:
            methods = ", ".join(f"{m} {c}" for m, c in x.methods.most_common(3))
            why = "; ".join(f"{w}" + (f" ({c})" if len(x.reasons) > 1 else "")
                            for w, c in x.reasons.most_common(2))
            out.append(f"{clean(x.host, 40):<40}  {x.would_block:>7}  {x.seen:>6}  "
                       f"{x.was_blocked:>6}  {clean(methods, 20):<20}  {clean(why)}")
    hosts = len(rows)
    out.append(
        f"The candidate policy would block {r.would_block} of {r.judged} requests and "
        f"queries ({hosts} host{'s' if hosts != 1 else ''}); {r.newly_blocked} of them "
        f"were allowed in the log. It would allow {r.newly_allowed} that were blocked."
    )
    return "\n".join(out) + "\n"


def would_block(rec: Record) -> bool:
    """Blocked in the log, or (discover mode) allowed but enforce mode would have blocked."""
    if rec.get("decision") != "allow":
        return True
    return rec.get("would_decision") == "deny"


# -- the summary of `panopticon run` -------------------------------------------------

@dataclasses.dataclass
class RunSummary:
    requests: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    dns: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    tripwires: int = 0
    allowable: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    refused: dict[str, str] = dataclasses.field(default_factory=dict)  # host -> reason


def summarize(records: Iterable[Record], *, instance: str | None = None,
              since: float | None = None) -> RunSummary:
    """What a run did: requests and queries allowed/blocked, tripwires, the hosts blocked
    for want of an allow entry (`allowable`), and those blocked for other reasons."""
    s = RunSummary()
    for rec in records:
        if instance is not None and rec.get("instance") != instance:
            continue
        if since is not None:
            t = record_time(rec)
            if t is None or t < since:
                continue
        kind = rec.get("kind")
        if kind == "tripwire":
            s.tripwires += 1
            continue
        blocked = would_block(rec)
        counter = s.dns if kind == "dns" else s.requests
        counter["blocked" if blocked else "allowed"] += 1
        if not blocked:
            continue
        host = record_host(rec)
        reason = str(rec.get("reason") or "")
        if host is not None and not rec.get("rule") and reason.startswith(NOT_ALLOWED):
            s.allowable[host] += 1
        elif host is not None or rec.get("host"):
            s.refused.setdefault(host or clean(rec.get("host"), 80), clean(reason, 120))
    for h in s.allowable:
        s.refused.pop(h, None)
    return s


def summary_lines(s: RunSummary, *, config_key: str, log_args: str,
                  limit: int = 10) -> list[str]:
    """Lines for stderr: counts, what was blocked, and how to allow it. `config_key` says
    where allow entries go (config.allow_hint), `log_args` how `panopticon logs` finds
    this log ("NAME" or "--file PATH")."""
    first = (f"requests: {s.requests['allowed']} allowed, {s.requests['blocked']} blocked; "
             f"DNS queries: {s.dns['allowed']} answered, {s.dns['blocked']} refused")
    if s.tripwires:
        first += f"; {s.tripwires} TRIPWIRE{'S' if s.tripwires != 1 else ''}"
    out = [first]
    hosts = [h for h, _ in sorted(s.allowable.items(), key=lambda t: (-t[1], t[0]))]
    if hosts:
        shown = hosts[:limit]
        more = f", and {len(hosts) - limit} more" if len(hosts) > limit else ""
        out.append("blocked: " + ", ".join(f"{h} ({s.allowable[h]})" for h in shown) + more)
        out.append("to allow: " + " ".join(f"--allow {h}" for h in shown))
        out.append(f"or add to {config_key}: "
                   + ", ".join(json.dumps(h) for h in shown))
    if s.refused:
        items = sorted(s.refused.items())[:limit]
        out.append("also blocked: " + "; ".join(f"{clean(h, 80)} ({why})" for h, why in items)
                   + (f"; and {len(s.refused) - limit} more" if len(s.refused) > limit else ""))
    if hosts or s.refused or s.tripwires:
        from_ = log_args.replace("--file", "--from")
        out.append(f"details: panopticon logs {log_args} --blocked"
                   + (f"; all of it as config: panopticon policy suggest {from_}"
                      if len(hosts) > limit else ""))
    return out
