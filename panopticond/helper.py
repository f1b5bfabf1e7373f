"""The resident helper: `panopticon helper`, or socket-activated as panopticon-helper.socket.

A cold `panopticon run` spends most of its second importing: mitmproxy in the proxy
(~0.7 s of CPU), python-iptables in two children, pyroute2 and the config code in the
CLI. The helper pays all of that once and stays: it keeps mitmproxy, pyroute2 and our
modules imported, and a spare pair of python-iptables workers (one per family) warm.
For each `run` it forks a *jail process*, which builds the jail exactly as the cold
path does (cli.setup_run, Instance.start) but forks the proxy from itself instead of
starting an interpreter, and borrows the warm workers for the rules. The agent is
started by the client, in its own session, terminal and cgroup: the helper only builds
and tears down (helperproto.py has the conversation).

What the fork demands (../shared/notes/performance.md, each learned the hard way):
- The helper stays single-threaded with no asyncio loop, and never starts a listener or
  any mitmproxy_rs async API: a child forked after the Rust runtime started hangs in
  its first UDP listener. There must be exactly one thread at every fork (checked).
- No mitmproxy master is ever built here: its log handlers would outlive it.
- A jail process closes what is not its own: the listening socket, the wake-up pipe,
  other jails' workers. The forked proxy closes everything but its readiness pipe.
- A borrowed worker may hold an answer its borrower never read (killed mid-job): it is
  taken back only from a jail process that ended with status 0, and otherwise killed.

Who may ask: root alone (the socket is 0600, and SO_PEERCRED is checked). Jail
processes outlive a stopped or restarted helper (KillMode=process in the unit): their
agents are not cut off by an upgrade of the helper.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import select
import signal
import socket
import stat
import struct
import sys
import threading
import time
from typing import Any

from . import helperproto as proto
from .errors import ExitStatus, PanopticonError

log = logging.getLogger("panopticon")

SD_LISTEN_FDS_START = 3
SPARE_DELAY = 1.0  # s after a pair of workers was lent before a new spare is started
CA_DELAY = 0.3  # s after a CA was taken, or between two made, before the next is made
MAX_PAIRS = 4  # warm pairs kept (one per jail starting at the same time)
NO_REQUEST = 3  # a jail process's status when its client asked for nothing (it built nothing)


def preload() -> None:
    """Import what every jail needs, once (none of it starts a thread or a listener)."""
    import pyroute2  # noqa: F401 - 0.15-0.3 s, its __init__ loads everything
    from pyroute2 import netns as _pr_netns  # noqa: F401

    from . import cli, config, instance, proxy, proxy_main  # noqa: F401 - mitmproxy too
    from . import suffixes

    suffixes._rules()  # the public suffix list, parsed once (lru_cache)
    # Imported at the proxy's first connection otherwise, in every proxy.
    import mitmproxy.proxy.layers  # noqa: F401
    import mitmproxy.proxy.mode_servers  # noqa: F401


class _Chore:
    """Work the helper does when idle, at `due` (monotonic time; None: nothing to do)."""

    due: float | None = None

    def timeout(self) -> float | None:
        return None if self.due is None else max(0.0, self.due - time.monotonic())

    def is_due(self) -> bool:
        return self.due is not None and time.monotonic() >= self.due


class WorkerPool(_Chore):
    """Warm python-iptables workers, lent a pair ({4: ..., 6: ...}) per jail process."""

    def __init__(self, spare_delay: float = SPARE_DELAY, max_pairs: int = MAX_PAIRS):
        from . import firewall

        self._fw = firewall
        self.spare_delay = spare_delay
        self.max_pairs = max_pairs
        self.free: list[dict[int, tuple[Any, Any]]] = []
        self.lent: dict[int, dict[int, tuple[Any, Any]]] = {}
        self.due: float | None = time.monotonic()

    def take(self) -> dict[int, tuple[Any, Any]] | None:
        while self.free:
            pair = self.free.pop()
            if all(proc.is_alive() for proc, _ in pair.values()):
                if not self.free:
                    self._schedule()
                return pair
            self._end(pair)
        self._schedule()
        return None

    def lend(self, pid: int, pair: dict[int, tuple[Any, Any]]) -> None:
        self.lent[pid] = pair

    def returned(self, pid: int, clean: bool) -> None:
        pair = self.lent.pop(pid, None)
        if pair is None:
            return
        if clean and all(proc.is_alive() for proc, _ in pair.values()):
            self.free.append(pair)
        else:
            self._end(pair)

    def fds_not_of(self, pair: dict[int, tuple[Any, Any]] | None) -> list[int]:
        """The descriptors of every worker but `pair`'s (a jail process closes them)."""
        mine = {conn.fileno() for _, conn in (pair or {}).values()}
        out = []
        for p in [*self.free, *self.lent.values()]:
            out += [conn.fileno() for _, conn in p.values() if conn.fileno() not in mine]
        return out

    def tick(self) -> None:
        if not self.is_due():
            return
        self.due = None
        if not self.free and len(self.free) + len(self.lent) < self.max_pairs:
            self.free.append({fam: self._fw.spawn_warm(fam) for fam in (4, 6)})

    def close(self) -> None:
        while self.free:
            self._end(self.free.pop())

    def _schedule(self) -> None:
        # Not at once: a new pair imports iptc (~0.3 s of CPU each) and would slow the
        # start of the jail that just took the last one.
        if self.due is None:
            self.due = time.monotonic() + self.spare_delay

    def _end(self, pair: dict[int, tuple[Any, Any]]) -> None:
        for proc, conn in pair.values():
            self._fw.end_warm(proc, conn)


class CAStock(_Chore):
    """The next ephemeral CAs, made while the helper is idle (an RSA key: 50-150 ms of
    CPU, which would otherwise be the forked proxy's, on the start's critical path).
    Two are kept, so that runs back to back find one; each serves one jail only."""

    def __init__(self, size: int = 2, delay: float = CA_DELAY):
        self.size = size
        self.delay = delay
        self.spares: list = []
        self.due: float | None = time.monotonic()

    def take(self):
        spare = self.spares.pop() if self.spares else None
        self.due = time.monotonic() + self.delay  # not while the jail just asked starts
        return spare

    def tick(self) -> None:
        if not self.is_due():
            return
        from . import ca

        self.spares.append(ca.new_ephemeral())
        self.due = time.monotonic() + self.delay if len(self.spares) < self.size else None


def listening_socket(path: str | None) -> tuple[socket.socket, str | None]:
    """(the listener, the path to remove at exit): systemd's (socket activation) when it
    passed one, else a new one bound at `path`, root's alone."""
    if os.environ.get("LISTEN_PID") == str(os.getpid()) and os.environ.get("LISTEN_FDS") == "1":
        for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(k, None)
        s = socket.socket(fileno=SD_LISTEN_FDS_START)
        if s.family != socket.AF_UNIX or s.type != socket.SOCK_STREAM:
            raise PanopticonError("the socket passed by systemd is not a Unix stream socket",
                                  hint="see units/panopticon-helper.socket")
        os.set_inheritable(s.fileno(), False)
        return s, None
    path = path or proto.DEFAULT_SOCKET
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)  # stale: nobody listens
            else:
                probe.close()
                raise PanopticonError(f"a helper already listens at {path}",
                                      hint="systemctl stop panopticon-helper.socket "
                                      "panopticon-helper, or use another --socket")
        else:
            raise PanopticonError(f"{path} exists and is not a socket",
                                  hint="remove it, or use another --socket")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)
    try:
        s.bind(path)
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    s.listen(64)
    return s, path


def _peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


def _peer_pid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[0]


def serve(path: str | None = None, *, ready=None) -> int:
    """The helper's loop; returns at SIGTERM or SIGINT. `ready()` is called once it
    accepts (tests, sd_notify)."""
    if os.geteuid() != 0:
        raise PanopticonError("the helper needs root", hint="run it with sudo",
                              status=ExitStatus.NOPERM)
    listener, bound = listening_socket(path)
    t0 = time.monotonic()
    preload()
    pool = WorkerPool()
    stock = CAStock()
    pool.tick()  # the first of each at once: the first run should find them ready
    stock.tick()
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: None)  # only to wake select (the wakeup fd)
    gc.freeze()  # what every jail process shares with us stays shared
    jails: dict[int, None] = {}
    log.info("resident helper ready in %.0f ms at %s", (time.monotonic() - t0) * 1000,
             bound or "the socket systemd passed")
    if ready is not None:
        ready()
    try:
        while True:
            timeouts = [t for t in (pool.timeout(), stock.timeout()) if t is not None]
            r, _, _ = select.select([listener, wake_r], [], [], min(timeouts, default=None))
            if wake_r in r:
                sigs = os.read(wake_r, 512)
                if any(b in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP) for b in sigs):
                    break
            _reap(jails, pool)
            if listener in r:
                _accept(listener, pool, stock, jails, (listener.fileno(), wake_r, wake_w))
            pool.tick()
            stock.tick()
    finally:
        signal.set_wakeup_fd(-1)
        listener.close()
        if bound:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(bound)
        pool.close()
        os.close(wake_r)
        os.close(wake_w)
        if jails:
            log.info("%d jail(s) keep running without the helper", len(jails))
    return 0


def _reap(jails: dict[int, None], pool: WorkerPool) -> None:
    for pid in list(jails):
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            done, status = pid, 1 << 8
        if done:
            del jails[pid]
            code = os.waitstatus_to_exitcode(status)
            # A client that went away before asking anything: its workers were unused.
            pool.returned(pid, clean=code in (0, NO_REQUEST))
            if code == NO_REQUEST:
                log.info("jail process %d: the client asked for nothing", pid)
            elif code != 0:
                log.warning("jail process %d ended with status %d", pid, code)


def _accept(listener: socket.socket, pool: WorkerPool, stock: CAStock,
            jails: dict[int, None], own_fds: tuple[int, ...]) -> None:
    try:
        conn, _ = listener.accept()
    except (BlockingIOError, InterruptedError):
        return
    try:
        if _peer_uid(conn) != 0:
            log.warning("refused a helper client that is not root (pid %d)", _peer_pid(conn))
            return
        if threading.active_count() != 1:
            log.error("refusing to fork: the helper has %d threads", threading.active_count())
            return
        pair = pool.take()
        spare_ca = stock.take()  # each CA serves one jail only
        close_in_child = [*own_fds, *pool.fds_not_of(pair)]
        client_pid = _peer_pid(conn)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the jail process; covered by the integration tests
            code = 1
            try:
                code = _jail_process(conn, pair, spare_ca, close_in_child, client_pid)
            finally:
                with contextlib.suppress(Exception):
                    sys.stderr.flush()
                os._exit(code)
        jails[pid] = None
        if pair is not None:
            pool.lend(pid, pair)
    finally:
        conn.close()


def _jail_process(conn: socket.socket, pair, spare_ca, close_fds: list[int],
                  client_pid: int) -> int:
    """In the forked jail process: build the jail, hand it to the client, wait for the
    client's `done` (or its disappearance, or SIGTERM), tear down. The exit status: 0
    only after a clean teardown (the helper then takes its workers back)."""
    from . import cli, firewall

    signal.set_wakeup_fd(-1)
    for fd in close_fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    for sig in (signal.SIGCHLD, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    # Its own session: a Ctrl-C at the client's terminal is for the agent, not for us.
    os.setsid()
    conn.settimeout(30)
    try:
        os.dup2(proto.recv_fd(conn), 2)
        msg = proto.recv(conn)
        if msg is None or "run" not in msg:
            return NO_REQUEST
        req = proto.RunRequest.from_json(msg["run"])
    except (OSError, ValueError, TypeError, proto.ProtocolError):
        return NO_REQUEST
    # The ad-hoc name comes from who is really on the other end.
    req = proto.RunRequest(**{**req.to_json(), "pid": client_pid})
    cli._setup_logging(req.verbose)
    if pair is not None:
        firewall.borrow({fam: (proc.pid, c) for fam, (proc, c) in pair.items()})
    inst = None
    stop_requested = []
    started = time.time()

    me = os.getpid()

    def on_term(signum, _frame):
        if os.getpid() != me:
            # A child forked by a library (pyroute2 forks for netns.create) inherits this
            # handler: it must die of the signal, never run on in our code.
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        stop_requested.append(signum)
        raise _Stop()

    signal.signal(signal.SIGTERM, on_term)
    try:
        try:
            inst, user, cmd = cli.setup_run(req, fork_proxy=True)
            inst.ephemeral_ca = spare_ca  # used only if the CA is ephemeral
            inst.start()
            log.info("jail %s ready in %.0f ms (resident helper); agent runs as %s",
                     inst.names.netns, sum(inst.timings.values()) * 1000, user.name)
            if inst.ca_info:
                log.info("CA SHA-256 fingerprint: %s", inst.ca_info.fingerprint)
            ready = {
                "netns": inst.names.netns, "instance": inst.names.instance,
                "log_path": inst.log_path, "argv": cmd,
                "env": inst.agent_env(user, req.environ, req.env),
                "user": {"name": user.name, "uid": user.uid, "gid": user.gid,
                         "groups": list(user.groups), "home": user.home, "shell": user.shell},
                "timings": inst.timings,
            }
        except PanopticonError as e:
            if inst is not None:
                inst.stop()
            _send_quietly(conn, {"error": {"message": e.message, "hint": e.hint,
                                           "status": int(e.status)}})
            return 0 if pair is None or firewall.all_borrowed_back() else 1
        conn.settimeout(None)
        proto.send(conn, {"ready": ready})
        # The jail lives as long as the client says so, or as long as it lives.
        with contextlib.suppress(OSError, proto.ProtocolError):
            proto.recv(conn)
    except _Stop:
        log.warning("jail process: stopping at SIGTERM")
    except BaseException as e:  # noqa: BLE001 - anything else: tear down, report, fail
        log.error("jail process failed: %r", e)
        _send_quietly(conn, {"error": {"message": f"the jail could not be built: {e!r}",
                                       "hint": "this is a bug in panopticon: report it",
                                       "status": int(ExitStatus.ERROR)}})
        stop_requested.append(0)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the teardown runs to its end
        teardown_error = None
        if inst is not None:
            try:
                inst.stop()  # kills whatever still runs in the namespace: the agent too
            except Exception as e:  # noqa: BLE001 - reported to the client, as the cold path would
                teardown_error = e
    if inst is not None and inst.ca_info is not None:
        # The run's summary, written here (its stderr is the client's): the client
        # would otherwise import the log reader for it (~80 ms of every run).
        with contextlib.suppress(Exception):
            cli.print_summary(inst.log_path, inst.names.instance, started, req.agent,
                              default_log=req.log is None)
    if teardown_error is not None:
        log.error("jail process: teardown failed: %s", teardown_error)
        hint = getattr(teardown_error, "hint", None) or \
            f"run 'panopticon cleanup {inst.names.instance}'"
        _send_quietly(conn, {"error": {"message": f"teardown failed: {teardown_error}",
                                       "hint": hint, "status": int(ExitStatus.ERROR)}})
        return 1
    _send_quietly(conn, {"stopped": {}})
    clean = not stop_requested and (pair is None or firewall.all_borrowed_back())
    firewall.forget_borrowed()
    return 0 if clean else 1


class _Stop(Exception):
    pass


def _send_quietly(conn: socket.socket, msg: dict) -> None:
    with contextlib.suppress(OSError):
        proto.send(conn, msg)


def main(argv: list[str] | None = None) -> int:
    """`panopticon helper [--socket PATH]`."""
    import argparse

    p = argparse.ArgumentParser(prog="panopticon helper")
    p.add_argument("--socket", metavar="PATH", help=f"default {proto.DEFAULT_SOCKET}")
    args = p.parse_args(argv)
    return serve(args.socket)
