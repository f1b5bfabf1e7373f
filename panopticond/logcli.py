"""The operator's log commands: `panopticon logs`, `policy suggest`, `policy replay`,
and the summary at the end of `panopticon run`.

The logic is in logread.py (reading, following, filters, the table) and suggest.py
(grouping, replay, the summary); this module finds the files, wires the options, and
prints (their arguments are in logargs.py). Output goes to stdout (it is the command's
result); notes go to stderr.
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import sys
import time
from collections.abc import Callable, Iterator

from . import logread, suggest
from .errors import ExitStatus, PanopticonError
from .logargs import FOLLOW_TAIL
from .policy import HostPattern

FOLLOW_INTERVAL = 0.25


# -- finding the logs ----------------------------------------------------------------

def _logs_of(name: str | None, files: list[str], *, one: bool) -> dict[str, list[str]]:
    """{label: [files in order]}: the named files, the named instance's log, or (no
    name, `one` false) the log of every instance."""
    if files:
        paths = logread.expand(files)
        missing = [p for p in paths if not os.path.exists(p)]
        if missing:
            raise PanopticonError(f"no such file: {missing[0]}", status=ExitStatus.USAGE)
        return {"": paths}
    if name is not None:
        path = logread.log_path(name)
        if not os.path.exists(path):
            raise PanopticonError(f"instance {name!r} has no request log ({path})",
                                  hint=_known_hint(), status=ExitStatus.USAGE)
        return {name: [path]}
    names = logread.instances()
    if not names:
        raise PanopticonError("no instance has a request log yet",
                              hint="name a log with --file/--from", status=ExitStatus.USAGE)
    if one and len(names) > 1:
        raise PanopticonError("several instances have logs: name one",
                              hint=_known_hint(), status=ExitStatus.USAGE)
    return {n: [logread.log_path(n)] for n in names}


def _known_hint() -> str:
    names = logread.instances()
    return f"instances with a log: {', '.join(names)}" if names else "no instance has a log yet"


def _records(label_files: dict[str, list[str]], stats: logread.Stats) -> Iterator[dict]:
    """Every record, oldest first (merged by time across instances)."""
    streams = []
    for label, paths in label_files.items():
        if label and paths == [logread.log_path(label)]:
            streams.append(logread.read_log(paths[0], stats))
        else:
            streams.append(logread.read_files(paths, stats))
    if len(streams) == 1:
        return streams[0]
    return heapq.merge(*streams, key=lambda r: logread.record_time(r) or 0.0)


def _since(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return logread.parse_since(text)
    except ValueError as e:
        raise PanopticonError(f"--since: {e}", status=ExitStatus.USAGE) from None


def _readable(fn):
    """Turn a refused read into an error with a hint (the logs are root's and the proxy's)."""
    def wrapped(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except PermissionError as e:
            raise PanopticonError(f"cannot read {e.filename}: permission denied",
                                  hint="run it with sudo", status=ExitStatus.NOPERM) from None
    return wrapped


# -- logs ---------------------------------------------------------------------------

@_readable
def cmd_logs(args: argparse.Namespace) -> int:
    try:
        host = HostPattern.parse(args.host) if args.host else None
    except ValueError as e:
        raise PanopticonError(f"--host: {e}", status=ExitStatus.USAGE) from None
    since = _since(args.since)
    sources = _logs_of(args.name, args.file, one=False)
    flt = logread.Filter(blocked=args.blocked, host=host, since=since)
    labelled = len(sources) > 1
    out = _Printer(args.json, labelled)
    stats = logread.Stats()
    try:
        if args.follow:
            if args.file:
                targets = [p for p in args.file if not logread.is_rotated(p)]
            else:
                targets = [paths[-1] for paths in sources.values()]
            tail = args.lines if args.lines is not None else None if since else FOLLOW_TAIL
            _follow(targets, not args.file and args.name is None, flt, out, stats, tail)
        else:
            records = (r for r in _records(sources, stats) if flt(r))
            if args.lines is not None:
                records = iter(logread.last(records, max(0, args.lines)))
            for rec in records:
                out(rec)
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:
        # `panopticon logs | head`: the reader is gone; so is the need to say anything.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    if stats.bad_lines:
        print(f"panopticon: skipped {stats.bad_lines} line(s) that are not log records",
              file=sys.stderr)
    return 0


class _Printer:
    def __init__(self, as_json: bool, labelled: bool):
        self.as_json = as_json
        self.labelled = labelled
        self.header_done = as_json

    def __call__(self, rec: dict) -> None:
        if self.as_json:
            line = json.dumps(rec, ensure_ascii=True)
        else:
            if not self.header_done:
                head = logread.table_header()
                print(f"{'INSTANCE':<16}  {head}" if self.labelled else head)
                self.header_done = True
            line = logread.table_row(rec)
            if self.labelled:
                line = f"{logread.clean(rec.get('instance'), 16):<16}  {line}"
        print(line, flush=True)


def _follow(targets: list[str], rescan: bool, flt: logread.Filter, out: _Printer,
            stats: logread.Stats, tail: int | None) -> None:
    """History of the logs `targets` (the last `tail` records, or all), then their new
    records as they come; with `rescan`, instances that start meanwhile join in."""
    followers: dict[str, logread.Follower] = {}
    history = []
    for path in targets:
        # The current file is opened first, then the files older than it: whatever is
        # rotated meanwhile, the follower reads (logread.Follower.poll).
        f = followers[path] = logread.Follower(path, from_start=True, stats=stats)
        older = logread.open_older(path, f.ident)
        try:
            past = [r for fh in older for r in logread.read_open(fh, stats) if flt(r)]
        finally:
            for fh in older:
                fh.close()
        history.append(past + [r for r in f.poll() if flt(r)])
    merged = heapq.merge(*history, key=lambda r: logread.record_time(r) or 0.0)
    for rec in logread.last(merged, tail) if tail is not None else merged:
        out(rec)
    next_scan = time.monotonic() + 2
    while True:
        time.sleep(FOLLOW_INTERVAL)
        for f in list(followers.values()):
            for rec in f.poll():
                if flt(rec):
                    out(rec)
        if rescan and time.monotonic() >= next_scan:
            next_scan = time.monotonic() + 2
            for n in logread.instances():
                path = logread.log_path(n)
                if path not in followers:
                    followers[path] = logread.Follower(path, from_start=True, stats=stats)


# -- policy suggest / replay ----------------------------------------------------------

@_readable
def cmd_suggest(args: argparse.Namespace) -> int:
    sources = _logs_of(args.name, args.files, one=True)
    stats = logread.Stats()
    since = _since(args.since)
    records = (r for r in _records(sources, stats) if since is None or
               (logread.record_time(r) or 0) >= since)
    obs = suggest.observe(records)
    named = args.files or [paths[-1] for paths in sources.values()]
    read = sum(len(logread.expand([p])) for p in named)
    shown = ([f"{', '.join(named)} ({read} files, rotated ones included)"]
             if read > len(named) else named)
    sys.stdout.write(suggest.suggest_toml(obs, sources=shown, min_group=max(1, args.min_group)))
    if stats.bad_lines:
        print(f"panopticon: skipped {stats.bad_lines} line(s) that are not log records",
              file=sys.stderr)
    if not obs.hosts:
        print("panopticon: no connection was logged: nothing to allow", file=sys.stderr)
    return 0


@_readable
def cmd_replay(args: argparse.Namespace) -> int:
    from . import config

    cfg = config.load(args.config)
    agent = args.agent or (args.name if args.name in cfg.agents else None)
    # Judged as enforce mode would: replay is the check before switching to it.
    ag = config.agent_config(cfg, agent, mode="enforce")
    where = f"[agents.{agent}]" if agent else "[defaults]"
    print(f"panopticon: judging with {where} of {cfg.path}", file=sys.stderr)
    sources = _logs_of(args.name, args.files, one=True)
    stats = logread.Stats()
    since = _since(args.since)
    records = (r for r in _records(sources, stats) if since is None or
               (logread.record_time(r) or 0) >= since)
    result = suggest.replay(records, decider(config.policy_of(ag)))
    sys.stdout.write(suggest.replay_table(result))
    if stats.bad_lines:
        print(f"panopticon: skipped {stats.bad_lines} line(s) that are not log records",
              file=sys.stderr)
    return 1 if result.would_block else 0


def decider(pol) -> Callable[[dict], tuple[bool, str] | None]:
    """How `pol` (a Policy) judges a logged record, as the proxy judges that kind of
    traffic: requests by host, method and path; DNS, passthrough and other TCP ports by
    their rules (destinations.py)."""
    from . import destinations

    def decide(rec: dict) -> tuple[bool, str] | None:
        host = rec.get("host") or rec.get("qname")
        if not isinstance(host, str):
            return None
        kind, port = rec.get("kind"), rec.get("port")
        if kind == "http":
            d = pol.decide(host, rec.get("method"), rec.get("path"))
        elif kind == "dns":
            d = destinations.decide_dns(pol, host)
        elif kind == "tcp" and rec.get("relay") == "passthrough":
            d = destinations.decide_passthrough(pol, host)
        elif kind == "tcp" and isinstance(port, int) and port not in (80, 443):
            d = destinations.decide_port(pol, host, port)
        else:
            d = pol.decide(host)
        return d.allowed, d.reason

    return decide


# -- the summary of `panopticon run` ---------------------------------------------------

def print_run_summary(log_path: str, instance: str, started: float, config_key: str,
                      default_log: bool) -> None:
    """Counts, the hosts blocked, and the --allow flags or config entries that would
    allow them; on stderr. `started`: when the run began (earlier records are not its)."""
    try:
        records = list(logread.read_log(log_path))
    except OSError as e:
        print(f"panopticon: cannot read the request log {log_path}: {e.strerror or e}",
              file=sys.stderr)
        return
    # Records carry the start of their flow, which may precede the run by a clock tick.
    s = suggest.summarize(records, instance=instance, since=started - 1)
    log_args = instance if default_log else f"--file {log_path}"
    for line in suggest.summary_lines(s, config_key=config_key, log_args=log_args):
        print(f"panopticon: {line}", file=sys.stderr)
