"""Reading the request log: rotated files in order, following, filters, a table view.

Pure of mitmproxy; used by `panopticon logs`, `policy suggest`/`replay`, the summary
of `panopticon run` and the daemon's webhook sender, so that all of them read the
same data the same way. The record schema (README.md, "The request log") has a version,
`schema`, in every record; readers skip lines that are not JSON objects and count them.

Files: the log of instance NAME is `/var/log/panopticon/NAME/requests.jsonl`, rotated to
`requests.jsonl.1` (newest) ... `.N` (oldest) by `panopticond.logfile`. The proxy reports
the log's state (writable or not, and why) in `/run/panopticon/NAME/status/log.json`.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import json
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from .logfile import rotated_path
from .plan import LOG_DIR
from .policy import HostPattern, canonical_host

SCHEMA = 1  # version of the record schema, written as `schema` in every record
LOG_NAME = "requests.jsonl"
STATUS_DIR = "status"  # in the instance's runtime directory, writable by the proxy user
LOG_STATUS = "log.json"

Record = dict[str, Any]


def log_path(instance: str, log_dir: str | None = None) -> str:
    return os.path.join(log_dir or LOG_DIR, instance, LOG_NAME)


def status_path(run_dir: str) -> str:
    """Where the proxy reports the request log's state (JSON; see `read_status`)."""
    return os.path.join(run_dir, STATUS_DIR, LOG_STATUS)


def read_status(path: str) -> dict[str, Any] | None:
    """The log state the proxy wrote: {"ok": bool, "error": str|None, "since": time,
    "rotation_error": str|None, "log": path, ...}; None if there is none (yet)."""
    try:
        with open(path, "rb") as f:
            doc = json.loads(f.read())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def instances(log_dir: str | None = None) -> list[str]:
    """Names of the instances that have a request log, sorted."""
    try:
        names = os.listdir(log_dir or LOG_DIR)
    except OSError:
        return []
    return sorted(n for n in names if os.path.exists(log_path(n, log_dir)))


# -- files --------------------------------------------------------------------------

_ROTATED = re.compile(r"(.+)\.(\d+)")


def is_rotated(path: str) -> bool:
    """True for a rotated file's name (`requests.jsonl.3`)."""
    return _ROTATED.fullmatch(path) is not None


def rotation_set(path: str) -> list[str]:
    """`path`'s rotated files and itself, oldest first, those that exist."""
    d, base = os.path.split(path)
    try:
        names = os.listdir(d or ".")
    except OSError:
        names = []
    found = []
    for n in names:
        m = _ROTATED.fullmatch(n)
        if m and m.group(1) == base:
            found.append(int(m.group(2)))
    out = [rotated_path(path, i) for i in sorted(found, reverse=True)]
    if os.path.exists(path):
        out.append(path)
    return out


def expand(paths: Iterable[str]) -> list[str]:
    """Files to read, in order. A log named (`requests.jsonl`) is read with its rotated
    files, oldest first; a rotated file named (`requests.jsonl.2`) is read alone, in
    its place among the files of the same log. Duplicates are dropped; files that do not
    exist are kept (reading them raises)."""
    groups: dict[str, set[tuple[int, str]]] = {}
    for p in paths:
        m = _ROTATED.fullmatch(p)
        if m:
            groups.setdefault(m.group(1), set()).add((int(m.group(2)), p))
            continue
        g = groups.setdefault(p, set())
        for f in rotation_set(p) or [p]:
            g.add((0 if f == p else int(f.rsplit(".", 1)[1]), f))
    return [f for g in groups.values() for _, f in sorted(g, key=lambda t: -t[0])]


def open_older(path: str, ident: tuple[int, int] | None = None) -> list[Any]:
    """Open the rotated files of `path` older than the file `ident` ((st_dev, st_ino),
    e.g. the one a Follower reads); all of them if `ident` is not among them. Oldest
    first.

    Opened newest first and deduplicated by inode: a rotation meanwhile shifts files
    to names not opened yet, so none is missed and none is read twice."""
    return list(reversed(_open_rotated(path, stop=None, start_after=ident)))


def _open_rotated(path: str, *, stop: tuple[int, int] | None,
                  start_after: tuple[int, int] | None = None) -> list[Any]:
    """Open PATH.1, PATH.2, ... (newest first) until a missing name or the file `stop`;
    with `start_after`, only those found after that file (if it is found at all)."""
    seen: set[tuple[int, int]] = set()
    files: list[Any] = []
    i = 1
    while True:
        try:
            f = open(rotated_path(path, i), "rb")
        except FileNotFoundError:
            break
        i += 1
        st = os.fstat(f.fileno())
        ident = (st.st_dev, st.st_ino)
        if ident == stop:
            f.close()
            break
        if ident in seen:
            f.close()
            continue
        seen.add(ident)
        if start_after is not None and ident == start_after:
            for old in files:
                old.close()
            files = []
            f.close()
            continue
        files.append(f)
    return files


@dataclasses.dataclass
class Stats:
    records: int = 0
    bad_lines: int = 0


def parse_line(line: bytes, stats: Stats | None = None) -> Record | None:
    try:
        rec = json.loads(line)
    except ValueError:
        rec = None
    if not isinstance(rec, dict):
        if stats is not None and line.strip():
            stats.bad_lines += 1
        return None
    if stats is not None:
        stats.records += 1
    return rec


def read_files(paths: Iterable[str], stats: Stats | None = None) -> Iterator[Record]:
    """Records of the files `paths`, in order (see `expand`)."""
    for p in paths:
        with open(p, "rb") as f:
            yield from read_open(f, stats)


def read_log(path: str, stats: Stats | None = None) -> Iterator[Record]:
    """Records of the log at `path` with its rotated files, oldest first."""
    files = []
    try:
        files.append(open(path, "rb"))
    except FileNotFoundError:
        pass
    st = os.fstat(files[0].fileno()) if files else None
    files[:0] = open_older(path, (st.st_dev, st.st_ino) if st else None)
    try:
        for f in files:
            yield from read_open(f, stats)
    finally:
        for f in files:
            f.close()


def read_open(f, stats: Stats | None = None) -> Iterator[Record]:
    """Records of the open (binary) file `f`, from its position."""
    for line in f:
        rec = parse_line(line, stats)
        if rec is not None:
            yield rec


class Follower:
    """New records of a log as they are appended, across rotations.

    `poll()` returns the complete lines appended since the last call. When the file is
    rotated away, what is left of it is read before switching to the new one, so no
    record is lost (writers never append to a rotated file, see logfile.py)."""

    def __init__(self, path: str, *, from_start: bool = False, stats: Stats | None = None):
        self.path = path
        self.stats = stats if stats is not None else Stats()
        self._f: Any = None
        self._ident: tuple[int, int] | None = None
        self._buf = b""
        if self._open() and not from_start:
            self._f.seek(0, os.SEEK_END)

    @property
    def ident(self) -> tuple[int, int] | None:
        """(st_dev, st_ino) of the file being followed."""
        return self._ident

    def poll(self) -> list[Record]:
        out: list[Record] = []
        if self._f is None and not self._open():
            return out
        self._drain(out)
        try:
            st = os.stat(self.path)
            now = (st.st_dev, st.st_ino)
        except FileNotFoundError:
            now = None
        if now != self._ident:
            self._drain(out)  # the rest of the rotated file
            if self._buf.strip():
                self.stats.bad_lines += 1
            old = self._ident
            self.close()
            if now is not None:
                self._open()
            # Files rotated since (several, in a burst): between ours and the current.
            between = _open_rotated(self.path, stop=old)
            for f in reversed(between):
                try:
                    if (os.fstat(f.fileno()).st_dev, os.fstat(f.fileno()).st_ino) != \
                            self._ident:
                        out.extend(read_open(f, self.stats))
                finally:
                    f.close()
            self._drain(out)
        return out

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        self._ident = None
        self._buf = b""

    def _open(self) -> bool:
        try:
            self._f = open(self.path, "rb")
        except FileNotFoundError:
            return False
        st = os.fstat(self._f.fileno())
        self._ident = (st.st_dev, st.st_ino)
        return True

    def _drain(self, out: list[Record]) -> None:
        f = self._f
        if f is None:
            return
        if os.fstat(f.fileno()).st_size < f.tell():
            # Truncated in place (copytruncate, or a failed write cut back): start over.
            f.seek(0)
            self._buf = b""
        data = f.read()
        if not data:
            return
        data = self._buf + data
        end = data.rfind(b"\n")
        if end < 0:
            self._buf = data
            return
        self._buf = data[end + 1:]
        for line in data[:end].split(b"\n"):
            rec = parse_line(line, self.stats)
            if rec is not None:
                out.append(rec)


# -- filters ------------------------------------------------------------------------

def record_time(rec: Record) -> float | None:
    """The record's `time` as seconds since the epoch, or None."""
    t = rec.get("time")
    if not isinstance(t, str):
        return None
    try:
        dt = datetime.datetime.fromisoformat(t.replace("Z", "+00:00"))
    except ValueError:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=datetime.timezone.utc)
    return dt.timestamp()


def record_host(rec: Record) -> str | None:
    """The canonical name the record is about (host, else the DNS question), or None."""
    for key in ("host", "qname"):
        h = rec.get(key)
        if isinstance(h, str) and h:
            try:
                return canonical_host(h)
            except ValueError:
                return None
    return None


def is_blocked(rec: Record) -> bool:
    """Anything that did not get through: denied, undecided (a failed handshake), a
    tripwire; for records without a decision (DLP findings), an action that refused."""
    if rec.get("kind") == "tripwire":
        return True
    if "decision" in rec:
        return rec["decision"] != "allow"
    return rec.get("action") in ("deny", "block", "kill")


@dataclasses.dataclass(frozen=True)
class Filter:
    blocked: bool = False
    host: HostPattern | None = None
    since: float | None = None  # seconds since the epoch
    instance: str | None = None

    def __call__(self, rec: Record) -> bool:
        if self.blocked and not is_blocked(rec):
            return False
        if self.instance is not None and rec.get("instance") != self.instance:
            return False
        if self.host is not None:
            h = record_host(rec)
            if h is None or not self.host.matches(h):
                return False
        if self.since is not None:
            t = record_time(rec)
            if t is None or t < self.since:
                return False
        return True


_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|d|w)")
_UNITS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(text: str, now: float | None = None) -> float:
    """A point in time from `text`: a duration back from now ("90s", "15m", "2h",
    "1h30m", "7d"), "today", "yesterday", or a date/time in ISO form ("2024-05-01",
    "2024-05-01 14:00", "2024-05-01T14:00:00Z"; local time unless a zone is given).
    ValueError if it is none of these."""
    t = text.strip().lower()
    now = time.time() if now is None else now
    pos, total, matched = 0, 0.0, False
    while pos < len(t):
        m = _DURATION.match(t, pos)
        if not m:
            break
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos, matched = m.end(), True
        while pos < len(t) and t[pos] == " ":
            pos += 1
    if matched and pos == len(t):
        return now - total
    if t in ("today", "yesterday"):
        day = datetime.datetime.fromtimestamp(now).replace(hour=0, minute=0, second=0,
                                                           microsecond=0)
        if t == "yesterday":
            day -= datetime.timedelta(days=1)
        return day.timestamp()
    try:
        dt = datetime.datetime.fromisoformat(text.strip().replace("Z", "+00:00")
                                             .replace("z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"{text!r} is not a time: use a duration (15m, 2h, 7d), today, yesterday, "
            "or a date and time (2024-05-01 14:00)"
        ) from None
    return dt.timestamp()  # naive: local time


# -- the table ----------------------------------------------------------------------

_COLUMNS = (("TIME", 19), ("DECISION", 8), ("KIND", 8), ("HOST", 32), ("REQUEST", 30),
            ("STATUS", 8), ("REASON", 0))


def clean(value: Any, limit: int = 0) -> str:
    """`value` as one line of printable text: control characters (a newline or an
    escape sequence in a name the agent chose) are shown escaped, never interpreted."""
    s = "" if value is None else str(value)
    out = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" if ord(c) < 256
                  else f"\\u{ord(c):04x}" for c in s)
    if limit and len(out) > limit:
        out = out[: limit - 1] + "~"
    return out


def table_header() -> str:
    return "  ".join(name.ljust(width) for name, width in _COLUMNS).rstrip()


def table_row(rec: Record, local: Callable[[float], datetime.datetime] | None = None) -> str:
    t = record_time(rec)
    to_dt = local or (lambda ts: datetime.datetime.fromtimestamp(ts))
    when = to_dt(t).strftime("%Y-%m-%d %H:%M:%S") if t is not None else clean(rec.get("time"))
    kind = rec.get("kind")
    decision = rec.get("decision")
    shown = {"allow": "allow", "deny": "DENY"}.get(str(decision), "-")
    if kind == "tripwire":
        shown = "TRIPWIRE"
    if kind == "http":
        request = f"{rec.get('method') or ''} {rec.get('path') or ''}"
    elif kind == "dns":
        request = f"{rec.get('qtype') or '?'} {rec.get('qname') or ''}"
    elif kind in ("tcp", "udp"):
        request = f"port {rec.get('port')}" if rec.get("port") is not None else ""
    elif kind == "tripwire":
        request = f"secret {rec.get('secret') or '?'}"
    else:
        request = ""
    status = rec.get("status") if kind == "http" else rec.get("rcode") if kind == "dns" else None
    reason = rec.get("reason") or ""
    if rec.get("error") and decision == "allow":
        reason = f"{reason}; {rec['error']}"
    cells = [when, shown, clean(kind), clean(rec.get("host"), 32), clean(request, 30),
             clean(status if status is not None else "", 8), clean(reason)]
    return "  ".join(c.ljust(w) for c, (_, w) in zip(cells, _COLUMNS)).rstrip()


def last(records: Iterable[Record], n: int) -> list[Record]:
    return list(collections.deque(records, maxlen=n))
