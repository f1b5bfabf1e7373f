"""`panopticon demo`: one jail against a built-in simulated internet, checked both ways.

```
 panopticon demo (root)
   ├── Lab.create(): pnl-<tag>-host ── veth ── pnl-<tag>-net (www.allowed.example,
   │                                             denied.example, DNS; event log)
   └── nsenter --net=pnl-<tag>-host  panopticon run --user nobody ...
             └── jail ── python -m panopticond.demo_agent  ->  JSON on stdout
```

The agent (`demo_agent`) reports what it saw from inside the jail; the lab's own server
log reports what reached the internet. A row is OK only when both agree with the
policy: the allowed request got its 200 and reached the server, every blocked attempt
got the expected local answer and reached nothing. A blocked attempt that shows up in
the server log is a LEAK, whatever the agent saw.

The jail is started with `panopticon run` inside the lab's "host" namespace, entered
with `nsenter --net` only (not `ip netns exec`), so the jail's namespace is bound in the
real /run/netns where `panopticon cleanup` finds it. Everything (the lab, the jail, the
temporary config) is removed before the table is printed, also on errors and Ctrl-C;
only a copy of the request log is kept, and its path printed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from .errors import PanopticonError
from .lab import Lab

ALLOWED = "www.allowed.example"
DENIED = "denied.example"
ALLOWED_PATH = "/demo"
DIRECT_PORT = 8080  # a TCP sink of the lab (topology.PORTS)
AGENT_USER = "nobody"
RUN_TIMEOUT = 120  # the agent's probes take at most ~50 s even if every one times out
STOP_WAIT = 10  # seconds for `panopticon run` to tear down after a signal

# What demo_agent expects of each probe; shown as such when a probe gave no result.
PROBES = {"allowed": "200", "blocked": "403 + hint", "lookup": "NXDOMAIN", "direct": "refused"}
FAMILIES = (4, 6)


@dataclasses.dataclass
class Row:
    family: int
    probe: str
    what: str
    expected: str
    got: str
    ok: bool  # what the agent saw was as expected
    seen: int  # matching events in the lab's server log
    detail: str = ""

    @property
    def should_reach(self) -> bool:
        return self.probe == "allowed"

    @property
    def internet(self) -> str:
        if self.should_reach:
            return "reached" if self.seen else "NOT reached"
        noun = "query" if self.probe == "lookup" else "event"
        return f"{self.seen} {noun}(s)" if self.seen else "nothing"

    @property
    def verdict(self) -> str:
        if self.seen and not self.should_reach:
            return "LEAK"
        if self.ok and (self.seen or not self.should_reach):
            return "OK"
        return "FAIL"


def main(verbose: int | bool = False) -> int:
    """Run the demo, print its table on stdout; 0 if every row is OK, else 1.

    Progress goes to stderr with `verbose` only. Raises PanopticonError when the demo
    cannot run at all (no root, the jail does not start, ...).
    """
    started = time.monotonic()
    say = _progress(bool(verbose))
    timings: dict[str, float] = {}
    with contextlib.ExitStack() as stack:
        say("creating the simulated internet")
        lab = stack.enter_context(Lab.create())
        timings["lab"] = lab.timings["create"]
        say(f"lab up in {timings['lab']:.1f} s: namespaces {lab.host_ns}, {lab.net_ns}")
        tmp = stack.enter_context(_tempdir())
        cfg_path, log_path = _write_config(lab, tmp)
        mark = lab.mark()
        t = time.monotonic()
        report = _run_jail(lab, cfg_path, log_path, verbose, say)
        timings["jail"] = time.monotonic() - t
        rows = judge(report, lab, lab.events(since=mark))
        kept_log, log_lines = _keep_log(log_path)
        t = time.monotonic()
    timings["teardown"] = time.monotonic() - t
    total = time.monotonic() - started
    say(f"everything removed in {timings['teardown']:.1f} s")
    print(render(rows, timings, total, kept_log, log_lines))
    return 0 if all(r.verdict == "OK" for r in rows) else 1


def _progress(verbose: bool):
    def say(message: str) -> None:
        if verbose:
            print(f"panopticon demo: {message}", file=sys.stderr, flush=True)
    return say


@contextlib.contextmanager
def _tempdir() -> Iterator[str]:
    tmp = tempfile.mkdtemp(prefix="panopticon-demo-")
    try:
        # The proxy user writes the request log in here.
        os.chmod(tmp, 0o755)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_config(lab: Lab, tmp: str) -> tuple[str, str]:
    # An ephemeral CA: a persistent one would stay in /var/lib/panopticon/run-PID.
    text = "\n".join([
        "[defaults]",
        f"allow = {json.dumps([ALLOWED])}",
        'ca = "ephemeral"',
        "[network]",
        f"dns_servers = {json.dumps(list(lab.dns_servers))}",
        f"upstream_ca = {json.dumps(str(lab.ca_cert))}",
        "",
    ])
    cfg_path = os.path.join(tmp, "config.toml")
    with open(cfg_path, "w") as f:
        f.write(text)
    os.chmod(cfg_path, 0o644)
    return cfg_path, os.path.join(tmp, "requests.jsonl")


def _agent_argv(lab: Lab) -> list[str]:
    www, denied = lab.names[ALLOWED], lab.names[DENIED]
    argv = [sys.executable, "-m", "panopticond.demo_agent",
            "--allowed", f"https://{ALLOWED}{ALLOWED_PATH}", "--denied", DENIED]
    for addr in denied:
        if addr:
            argv += ["--denied-at", addr]
    for addr in www:
        if addr:
            argv += ["--direct", f"[{addr}]:{DIRECT_PORT}" if ":" in addr
                     else f"{addr}:{DIRECT_PORT}"]
    return argv


def _run_jail(lab: Lab, cfg_path: str, log_path: str, verbose: int | bool, say) -> dict:
    """`panopticon run` the agent in the lab's host; its JSON report."""
    argv = [sys.executable, "-m", "panopticond.cli", "run", *["-v"] * int(verbose),
            "--config", cfg_path, "--user", AGENT_USER, "--log", log_path,
            "--", *_agent_argv(lab)]
    # cwd "/": `python -m` puts the working directory first on the import path, and the
    # agent inherits it; "/" holds no panopticond to shadow the installed one.
    proc = subprocess.Popen(lab.in_host(argv), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=None if verbose else subprocess.PIPE,
                            text=True, errors="replace", cwd="/")
    # nsenter execs the command: the pid is that of `panopticon run`, which names the jail.
    instance = f"run-{proc.pid}"
    say(f"jail instance {instance} (namespace panopticon-{instance}), agent as {AGENT_USER}")
    try:
        out, err = proc.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        _stop(proc, lab, instance, interrupted=False)
        raise PanopticonError(f"the demo jail did not finish within {RUN_TIMEOUT} s",
                              hint="run `panopticon demo -v` to see where it hangs") from None
    except BaseException:
        _stop(proc, lab, instance, interrupted=True)
        raise
    try:
        report = json.loads(out)
        report["probes"]  # noqa: B018 - a KeyError means not the agent's report
    except (ValueError, KeyError, TypeError):
        tail = "\n".join((err or "").strip().splitlines()[-8:])
        raise PanopticonError(
            f"the demo agent gave no report (`panopticon run` exited {proc.returncode})"
            + (f":\n{tail}" if tail else ""),
            hint="run `panopticon demo -v` for the jail's own messages",
        ) from None
    return report


def _stop(proc: subprocess.Popen, lab: Lab, instance: str, *, interrupted: bool) -> None:
    """Make `panopticon run` end, tearing its jail down; by force if it will not.

    After a Ctrl-C at the terminal (`interrupted`) it already got SIGINT, being in our
    process group, and is tearing down: give it time first. SIGTERM makes it stop its
    agent and tear down too. A SIGKILL leaves the jail behind, so `panopticon cleanup`
    removes it while the lab still exists.
    """
    signals = (None, signal.SIGTERM, signal.SIGKILL) if interrupted else (
        signal.SIGTERM, signal.SIGKILL)
    for sig in signals:
        if sig is not None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
        try:
            proc.communicate(timeout=STOP_WAIT)
            break
        except subprocess.TimeoutExpired:
            continue
        except KeyboardInterrupt:
            continue  # a second Ctrl-C: go on to the next, stronger signal
    if proc.returncode is None or proc.returncode < 0:
        subprocess.run(lab.in_host([sys.executable, "-m", "panopticond.cli", "cleanup",
                                    "--force", instance]),
                       stdin=subprocess.DEVNULL, capture_output=True, check=False, timeout=60)


def judge(report: dict, lab: Lab, events: list[dict[str, Any]]) -> list[Row]:
    """One row per (family, probe): the agent's view joined with the server log's."""
    by_key = {(p.get("family"), p.get("probe")): p for p in report.get("probes", [])}
    rows = []
    for fam in FAMILIES:
        for probe in PROBES:
            p = by_key.get((fam, probe))
            if p is None:
                p = {"what": probe, "expected": PROBES[probe], "got": "(no result)",
                     "ok": False}
            rows.append(Row(
                family=fam, probe=probe, what=str(p.get("what", probe)),
                expected=str(p.get("expected", "")), got=str(p.get("got", "")),
                ok=p.get("ok") is True, seen=len(_seen(probe, fam, lab, events)),
                detail=str(p.get("detail") or ""),
            ))
    return rows


def _seen(probe: str, fam: int, lab: Lab, events: list[dict[str, Any]]) -> list[dict]:
    """The server-log events that probe `probe` of family `fam` would have caused."""
    i = 0 if fam == 4 else 1
    www, denied = lab.names[ALLOWED][i], lab.names[DENIED][i]

    def same_family(e: dict) -> bool:
        return (":" in str(e.get("server_ip"))) == (fam == 6)

    def names(e: dict, host: str) -> bool:
        header = str(e.get("host") or "").lower().split(":")[0]
        return str(e.get("sni") or "").lower() == host or header == host

    if probe == "allowed":
        return [e for e in events if e["kind"] == "https" and e.get("server_ip") == www
                and e.get("path") == ALLOWED_PATH]
    if probe == "blocked":
        # Wherever it went: to the denied server's address, or to any server by name.
        return [e for e in events if e["kind"] != "dns" and same_family(e)
                and (e.get("server_ip") == denied or names(e, DENIED))]
    if probe == "lookup":
        other = "AAAA" if fam == 4 else "A"
        return [e for e in events if e["kind"] == "dns" and e.get("type") != other
                and str(e.get("name") or "").lower().rstrip(".") == DENIED]
    if probe == "direct":
        return [e for e in events if e.get("server_ip") == www and e.get("port") == DIRECT_PORT]
    raise ValueError(probe)


def _keep_log(log_path: str) -> tuple[str | None, int]:
    """Copy the request log out of the temporary directory; (its path, its line count)."""
    try:
        with open(log_path, "rb") as f:
            data = f.read()
    except OSError:
        return None, 0
    fd, kept = tempfile.mkstemp(prefix="panopticon-demo-", suffix="-requests.jsonl")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return kept, data.count(b"\n")


def render(rows: list[Row], timings: dict[str, float], total: float,
           log_path: str | None, log_lines: int) -> str:
    header = ("family", "what", "expected", "got", "server log", "")
    cells = [header] + [(f"IPv{r.family}", r.what, r.expected, r.got, r.internet, r.verdict)
                        for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    lines = ["  ".join(c[i].ljust(widths[i]) for i in range(len(header))).rstrip()
             for c in cells]
    lines.insert(1, "  ".join("-" * w for w in widths[:-1]) + "  ----")

    blocked = next((r for r in rows if r.probe == "blocked" and r.ok), None)
    if blocked and blocked.detail:
        lines += ["", "The proxy's answer to the blocked request (the hint):"]
        lines += [f"  {line}" for line in blocked.detail.splitlines()]

    bad = [r for r in rows if r.verdict != "OK"]
    leaks = sum(r.verdict == "LEAK" for r in rows)
    took = (f"took {total:.1f} s (simulated internet {timings.get('lab', 0):.1f} s, "
            f"jail and agent {timings.get('jail', 0):.1f} s, "
            f"teardown {timings.get('teardown', 0):.1f} s)")
    if not bad:
        summary = (f"All {len(rows)} checks OK: the jail let through only what the policy "
                   f"allows, and nothing else reached the internet.\nThe demo {took}.")
    else:
        summary = (f"{len(bad)} of {len(rows)} checks not OK ({leaks} LEAK, "
                   f"{len(bad) - leaks} FAIL).\nThe demo {took}.")
        for r in bad:
            if r.detail and r.probe != "blocked":
                summary += f"\n  IPv{r.family} {r.probe}: {r.detail.splitlines()[0]}"
    lines += ["", summary]
    if log_path:
        lines.append(f"Request log ({log_lines} lines, kept): {log_path}")
    else:
        lines.append("Request log: none was written.")
    return "\n".join(lines)
