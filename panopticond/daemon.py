"""`panopticond NAME`: the long-running jail of `[agents.NAME]`, supervised, for systemd.

    load and validate the config ──── invalid: exit 3, nothing touched
    /healthz listens (503)
    Instance.start()                  the start order of DESIGN.md (rules read back)
    self-test as the agent's uid      soft failure: retry with backoff; a leak: exit 2
    /healthz 200, READY=1
    the agent starts ─────────────────────────────────── it exits: we exit with its status
    every TICK ──┬─ proxy exited, stopped or silent: 503, kill it, restart with backoff,
                 │  self-test again, then 200 (the REDIRECT stays: nothing leaks meanwhile)
                 ├─ every --check-interval: live rules vs the plan; drift closes the jail
                 │  (agent and proxy killed, the veth removed, 503 until restarted)
                 ├─ SIGHUP: reload (validated first; a bad config keeps the old policy)
                 ├─ (a thread) the request log counted for /metrics and the dashboard at /
                 ├─ SIGTERM/SIGINT: stop, leaving nothing behind
                 └─ WATCHDOG=1, only while everything above holds

The journal gets one event per line, `event=NAME key=value ...` (values quoted as JSON
strings when they need it), never a secret. `panopticond --reload NAME` (the unit's
ExecReload) signals the daemon and waits for the outcome of that reload.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import errno
import json
import logging
import os
import re
import select
import signal
import socket
import sys
import time
from collections.abc import Sequence
from typing import Any

from . import agent as agentmod
from . import config as configmod
from . import dashboard, logread, selftest
from .errors import ExitStatus, PanopticonError
from .metrics import LogView
from .plan import Names
from .sdnotify import Notifier
from .server import HealthServer, json_page

log = logging.getLogger("panopticon.daemon")

DEFAULT_CONFIG = "/etc/panopticon/config.toml"
CHECKS = ("rules", "proxy", "ca", "selftest")
TICK = 0.5  # seconds between looks at the agent and the proxy
CHECK_INTERVAL = 30.0  # seconds between comparisons of the live rules with the plan
HEARTBEAT_TIMEOUT = 5.0  # the proxy beats every second (proxy_main.HEARTBEAT)
BACKOFF = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)  # proxy restarts and self-test retries
STABLE_AFTER = 60.0  # seconds of health after which the backoff starts over
POLICY_SETTLE = 1.2  # the proxy's PolicyFile looks for a new policy at most once a second
AGENT_STOP_TIMEOUT = 10.0
STATUS_FILE = "status.json"


# -- the journal --------------------------------------------------------------------------

_BARE = re.compile(r"[A-Za-z0-9_.:/@+,-]+")
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
             logging.CRITICAL: 2}


def kv(value: Any) -> str:
    """A value as it appears in a journal line: bare if it is safe, else a JSON string."""
    text = value if isinstance(value, str) else json.dumps(value) if isinstance(
        value, (list, dict, bool)) or value is None else str(value)
    return text if _BARE.fullmatch(text) else json.dumps(text)


class _EventFormatter(logging.Formatter):
    def __init__(self, priority_prefix: bool):
        super().__init__()
        self.priority_prefix = priority_prefix

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", None)
        if fields is None:  # a plain message of another module (instance.py, ...)
            fields = {"event": "log", "msg": record.getMessage()}
        line = " ".join(f"{k}={kv(v)}" for k, v in fields.items())
        if record.exc_info and log.isEnabledFor(logging.DEBUG):
            line += " traceback=" + kv(self.formatException(record.exc_info))
        if self.priority_prefix:
            return f"<{_PRIORITY.get(record.levelno, 6)}>{line}"
        return f"panopticond: {line}"


def event(level: int, name: str, **fields: Any) -> None:
    log.log(level, name, extra={"fields": {"event": name, **fields}})


def _stderr_is_journal() -> bool:
    # systemd sets JOURNAL_STREAM to the device:inode of the stream it connected.
    try:
        dev, ino = os.environ.get("JOURNAL_STREAM", "").split(":")
        st = os.fstat(sys.stderr.fileno())
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (ValueError, OSError):
        return False


def setup_logging(verbose: int) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_EventFormatter(_stderr_is_journal()))
    root = logging.getLogger("panopticon")  # ours and every module's below it
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose > 1 else logging.INFO)
    root.propagate = False


# -- state --------------------------------------------------------------------------------

class _Interrupted(BaseException):
    """SIGTERM/SIGINT during start-up: unwinds Instance.start(), which tears down."""


@dataclasses.dataclass
class Check:
    ok: bool = False
    detail: str = "not checked yet"


def backoff(attempt: int) -> float:
    return BACKOFF[min(attempt, len(BACKOFF) - 1)]


def _now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class Daemon:
    def __init__(self, name: str, config_path: str, *, check_interval: float = CHECK_INTERVAL,
                 notifier: Notifier | None = None):
        self.name = name
        self.names = Names.of(name)
        self.config_path = config_path
        self.check_interval = check_interval
        self.notify = notifier or Notifier()
        self.checks = {c: Check() for c in CHECKS}
        self.state = "starting"
        self.inst: Any = None  # the Instance, once built
        self.agent_proc: Any = None
        self.user: agentmod.AgentUser | None = None
        self.targets: selftest.Targets | None = None
        self.server: HealthServer | None = None
        self.view: LogView | None = None  # the request log, for /metrics and the dashboard
        self.reload_info: dict[str, Any] = {"generation": 0, "ok": None, "error": None,
                                            "pending_restart": [], "at": None}
        self.restarts = 0
        self.closed: str | None = None  # why the jail was closed
        self._snapshot: tuple[int, dict[str, Any]] = (503, {})
        self._stop: int | None = None
        self._reload = False
        self._interruptible = False
        self._wake_r: socket.socket | None = None
        self._attempt = 0  # proxy restarts since the last stable stretch
        self._down_worker = 0  # the proxy worker a pending restart is for
        self._selftest_attempt = 0
        self._due: dict[str, float] = {}  # action -> monotonic time it is due
        self._healthy_since: float | None = None
        self._last_watchdog = 0.0
        self._publish()

    # -- health ---------------------------------------------------------------------

    def healthy(self) -> bool:
        return self.closed is None and all(c.ok for c in self.checks.values())

    def _set(self, check: str, ok: bool, detail: str) -> None:
        self.checks[check] = Check(ok, detail)
        self._publish()

    def _publish(self) -> None:
        """Replace the snapshot the health page serves (whole: a reader never sees half)."""
        inst = self.inst
        ready = self.healthy()
        if self.closed is None and self.state not in ("starting", "stopping"):
            self.state = "ready" if ready else "degraded"
        proxy = inst.proxy if inst is not None else None
        doc = {
            "instance": self.name,
            "status": self.state,
            "ready": ready,
            "not_ready": [c for c in CHECKS if not self.checks[c].ok],
            "checks": {c: dataclasses.asdict(v) for c, v in self.checks.items()},
            "agent": {"pid": self.agent_proc.pid if self.agent_proc else None,
                      "running": bool(self.agent_proc and self.agent_proc.poll() is None)},
            "proxy": {"pid": proxy.proc.pid if proxy and proxy.proc else None,
                      "restarts": self.restarts},
            "reload": dict(self.reload_info),
            "ca_sha256": inst.ca_info.fingerprint if inst is not None and inst.ca_info else None,
        }
        if self.closed:
            doc["closed"] = self.closed
        self._snapshot = (200 if ready else 503, doc)
        if inst is not None and os.path.isdir(self.names.run_dir):
            path = os.path.join(self.names.run_dir, STATUS_FILE)
            with contextlib.suppress(OSError):
                tmp = f"{path}.tmp"
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
                with os.fdopen(fd, "w") as f:
                    json.dump(doc, f)
                os.replace(tmp, path)

    def report(self) -> tuple[int, dict[str, Any]]:
        return self._snapshot

    def _status(self, text: str) -> None:
        self.notify.status(text)

    # -- signals --------------------------------------------------------------------

    def _install_signals(self) -> None:
        r, w = socket.socketpair()
        r.setblocking(False)
        w.setblocking(False)
        self._wake_r, self._wake_w = r, w
        signal.set_wakeup_fd(w.fileno(), warn_on_full_buffer=False)
        me = os.getpid()

        def in_a_fork(signum: int) -> bool:
            # A forked child (pyroute2 forks helpers, and stops them with SIGTERM) runs
            # these handlers too, with a copy of our state: there, a signal must do what
            # it does by default, never unwind into our teardown.
            if os.getpid() == me:
                return False
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return True

        def stop(signum, _frame):
            if in_a_fork(signum):
                return
            self._stop = signum
            if self._interruptible:
                self._interruptible = False
                raise _Interrupted()

        def hup(signum, _frame):
            if not in_a_fork(signum):
                self._reload = True

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, hup)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # only to wake the loop

    def _sleep(self, seconds: float) -> None:
        """Wait up to `seconds`, less if a signal comes."""
        assert self._wake_r is not None
        with contextlib.suppress(InterruptedError):
            select.select([self._wake_r], [], [], max(0.0, seconds))
        with contextlib.suppress(BlockingIOError, OSError):
            while self._wake_r.recv(256):
                pass

    # -- life -----------------------------------------------------------------------

    def run(self) -> int:
        """Everything; returns the exit status (the agent's, when it is what ended)."""
        self._install_signals()
        try:
            return self._run()
        except _Interrupted:
            event(logging.INFO, "stop", signal=signal.Signals(self._stop or 15).name,
                  during="start-up")
            return 0
        finally:
            self._interruptible = False
            self.state = "stopping"
            self.notify.stopping("stopping: tearing the jail down")
            self._teardown()

    def _load(self) -> tuple[configmod.Config, configmod.AgentConfig]:
        cfg = configmod.load(self.config_path)
        ag = configmod.agent_config(cfg, self.name)
        if not ag.command:
            raise configmod.ConfigError(
                "the agent has no command", file=cfg.path, key=f"agents.{self.name}.command",
                hint='panopticond runs it: command = ["/usr/bin/agent", "--flag"]')
        if not ag.user:
            raise configmod.ConfigError(
                "the agent has no user", file=cfg.path, key=f"agents.{self.name}.user",
                hint="panopticond runs the agent as that user; it may not be root")
        return cfg, ag

    def _run(self) -> int:
        from .instance import Instance, ProxyUser

        cfg, ag = self._load()
        event(logging.INFO, "config", path=cfg.path, agent=self.name, allow=len(ag.allow),
              deny=len(ag.deny))
        if ag.health is not None:
            self.server = HealthServer(ag.health, {
                "/healthz": json_page(self.report),
                **dashboard.pages(lambda: self.view, self.report,
                                  lambda: self.inst.allow_hint if self.inst else "")})
            self.server.start()
            event(logging.INFO, "health", listen=_where(ag.health))
        else:
            event(logging.WARNING, "health", listen="off",
                  hint=f"set health in [agents.{self.name}] for /healthz")
        pu = ProxyUser.lookup(cfg.proxy.user)
        self.user = agentmod.resolve_user(ag.user, {}, proxy_uid=pu.uid, proxy_gid=pu.gid)

        self._status("starting: building the jail")
        self._interruptible = True
        inst = Instance(cfg, ag, allow_hint=configmod.allow_hint(cfg, ag))
        inst.heartbeat = True
        self.inst = inst
        self.view = LogView(inst.log_path, status_path=logread.status_path(self.names.run_dir))
        self.view.start()
        inst.start()
        event(logging.INFO, "jail-up", netns=self.names.netns,
              ms=round(sum(inst.timings.values()) * 1000), proxy_pid=inst.proxy.proc.pid)
        self._set("rules", True, "applied and read back")
        self._set("proxy", True, f"pid {inst.proxy.proc.pid}")
        self._set("ca", True, inst.ca_info.fingerprint)
        self.targets = self._targets()

        attempt = 0
        while True:
            self._status("starting: self-test")
            if self._selftest():
                break
            if self.closed:
                raise PanopticonError(f"the self-test found a leak: {self.closed}",
                                      hint="the jail was torn down; see the journal")
            delay = backoff(attempt)
            attempt += 1
            self._status(f"starting: self-test failed, again in {delay:.0f} s: "
                         f"{self.checks['selftest'].detail}")
            self._sleep(delay)
            if self._stop:
                raise _Interrupted()
        self._interruptible = False

        self.state = "ready"
        self._publish()
        self.notify.ready(self._summary())
        event(logging.INFO, "ready", netns=self.names.netns, ca_sha256=inst.ca_info.fingerprint)
        self._start_agent(ag)
        self._healthy_since = time.monotonic()
        self._due["verify"] = time.monotonic() + self.check_interval
        return self._loop()

    def _start_agent(self, ag: configmod.AgentConfig) -> None:
        assert self.user and self.inst and self.inst.ca_info
        env = agentmod.build_env(self.user, os.environ, self.inst.ca_info.agent_env(),
                                 self.inst.secret_env)  # placeholders, never values
        home = self.user.home if os.path.isdir(self.user.home) else "/"
        self.agent_proc = agentmod.launch(self.names.netns, self.user, list(ag.command), env,
                                          cwd=home)
        event(logging.INFO, "agent-start", pid=self.agent_proc.pid, user=self.user.name,
              command=ag.command[0])
        self._publish()

    def _loop(self) -> int:
        while True:
            if self._stop:
                event(logging.INFO, "stop", signal=signal.Signals(self._stop).name)
                return int(ExitStatus.ERROR) if self.closed else 0
            if self._reload:
                self._reload = False
                self._do_reload()
            if self.closed is None:
                rc = self.agent_proc.poll()
                if rc is not None:
                    code = agentmod.exit_code(rc)
                    event(logging.INFO if code == 0 else logging.WARNING, "agent-exit",
                          status=code)
                    return code
                self._supervise_proxy()
                self._maybe_verify()
                self._maybe_retry_selftest()
                self._watchdog()
            self._sleep(TICK)

    # -- supervision ------------------------------------------------------------------

    def _supervise_proxy(self) -> None:
        now = time.monotonic()
        if "restart" in self._due:
            if now >= self._due["restart"]:
                self._restart_proxy()
            return
        problem = None
        # Every proxy worker (proxy_workers), worker 0 first; one restart at a time.
        for worker, p in enumerate(self.inst.proxies()):
            if not p.alive():
                problem = f"exited with status {p.proc.returncode}"
            elif p.state() in ("T", "t"):
                problem = "stopped (SIGSTOP or a tracer)"
            elif now - p.last_beat() > HEARTBEAT_TIMEOUT:
                problem = f"no heartbeat for {now - p.last_beat():.0f} s"
            if problem is not None:
                break
        if problem is None:
            if self._healthy_since and now - self._healthy_since > STABLE_AFTER:
                self._attempt = 0
            return
        delay = backoff(self._attempt)
        self._attempt += 1
        self._healthy_since = None
        self._down_worker = worker
        if self.inst.workers:
            problem = f"worker {worker} {problem}"
        event(logging.ERROR, "proxy-down", pid=p.proc.pid, reason=problem,
              restart_in=f"{delay:.0f}s")
        with contextlib.suppress(ProcessLookupError):
            p.proc.kill()  # a stopped proxy holds the agent's connections open
        p.stop()
        self._due["restart"] = now + delay
        self._due.pop("selftest", None)
        self.checks["selftest"] = Check(False, "pending: the proxy is down")
        self._set("proxy", False, f"{problem}; restart in {delay:.0f} s")
        self._status(f"degraded: proxy {problem}, restart in {delay:.0f} s")

    def _restart_proxy(self) -> None:
        del self._due["restart"]
        self.restarts += 1
        worker = self._down_worker
        try:
            self.inst.restart_proxy(worker)
        except PanopticonError as e:
            delay = backoff(self._attempt)
            self._attempt += 1
            self._due["restart"] = time.monotonic() + delay
            event(logging.ERROR, "proxy-restart-failed", error=str(e), retry_in=f"{delay:.0f}s")
            self._set("proxy", False, f"restart failed ({e}); again in {delay:.0f} s")
            return
        pid = self.inst.proxies()[worker].proc.pid
        event(logging.INFO, "proxy-restarted", pid=pid, restarts=self.restarts)
        self._set("proxy", True, f"pid {pid} (restarted)")
        self._run_selftest_now()

    def _maybe_verify(self) -> None:
        if time.monotonic() < self._due.get("verify", float("inf")):
            return
        try:
            diffs = self.inst.verify_rules()
        except PanopticonError as e:
            diffs = [f"cannot read the rules: {e}"]
        self._due["verify"] = time.monotonic() + self.check_interval
        if not diffs:
            detail = f"match the plan (checked every {self.check_interval:g} s)"
            if self.checks["rules"].detail != detail:
                self._set("rules", True, detail)
            return
        for d in diffs[:20]:
            event(logging.ERROR, "rules-drift-detail", diff=d)
        self._close(f"the live rules differ from the plan ({len(diffs)} difference(s), "
                    f"first: {diffs[0]})", check="rules")

    def _maybe_retry_selftest(self) -> None:
        if time.monotonic() >= self._due.get("selftest", float("inf")):
            self._run_selftest_now()

    def _run_selftest_now(self) -> None:
        self._due.pop("selftest", None)
        if self._selftest():
            self._selftest_attempt = 0
            if self.healthy() and self._healthy_since is None:
                self._healthy_since = time.monotonic()
                event(logging.INFO, "recovered", restarts=self.restarts)
            self.notify.status(self._summary())
        elif self.closed is None:
            self._due["selftest"] = time.monotonic() + backoff(self._selftest_attempt)
            self._selftest_attempt += 1

    def _selftest(self) -> bool:
        """Run the self-test; a leak closes the jail. True if it passed."""
        assert self.inst and self.user and self.targets
        t0 = time.monotonic()
        out = selftest.run(self.names.netns, self.user.uid, self.user.gid, self.user.groups,
                           self.inst.ca_info.cert, self.targets)
        ms = round((time.monotonic() - t0) * 1000)
        if out.passed:
            event(logging.INFO, "selftest", result="passed", ms=ms,
                  allowed=self.targets.allowed or "-", notes="; ".join(out.notes) or "-")
            self._set("selftest", True, out.summary())
            return True
        for problem in out.hard:
            event(logging.CRITICAL, "selftest-leak", problem=problem)
        for problem in out.soft:
            event(logging.WARNING, "selftest", result="failed", problem=problem, ms=ms)
        self._set("selftest", False, out.summary())
        self._healthy_since = None
        if out.hard:
            self._close("the self-test got out of the jail: " + "; ".join(out.hard),
                        check="selftest")
        return False

    def _targets(self) -> selftest.Targets:
        from .policy import Policy

        inst = self.inst
        policy = Policy.from_dict(inst.compiled_policy())
        return selftest.choose_targets(inst.agent.allow, lambda h: policy.decide(h).allowed,
                                       inst.dns_servers())

    def _watchdog(self) -> None:
        interval = self.notify.watchdog_interval()
        if interval is None or not self.healthy():
            return
        now = time.monotonic()
        if now - self._last_watchdog >= min(interval, 10.0):
            self.notify.watchdog()
            self._last_watchdog = now

    def _close(self, why: str, check: str) -> None:
        """Close the jail: nothing of the agent runs and nothing can leave, until a restart.

        The namespace and its rules stay for inspection; its link to the host goes."""
        self.closed = why
        self.state = "closed"
        self._due.clear()
        inst = self.inst
        killed = 0
        from . import netns

        for pid in netns.pids_in(self.names.netns):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                killed += 1
        if self.agent_proc is not None:
            with contextlib.suppress(Exception):
                self.agent_proc.wait(5)
        if inst is not None:
            for p in inst.proxies():
                p.stop()
        _unlink(self.names.veth_host)
        event(logging.CRITICAL, "jail-closed", reason=why, killed=killed,
              hint=f"inspect with `ip netns exec {self.names.netns} iptables-legacy-save`; "
              f"systemctl restart panopticon@{self.name}")
        self.checks[check] = Check(False, why)
        self.checks["proxy"] = Check(False, "stopped: the jail is closed")
        self._publish()
        self._status(f"closed: {why}")

    # -- reload -----------------------------------------------------------------------

    def _do_reload(self) -> None:
        self.notify.reloading()
        gen = self.reload_info["generation"] + 1
        try:
            if self.closed:
                raise PanopticonError("the jail is closed",
                                      hint=f"systemctl restart panopticon@{self.name}")
            cfg, ag = self._load()
            # Compiled before it is written: a policy that does not compile changes nothing.
            pending, narrowed = self.inst.reload(cfg, ag, configmod.allow_hint(cfg, ag))
            self.targets = self._targets()
        except Exception as e:  # noqa: BLE001 - whatever it is, the old policy stays
            self.reload_info = {"generation": gen, "ok": False, "error": _public_error(e),
                                "hint": getattr(e, "hint", None), "pending_restart": [],
                                "at": _now_iso()}
            event(logging.ERROR, "reload", result="refused", error=str(e),
                  kept="the policy in force")
            self._publish()
            self.notify.ready(self._summary())
            return
        time.sleep(POLICY_SETTLE)  # until the proxy has the new policy
        closed = 0
        if narrowed and self.inst.proxy.alive():
            try:
                closed = self.inst.close_connections()
            except PanopticonError as e:
                event(logging.WARNING, "reload-connections", error=str(e))
        self.reload_info = {"generation": gen, "ok": True, "error": None,
                            "pending_restart": pending, "closed_connections": closed,
                            "at": _now_iso()}
        event(logging.INFO, "reload", result="applied", allow=len(ag.allow), deny=len(ag.deny),
              narrowed=narrowed, closed_connections=closed,
              pending_restart=",".join(pending) or "-")
        if "restart" not in self._due:
            self._run_selftest_now()
        self._publish()
        self.notify.ready(self._summary())

    # -- teardown ---------------------------------------------------------------------

    def _teardown(self) -> None:
        p = self.agent_proc
        if p is not None and p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
            try:
                p.wait(AGENT_STOP_TIMEOUT)
            except Exception:  # noqa: BLE001 - TimeoutExpired; the netns kill below follows
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                with contextlib.suppress(Exception):
                    p.wait(5)
        if self.inst is not None:
            self.inst.stop()
            event(logging.INFO, "jail-down", netns=self.names.netns)
        if self.server is not None:
            self.server.close()
        if self.view is not None:
            self.view.stop()
        self.notify.close()

    def _summary(self) -> str:
        if self.closed:
            return f"closed: {self.closed}"
        bad = [c for c in CHECKS if not self.checks[c].ok]
        if bad:
            return "degraded: " + ", ".join(f"{c} {self.checks[c].detail}" for c in bad)
        allowed = len(self.inst.agent.allow) if self.inst else 0
        return f"ready: {self.names.netns}, {allowed} allowed pattern(s), self-test passed"


def _public_error(e: Exception) -> str:
    """Why a reload was refused, for /healthz and status.json, which any local user can
    read: a config error is told by its place and key only, since its message may quote
    a value from the config (root's, and maybe a credential). The journal has it all."""
    if isinstance(e, configmod.ConfigError):
        where = f"{e.file}:{e.line}" if e.line is not None else e.file
        return f"{where}: {e.key or 'the config'} is invalid (the journal says why)"
    return str(e) if isinstance(e, PanopticonError) else f"internal error: {type(e).__name__}"


def _where(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _unlink(ifname: str) -> None:
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=ifname)
        if idx:
            try:
                ipr.link("del", index=idx[0])
            except NetlinkError as e:
                if e.code != errno.ENODEV:
                    raise


# -- reload requests (ExecReload) ----------------------------------------------------------

def request_reload(name: str, pid: int | None = None, timeout: float = 60.0) -> int:
    """Signal the daemon of `name` to reload and wait for its verdict; 0 if applied."""
    names = Names.of(name)
    status_path = os.path.join(names.run_dir, STATUS_FILE)

    def generation() -> int:
        try:
            with open(status_path) as f:
                return int(json.load(f)["reload"]["generation"])
        except (OSError, ValueError, KeyError, TypeError):
            return -1

    if pid is None:
        try:
            with open(os.path.join(names.run_dir, "owner.pid")) as f:
                pid = int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            raise PanopticonError(f"instance {name} is not running",
                                  hint=f"systemctl start panopticon@{name}") from None
    before = generation()
    if before < 0:
        raise PanopticonError(f"instance {name} is not ready yet (no {status_path})")
    os.kill(pid, signal.SIGHUP)
    deadline = time.monotonic() + timeout
    while generation() <= before:
        if time.monotonic() > deadline:
            raise PanopticonError(f"instance {name} did not finish reloading in {timeout:.0f} s")
        time.sleep(0.1)
    with open(status_path) as f:
        info = json.load(f)["reload"]
    if info.get("ok"):
        pending = info.get("pending_restart") or []
        print(f"panopticond: {name}: reloaded"
              + (f"; needs a restart for: {', '.join(pending)}" if pending else ""),
              file=sys.stderr)
        return 0
    print(f"panopticond: {name}: reload refused, the old policy stays: {info.get('error')}",
          file=sys.stderr)
    if info.get("hint"):
        print(f"panopticond: hint: {info['hint']}", file=sys.stderr)
    return int(ExitStatus.CONFIG)


# -- entry point ----------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="panopticond",
        description="Run the jail of [agents.NAME] as a supervised service (systemd Type=notify).")
    p.add_argument("--config", metavar="FILE", default=DEFAULT_CONFIG)
    p.add_argument("--check-interval", type=float, default=CHECK_INTERVAL, metavar="SECONDS",
                   help=f"how often the live rules are compared with the plan ({CHECK_INTERVAL:g})")
    p.add_argument("--reload", action="store_true",
                   help="ask the running daemon of NAME to reload, and wait for the outcome")
    p.add_argument("--pid", type=int, help="with --reload: the daemon's pid ($MAINPID)")
    p.add_argument("-v", "--verbose", action="count", default=1)
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("name", metavar="NAME")
    a = p.parse_args(argv)
    setup_logging(a.verbose + a.debug)
    try:
        if os.geteuid() != 0:
            raise PanopticonError("panopticond needs root", status=ExitStatus.NOPERM)
        if a.reload:
            return request_reload(a.name, a.pid)
        if a.check_interval <= 0:
            raise PanopticonError("--check-interval must be positive", status=ExitStatus.USAGE)
        return Daemon(a.name, a.config, check_interval=a.check_interval).run()
    except PanopticonError as e:
        if a.debug:
            raise
        event(logging.ERROR, "error", error=e.message, hint=e.hint or "-",
              status=int(e.status))
        return int(e.status)


if __name__ == "__main__":
    sys.exit(main())
