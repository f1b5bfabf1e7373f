"""The request log counted as it grows, and `/metrics` in the Prometheus text format.

A `LogView` follows one instance's request log with `logread.Follower`, the reader of
`panopticon logs`, from a thread of its own (no second log: the proxy writes one, every
reader reads it). It keeps running totals since it started, a bounded window of recent
records (each numbered, for the dashboard's `/api/recent?after=N`), per-host counts and
a per-minute-ish series. Memory is bounded whatever the agent does: an agent that asks
for a million random names fills `HOSTS_MAX` entries, then counts under `OTHER`.

Pure of mitmproxy, iptc and pyroute2. Records never carry secret values (README, "The
request log"); the recent window keeps only `RECENT_FIELDS` of each, all of which are
safe to show (names of secrets, paths without query strings, reasons).
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from . import logread, suggest
from .selftest import DENIED_CANDIDATES as SELFTEST_DENIED

Record = dict[str, Any]

# Upper bounds in seconds of the request-duration histogram.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
RECENT = 1000  # records kept for the dashboard's live table
SERIES_STEP = 10  # seconds per point of the requests-over-time series
SERIES_POINTS = 90  # 15 minutes of them
HOSTS_MAX = 2000  # distinct hosts counted by name; the rest go under OTHER
OTHER = "(other hosts)"
RECENT_FIELDS = ("time", "kind", "decision", "host", "method", "scheme", "port", "path",
                 "status", "reason", "rule", "duration_ms", "bytes_out", "bytes_in", "qname",
                 "qtype", "rcode", "secret", "action", "pattern", "mode", "would_decision",
                 "error")
_NOT_REQUESTS = ("dns", "tripwire", "dlp")  # kinds counted under metrics of their own


@dataclasses.dataclass
class HostCount:
    total: int = 0
    blocked: int = 0
    reason: str = ""  # of the last block
    allowable: bool = False  # blocked only for want of an allow entry (no rule refused it)
    last: float = 0.0


@dataclasses.dataclass
class Totals:
    """Counts since the view started; keys are label values."""

    requests: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    dns: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    tripwires: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    dlp: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    bytes: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    latency: list[int] = dataclasses.field(default_factory=lambda: [0] * (len(BUCKETS) + 1))
    latency_sum: float = 0.0


def _selftest_name(host: str) -> bool:
    """The daemon's self-test asks for these to see them refused: never to be allowed."""
    return any(host == d or host.endswith("." + d) for d in SELFTEST_DENIED)


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None


def _label(v: Any) -> str:
    return "none" if v is None else logread.clean(v, 64)


class LogView:
    """Totals, recent records and host counts of the log at `log_path`, as it grows.

    `start()` follows from the log's current end (records of earlier runs are not this
    daemon's); `poll()` folds what was appended (the thread calls it every `interval`);
    the readers (`recent`, `summary`, `totals`) are safe from any thread."""

    def __init__(self, log_path: str, *, status_path: str | None = None,
                 interval: float = 0.5, clock: Callable[[], float] = time.time):
        self.log_path = log_path
        self.status_path = status_path
        self.interval = interval
        self.clock = clock
        self.started = clock()
        self.stats = logread.Stats()
        self.totals = Totals()
        self.hosts: dict[str, HostCount] = {}
        self.seq = 0  # records seen; the number of the newest
        self._recent: collections.deque[tuple[int, Record]] = collections.deque(maxlen=RECENT)
        self._series: dict[int, list[int]] = {}  # bucket start -> [allowed, blocked]
        self._lock = threading.Lock()
        self._follower: logread.Follower | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- life ---------------------------------------------------------------------

    def start(self) -> None:
        self._follower = logread.Follower(self.log_path, stats=self.stats)
        self._thread = threading.Thread(target=self._run, name="panopticon-logview",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Idempotent."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        if self._follower is not None:
            self._follower.close()
            self._follower = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.poll()
            except Exception:  # noqa: BLE001 - the view goes on; the next poll retries
                pass

    def poll(self) -> int:
        """Fold the records appended since the last call; how many there were."""
        if self._follower is None:
            return 0
        records = self._follower.poll()
        self.add(records)
        return len(records)

    # -- folding --------------------------------------------------------------------

    def add(self, records: Iterable[Record]) -> None:
        with self._lock:
            for rec in records:
                self._add(rec)

    def _add(self, rec: Record) -> None:
        self.seq += 1
        t = self.totals
        kind = rec.get("kind")
        decision = rec.get("decision")
        if kind == "tripwire":
            t.tripwires[(_label(rec.get("secret")), _label(rec.get("action")))] += 1
        elif kind == "dlp":
            t.dlp[(_label(rec.get("pattern")), _label(rec.get("action")))] += 1
        elif kind == "dns":
            t.dns[(_label(decision), _label(rec.get("rcode")))] += 1
        else:
            t.requests[(_label(kind), _label(decision))] += 1
        for field, direction in (("bytes_out", "out"), ("bytes_in", "in")):
            n = _int(rec.get(field))
            if n:
                t.bytes[direction] += n
        ms = rec.get("duration_ms")
        if kind == "http" and isinstance(ms, (int, float)) and not isinstance(ms, bool) \
                and math.isfinite(ms) and ms >= 0:
            s = ms / 1000
            i = next((i for i, b in enumerate(BUCKETS) if s <= b), len(BUCKETS))
            t.latency[i] += 1
            t.latency_sum += s
        blocked = suggest.would_block(rec) if kind not in ("dlp",) else False
        when = logread.record_time(rec) or self.clock()
        self._count_host(rec, blocked, when)
        bucket = int(when // SERIES_STEP) * SERIES_STEP
        point = self._series.setdefault(bucket, [0, 0])
        point[1 if blocked else 0] += 1
        if len(self._series) > SERIES_POINTS * 2:
            for old in sorted(self._series)[:-SERIES_POINTS]:
                del self._series[old]
        self._recent.append((self.seq, {k: rec.get(k) for k in RECENT_FIELDS if k in rec}))

    def _count_host(self, rec: Record, blocked: bool, when: float) -> None:
        host = logread.record_host(rec)
        if host is None:
            raw = rec.get("host")
            if not raw:
                return
            host = logread.clean(raw, 253)
        if host not in self.hosts and len(self.hosts) >= HOSTS_MAX:
            host = OTHER
        h = self.hosts.setdefault(host, HostCount())
        h.total += 1
        h.last = max(h.last, when)
        if blocked:
            h.blocked += 1
            reason = str(rec.get("reason") or "")
            h.reason = logread.clean(reason, 160)
            h.allowable = (host != OTHER and rec.get("kind") != "tripwire" and not rec.get("rule")
                           and reason.startswith(suggest.NOT_ALLOWED)
                           and not _selftest_name(host))

    # -- reading --------------------------------------------------------------------

    def recent(self, after: int = 0, limit: int = 100) -> tuple[int, list[Record]]:
        """(the newest number, up to `limit` of the newest records numbered above `after`,
        oldest first, each with its number as `seq`)."""
        with self._lock:
            newest = self.seq
            if after > newest:  # numbers of an earlier daemon: start over
                after = 0
            out = [(n, r) for n, r in self._recent if n > after]
        out = out[-limit:] if limit > 0 else []
        return newest, [{"seq": n, **r} for n, r in out]

    def hosts_view(self, top: int = 20) -> tuple[list[dict], list[dict]]:
        """(the blocked hosts, most blocked first; the top hosts, busiest first)."""
        with self._lock:
            items = [(h, dataclasses.replace(c)) for h, c in self.hosts.items()]
        blocked = sorted((x for x in items if x[1].blocked), key=lambda x: (-x[1].blocked, x[0]))
        busiest = sorted(items, key=lambda x: (-x[1].total, x[0]))
        return ([{"host": h, "count": c.blocked, "reason": c.reason, "allowable": c.allowable}
                 for h, c in blocked[:top]],
                [{"host": h, "count": c.total, "blocked": c.blocked} for h, c in busiest[:top]])

    def series(self, now: float | None = None) -> list[dict]:
        """The last SERIES_POINTS steps up to `now`: {"t": start, "allowed", "blocked"}."""
        now = self.clock() if now is None else now
        last = int(now // SERIES_STEP) * SERIES_STEP
        with self._lock:
            got = {k: list(v) for k, v in self._series.items()}
        return [{"t": b, "allowed": got.get(b, [0, 0])[0], "blocked": got.get(b, [0, 0])[1]}
                for b in range(last - (SERIES_POINTS - 1) * SERIES_STEP, last + 1, SERIES_STEP)]

    def snapshot(self) -> Totals:
        with self._lock:
            t = self.totals
            return Totals(collections.Counter(t.requests), collections.Counter(t.dns),
                          collections.Counter(t.tripwires), collections.Counter(t.dlp),
                          collections.Counter(t.bytes), list(t.latency), t.latency_sum)

    def log_status(self) -> dict[str, Any] | None:
        return logread.read_status(self.status_path) if self.status_path else None


# -- the Prometheus text format -------------------------------------------------------------

def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(v: float) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int) or float(v).is_integer():
        return str(int(v))
    return repr(float(v))


class _Text:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_: str) -> None:
        self.lines.append(f"# HELP {name} {help_}")
        self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, value: float, labels: Mapping[str, str] | None = None) -> None:
        lab = ""
        if labels:
            lab = "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items()) + "}"
        self.lines.append(f"{name}{lab} {_num(value)}")

    def counter(self, name: str, help_: str, counts: Mapping[tuple, int],
                label_names: tuple[str, ...], always: Iterable[tuple] = ()) -> None:
        self.family(name, "counter", help_)
        merged = {k: 0 for k in always}
        merged.update(counts)
        for key in sorted(merged):
            self.sample(name, merged[key], dict(zip(label_names, key)))


def _iso_to_epoch(text: Any) -> float | None:
    if not isinstance(text, str):
        return None
    try:
        dt = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=datetime.timezone.utc)
    return dt.timestamp()


def prometheus_text(t: Totals, daemon: Mapping[str, Any], *, started: float,
                    log_stats: logread.Stats | None = None,
                    log_status: Mapping[str, Any] | None = None) -> str:
    """The exposition (text format 0.0.4) of the counts `t` and the daemon's report
    (`Daemon.report()`'s document: status, checks, proxy restarts, last reload).
    `started`: when counting began, the time of the config load before any reload."""
    out = _Text()
    name = str(daemon.get("instance") or "")
    out.family("panopticon_info", "gauge", "The instance and its state (always 1).")
    out.sample("panopticon_info", 1, {"name": name, "status": str(daemon.get("status") or "")})
    out.family("panopticon_ready", "gauge",
               "1 if every check holds and the jail is open (what /healthz says with 200).")
    out.sample("panopticon_ready", bool(daemon.get("ready")))
    checks = daemon.get("checks") or {}
    out.family("panopticon_check_ok", "gauge", "1 if the check holds.")
    for check in sorted(checks):
        out.sample("panopticon_check_ok", bool((checks[check] or {}).get("ok")), {"check": check})

    out.counter("panopticon_requests_total",
                "Requests and connections judged, by kind and decision (none: ended first).",
                t.requests, ("kind", "decision"),
                always=[("http", "allow"), ("http", "deny")])
    out.counter("panopticon_dns_queries_total", "DNS queries, by decision and answer code.",
                t.dns, ("decision", "rcode"))
    out.counter("panopticon_tripwires_total",
                "Secret placeholders sent where they do not belong, by secret name and action.",
                t.tripwires, ("secret", "action"))
    out.counter("panopticon_dlp_findings_total", "Credential shapes found, by pattern and action.",
                t.dlp, ("pattern", "action"))
    out.counter("panopticon_http_body_bytes_total",
                "HTTP body bytes: out from the agent, in to the agent.",
                {(k,): v for k, v in t.bytes.items()}, ("direction",),
                always=[("in",), ("out",)])

    h = "panopticon_http_request_duration_seconds"
    out.family(h, "histogram", "From the first byte of a request to the last of its answer.")
    cum = 0
    for bound, n in zip((*BUCKETS, math.inf), t.latency):
        cum += n
        out.sample(f"{h}_bucket", cum, {"le": "+Inf" if bound == math.inf else _num(bound)})
    out.sample(f"{h}_sum", round(t.latency_sum, 6))
    out.sample(f"{h}_count", cum)

    proxy = daemon.get("proxy") or {}
    out.family("panopticon_proxy_restarts_total", "counter",
               "Times the daemon restarted the proxy (it died, stopped or went silent).")
    out.sample("panopticon_proxy_restarts_total", int(proxy.get("restarts") or 0))
    reload = daemon.get("reload") or {}
    out.family("panopticon_reloads_total", "counter", "Reloads asked for (SIGHUP), applied or not.")
    out.sample("panopticon_reloads_total", int(reload.get("generation") or 0))
    out.family("panopticon_reload_last_success", "gauge",
               "1 if the last reload was applied (or none was asked for), 0 if refused.")
    out.sample("panopticon_reload_last_success", reload.get("ok") is not False)
    out.family("panopticon_reload_last_timestamp_seconds", "gauge",
               "When the config was last loaded: the last reload, else the daemon's start.")
    out.sample("panopticon_reload_last_timestamp_seconds",
               round(_iso_to_epoch(reload.get("at")) or started, 3))

    if log_stats is not None:
        out.family("panopticon_log_records_total", "counter", "Request log records read.")
        out.sample("panopticon_log_records_total", log_stats.records)
        out.family("panopticon_log_bad_lines_total", "counter",
                   "Request log lines that were not JSON objects.")
        out.sample("panopticon_log_bad_lines_total", log_stats.bad_lines)
    if log_status is not None:
        out.family("panopticon_log_writable", "gauge",
                   "0 while the request log cannot be written (traffic is refused meanwhile).")
        out.sample("panopticon_log_writable", bool(log_status.get("ok")))
    out.family("panopticon_start_time_seconds", "gauge", "When these counts began.")
    out.sample("panopticon_start_time_seconds", round(started, 3))
    return "\n".join(out.lines) + "\n"
