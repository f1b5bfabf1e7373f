"""The proxy process: its options, privilege drop, readiness and stop.

mitmproxy runs inside the instance namespace as the proxy user, listening on loopback
only (transparent :901, DNS :953, on 127.0.0.1 and ::1), and connects upstream only
after our addons decided (`connection_strategy=lazy`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from typing import NoReturn

from . import privs
from .errors import PanopticonError
from .plan import DNS_PORT, TRANSPARENT_PORT, Names


@dataclasses.dataclass(frozen=True)
class ProxySpec:
    names: Names
    uid: int
    gid: int
    confdir: str
    policy_path: str
    log_path: str
    dns_servers: tuple[str, ...]
    ipv6: bool
    upstream_ca: str | None  # a bundle path, or None for mitmproxy's default
    operator_addons: tuple[str, ...] = ()  # the operator's addon scripts (operator_addons.py)
    log_max_bytes: int = 0  # rotation of the request log (logfile.py); 0: never
    log_keep: int = 5
    log_status: str = ""  # where the proxy reports the log's state (logread.status_path)
    inbound_modes: tuple[str, ...] = ()  # reverse listeners of inbound routes (inbound.py)
    inbound_path: str = ""  # their routes, for addons/inbound.py; "" for none
    # Networks never dialled whatever the policy says: the host's addresses, the pools.
    blocked: tuple[str, ...] = ()
    # The secrets file (secretsource.py), the proxy user's alone; "" for none. Only its
    # path is here: the values never go into argv, the environment or proxy.json.
    secrets_path: str = ""
    # The confdir holds no CA yet and gets an ephemeral one: a prestarted proxy makes it
    # while it waits (see `prestarted`), not after it was told to go.
    fresh_ca: bool = False
    # With `proxy_workers` > 1: which one this is (worker i listens on TRANSPARENT_PORT
    # + i; worker 0 alone answers DNS and serves the inbound routes), and the socket on
    # which worker 0 shares its DNS pins (pinshare.py).
    worker: int = 0
    workers: int = 1
    pins_socket: str = ""

    @property
    def suffix(self) -> str:
        """Of this worker's files in the runtime directory: "" for worker 0, else "-i"."""
        return f"-{self.worker}" if self.worker else ""

    def options(self) -> dict:
        """Everything handed to the proxy, as data (also shown by `check --plan`)."""
        port = TRANSPARENT_PORT + self.worker
        dns = self.worker == 0
        modes = [f"transparent@127.0.0.1:{port}", *([f"dns@127.0.0.1:{DNS_PORT}"] if dns else [])]
        if self.ipv6:
            modes += [f"transparent@::1:{port}", *([f"dns@::1:{DNS_PORT}"] if dns else [])]
        mitm = {
            "mode": modes,
            "confdir": self.confdir,
            # Nothing is dialled before a decision: with "eager", the agent's SNI would
            # reach the chosen address before any hook ran.
            "connection_strategy": "lazy",
            # Without it a large download is buffered whole (and the memory kept).
            "stream_large_bodies": "1m",
            "dns_name_servers": list(self.dns_servers),
            # /etc/hosts of the host could map names to internal addresses.
            "dns_use_hosts_file": False,
            # Non-HTTP bytes on 80/443 must never become a raw relay.
            "rawtcp": False,
            "termlog_verbosity": "warn",
        }
        if self.upstream_ca:
            mitm["ssl_verify_upstream_trusted_ca"] = self.upstream_ca
        if self.inbound_modes and self.worker == 0:
            modes += list(self.inbound_modes)
            # Inbound clients may have public addresses; the routes' allow_from decides.
            mitm["block_global"] = False
        return {
            "mitmproxy": mitm,
            "operator_addons": list(self.operator_addons),
            "panopticon": {
                "panopticon_policy": self.policy_path,
                "panopticon_log": self.log_path,
                "panopticon_instance": self.names.instance,
                "panopticon_log_max_bytes": self.log_max_bytes,
                "panopticon_log_keep": self.log_keep,
                "panopticon_log_status": self.log_status,
                **({"panopticon_inbound": self.inbound_path} if self.inbound_path else {}),
                "panopticon_blocked": list(self.blocked),
                **({"panopticon_secrets": self.secrets_path} if self.secrets_path else {}),
                **({"panopticon_worker": self.worker, "panopticon_pins_socket": self.pins_socket}
                   if self.workers > 1 else {}),
            },
        }


def package_root() -> str:
    """The directory holding the `panopticond` package this daemon runs from.

    The proxy imports the very same code (no skew between daemon and proxy during an
    upgrade, and a development tree is tested as it is). The proxy user runs it and is
    exempt from the redirect, so nobody but root may be able to change it (threat 8).
    """
    pkg = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(pkg)
    for d in (pkg, root):
        st = os.stat(d)
        if st.st_uid != 0 or st.st_mode & 0o022:
            raise PanopticonError(
                f"{d} is writable by others than root: the proxy will not run code from it",
                hint="install panopticon with scripts/install, or fix the permissions",
            )
    return root


def _fork_proxy(opts_path: str, ready_w: int, err, env: dict[str, str], netns: str,
                uid: int, gid: int) -> ForkedProcess:
    """Fork the proxy from this (warm) process; see shared/notes/performance.md.

    Only from a process with one thread: a fork copies the locks other threads hold, and
    a child of a process whose mitmproxy_rs runtime had started hangs in its first UDP
    listener (the helper never starts one: it only imports).
    """
    if threading.active_count() != 1:
        raise PanopticonError("refusing to fork the proxy from a process with threads",
                              hint="this is a bug in panopticon: report it")
    devnull = os.open(os.devnull, os.O_RDONLY)
    try:
        pid = os.fork()
    except OSError:
        os.close(devnull)
        raise
    if pid:
        os.close(devnull)
        return ForkedProcess(pid)
    _become_proxy(opts_path, ready_w, err.fileno(), devnull, env, netns, uid, gid)


def _become_proxy(opts_path: str, ready_w: int, err_fd: int, stdin_fd: int,
                  env: dict[str, str], netns: str, uid: int, gid: int,
                  as_proxy_user=None) -> NoReturn:
    """In a process that has mitmproxy imported (forked from the helper, or prestarted):
    become the proxy. Nothing of the parent's may remain but what the proxy needs. Any
    failure ends it before readiness is ever reported (the parent then fails closed)."""
    code = 70
    try:
        from . import proxy_main

        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD,
                    signal.SIGPIPE, signal.SIGQUIT):
            signal.signal(sig, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        os.dup2(stdin_fd, 0)
        os.dup2(err_fd, 1)
        os.dup2(err_fd, 2)
        # A forking helper holds root's sockets (its listener, clients) and pipes to the
        # root iptables workers: none of them may be inherited by the proxy user.
        os.closerange(3, ready_w)
        os.closerange(ready_w + 1, _max_fd())
        os.chdir("/")
        os.environ.clear()
        os.environ.update(env)
        privs.enter_and_drop(netns, uid, gid, groups=[], new_session=True, pdeathsig=True,
                             keep_caps=(privs.CAP_NET_BIND_SERVICE,))
        if as_proxy_user is not None:
            as_proxy_user()
        proxy_main.main([opts_path, str(ready_w)])  # ends with os._exit
    except BaseException as e:  # noqa: BLE001 - reported in proxy.log, then the child ends
        try:
            os.write(2, f"panopticon: the proxy failed to start: {e!r}\n".encode())
        except OSError:
            pass
    finally:
        os._exit(code)


# A proxy interpreter started ahead of its jail (`prestart`): (process, control, ready).
_prestarted: list[tuple[subprocess.Popen, int, int]] = []

_PRESTART_BOOT = ("import sys; sys.path.insert(0, sys.argv[1]); "
                  "from panopticond.proxy_main import prestarted; prestarted(sys.argv[2:])")


def prestart(opts_path: str = "", make_ca: bool = False) -> None:
    """Start the cold path's proxy interpreter now: it imports mitmproxy and our addons
    (~0.7 s of CPU) while `run` reads the config and builds the jail, then waits, as
    root, with nothing open but two pipes, until `Proxy.start` tells it where to go;
    only then does it enter the namespace and drop to the proxy user, as the spawned
    proxy would. It ends if its parent does, or closes the control pipe unused.
    `make_ca`: the run will most likely want an ephemeral CA (an ad-hoc run): make one
    while waiting, rather than spend ~80 ms on one that a persistent CA makes useless."""
    if _prestarted:
        return
    root = package_root()
    ctl_r, ctl_w = os.pipe()
    ready_r, ready_w = os.pipe()
    try:
        proc = subprocess.Popen(
            # `opts_path`, where its options will be, only names its jail for `ps`.
            [sys.executable, "-I", "-c", _PRESTART_BOOT, root, str(ctl_r), str(ready_w),
             "ca" if make_ca else "-", opts_path],
            stdin=subprocess.DEVNULL, pass_fds=(ctl_r, ready_w), cwd="/",
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"},
            preexec_fn=_die_with_parent)
    except BaseException:
        for fd in (ctl_r, ctl_w, ready_r, ready_w):
            os.close(fd)
        raise
    os.close(ctl_r)
    os.close(ready_w)
    _prestarted.append((proc, ctl_w, ready_r))


def discard_prestarted() -> None:
    """End a prestarted interpreter that no proxy took (idempotent)."""
    while _prestarted:
        proc, ctl_w, ready_r = _prestarted.pop()
        for fd in (ctl_w, ready_r):
            os.close(fd)  # EOF: it ends by itself
        try:
            proc.wait(2)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    privs.set_pdeathsig()



def _max_fd() -> int:
    try:
        return max(int(x) for x in os.listdir("/proc/self/fd")) + 1
    except (OSError, ValueError):
        return os.sysconf("SC_OPEN_MAX")


class ForkedProcess:
    """The part of `subprocess.Popen` that `Proxy` uses, for a child made by `os.fork`."""

    def __init__(self, pid: int):
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                self.returncode = -1
                return self.returncode
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.001
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout or 0)
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Proxy:
    def __init__(self, spec: ProxySpec, *, fork: bool = False):
        """`fork`: start it by forking this process, which has imported mitmproxy and
        proxy_main already (the resident helper, helper.py), instead of a fresh
        interpreter that spends ~0.7 s importing them."""
        self.spec = spec
        self.fork = fork
        self.proc: subprocess.Popen | ForkedProcess | None = None
        self._ready_r = -1
        self._beat_at = 0.0
        self.stderr_path = os.path.join(spec.names.run_dir, f"proxy{spec.suffix}.log")

    def start(self) -> None:
        """Launch; returns at once (start-up takes ~0.7 s: overlap it with other work)."""
        names = self.spec.names
        opts_path = os.path.join(names.run_dir, f"proxy{self.spec.suffix}.json")
        fd = os.open(opts_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        with os.fdopen(fd, "w") as f:
            json.dump(self.spec.options(), f, indent=1)
        os.chown(opts_path, 0, self.spec.gid)
        r, w = os.pipe()
        self._ready_r = r
        err = open(self.stderr_path, "ab")
        env = {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": self.spec.confdir,
            "LANG": "C.UTF-8",
        }
        uid, gid = self.spec.uid, self.spec.gid
        netns = names.netns
        if not self.fork and _prestarted:
            proc, ctl_w, ready_r = _prestarted.pop()
            os.close(r)
            os.close(w)
            err.close()
            go = {"opts": opts_path, "stderr": self.stderr_path, "env": env, "netns": netns,
                  "uid": uid, "gid": gid,
                  "fresh_ca": self.spec.confdir if self.spec.fresh_ca else ""}
            try:
                os.write(ctl_w, (json.dumps(go) + "\n").encode())
            except OSError:
                pass  # it died: wait_ready says so (with its output in proxy.log)
            finally:
                os.close(ctl_w)
            self.proc, self._ready_r = proc, ready_r
            return
        if self.fork:
            try:
                self.proc = _fork_proxy(opts_path, w, err, env, netns, uid, gid)
            finally:
                os.close(w)
                err.close()
            return

        def preexec() -> None:  # pragma: no cover - runs in the child
            privs.enter_and_drop(netns, uid, gid, groups=[], new_session=True, pdeathsig=True,
                                 keep_caps=(privs.CAP_NET_BIND_SERVICE,))

        root = package_root()
        boot = ("import sys; sys.path.insert(0, sys.argv[1]); "
                "from panopticond.proxy_main import main; sys.exit(main(sys.argv[2:]))")
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", "-c", boot, root, opts_path, str(w)],
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                pass_fds=(w,),
                env=env,
                cwd="/",
                preexec_fn=preexec,
            )
        finally:
            os.close(w)
            err.close()

    def wait_ready(self, timeout: float = 15.0, heartbeat: bool = False) -> None:
        """Until the proxy reports every listener bound. With `heartbeat`, keep listening
        to the pipe afterwards: the proxy beats on it every second (`last_beat`)."""
        deadline = time.monotonic() + timeout
        buf = b""
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise PanopticonError(
                    f"the proxy did not become ready within {timeout:.0f} s",
                    hint=f"see {self.stderr_path}",
                )
            ready, _, _ = select.select([self._ready_r], [], [], left)
            if ready:
                chunk = os.read(self._ready_r, 64)
                if not chunk:
                    break
                buf += chunk
        if heartbeat and buf.startswith(b"ready"):
            os.set_blocking(self._ready_r, False)
            self._beat_at = time.monotonic()
        else:
            os.close(self._ready_r)
            self._ready_r = -1
        if not buf.startswith(b"ready"):
            assert self.proc
            try:
                self.proc.wait(2)
            except subprocess.TimeoutExpired:
                pass
            raise PanopticonError(
                f"the proxy failed to start (exit status {self.proc.returncode}): "
                f"{self.tail()}",
                hint=f"the whole output is in {self.stderr_path}",
            )

    def tail(self, n: int = 5) -> str:
        try:
            with open(self.stderr_path, errors="replace") as f:
                lines = [ln.rstrip() for ln in f.readlines() if ln.strip()]
        except OSError:
            return ""
        return " | ".join(lines[-n:])

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def last_beat(self) -> float:
        """`time.monotonic()` of the last heartbeat read (see `wait_ready(heartbeat=True)`)."""
        while self._ready_r >= 0:
            try:
                if not os.read(self._ready_r, 4096):
                    break  # the proxy closed its end: no more beats
            except BlockingIOError:
                break
            self._beat_at = time.monotonic()
        return self._beat_at

    def state(self) -> str:
        """The process state letter of /proc (R, S, T for stopped, Z, ...); "" once reaped."""
        if self.proc is None:
            return ""
        try:
            with open(f"/proc/{self.proc.pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return ""

    def stop(self, timeout: float = 3.0) -> None:
        """Idempotent."""
        if self._ready_r >= 0:
            os.close(self._ready_r)
            self._ready_r = -1
        p = self.proc
        if p is None or p.poll() is not None:
            return
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
