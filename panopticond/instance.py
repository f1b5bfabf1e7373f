"""The start/stop sequence of one jail (DESIGN.md, "Order of start").

Every step that creates something pushes its idempotent undo onto an ExitStack the
moment the thing exists, so a failure anywhere tears down exactly what was built, in
reverse order. `cleanup(name)` rebuilds the same undos from the name alone, for what a
killed run left behind.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import grp
import ipaddress
import json
import logging
import os
import pwd
import shutil
import signal
import subprocess
import time

from . import agent as agentmod
from . import ca, firewall, netns, rules
from .config import AgentConfig, Config
from .errors import ExitStatus, PanopticonError
from .plan import DNS_PORT, TRANSPARENT_PORT, Addressing, Names, choose_addressing
from .policy import Policy
from .proxy import Proxy, ProxySpec
from .resolvers import host_resolvers

log = logging.getLogger("panopticon")

OWNER_FILE = "owner.pid"


@dataclasses.dataclass(frozen=True)
class ProxyUser:
    name: str
    uid: int
    gid: int

    @classmethod
    def lookup(cls, name: str) -> ProxyUser:
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            raise PanopticonError(
                f"the proxy user {name!r} does not exist",
                hint="run scripts/install (it creates it), or set [proxy] user in the config",
                status=ExitStatus.UNAVAILABLE,
            ) from None
        if pw.pw_uid == 0:
            raise PanopticonError(f"the proxy user {name!r} is root",
                                  hint="use an unprivileged system user",
                                  status=ExitStatus.NOPERM)
        return cls(name, pw.pw_uid, pw.pw_gid)


def _owner_alive(names: Names) -> int | None:
    try:
        with open(os.path.join(names.run_dir, OWNER_FILE)) as f:
            pid = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    if pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
    # A recycled pid would be another program: check it is one of ours.
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"panopticon" not in f.read():
                return None
    except OSError:
        return None
    return pid


def cleanup(name: str, *, force: bool = False) -> list[str]:
    """Remove everything a run of instance `name` may have left; idempotent.

    Returns what was found and removed (empty: nothing was left).
    """
    names = Names.of(name)
    owner = _owner_alive(names)
    if owner is not None and not force:
        raise PanopticonError(
            f"instance {name} is running (pid {owner})",
            hint=f"stop it first, or use 'panopticon cleanup --force {name}'",
        )
    removed: list[str] = []
    had_ns = netns.exists(names.netns)
    had_veth = _link_exists(names.veth_host)
    if not (had_ns or had_veth or os.path.isdir(names.run_dir)):
        # The runtime directory is created first and removed last: without it, and with
        # neither namespace nor veth, no earlier run got far enough to leave rules.
        return removed
    pids = netns.pids_in(names.netns)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if pids:
        removed.append(f"{len(pids)} process(es) in {names.netns}")
    firewall.remove_host_rules(names.tag)
    netns.delete(names)
    if had_ns:
        removed.append(f"network namespace {names.netns}")
    if had_veth:
        removed.append(f"veth {names.veth_host}")
    if os.path.isdir(names.run_dir):
        shutil.rmtree(names.run_dir, ignore_errors=True)
        removed.append(f"runtime directory {names.run_dir}")
    return removed


def _link_exists(ifname: str) -> bool:
    return os.path.exists(f"/sys/class/net/{ifname}") or _link_exists_netlink(ifname)


def _link_exists_netlink(ifname: str) -> bool:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        return bool(ipr.link_lookup(ifname=ifname))


def _write_private(path: str, data: str, gid: int) -> None:
    """Readable by root and the proxy's group only; replaced atomically (rename)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o640)
    with os.fdopen(fd, "w") as f:
        f.write(data)
    os.chown(tmp, 0, gid)
    os.replace(tmp, path)


class Instance:
    """One jail. `start()` then `run_agent()` or supervision, then `stop()` (idempotent)."""

    def __init__(
        self,
        cfg: Config,
        agent: AgentConfig,
        *,
        log_path: str | None = None,
        allow_hint: str = "",
    ):
        self.cfg = cfg
        self.agent = agent
        self.names = Names.of(agent.name)
        self.proxy_user = ProxyUser.lookup(cfg.proxy.user)
        self.ipv6 = cfg.network.ipv6
        self.log_path = log_path or os.path.join(self.names.log_dir, "requests.jsonl")
        self.allow_hint = allow_hint
        self.addressing: Addressing | None = None
        self.ca_info: ca.CAInfo | None = None
        self.proxy: Proxy | None = None
        self.log_offset = 0
        self._undo = contextlib.ExitStack()
        self.timings: dict[str, float] = {}

    # -- start -------------------------------------------------------------------

    def dns_servers(self) -> list[str]:
        servers = list(self.cfg.network.dns_servers) or host_resolvers()
        if not self.ipv6:
            servers = [s for s in servers if ipaddress.ip_address(s).version == 4]
        if not servers:
            raise PanopticonError("no usable upstream DNS server",
                                  hint="set dns_servers in [network] of the config")
        return servers

    def rulesets(self, dns: list[str]) -> tuple[list[rules.RuleSet], list[rules.RuleSet]]:
        """(inside the jail, on the host) for both families."""
        assert self.addressing
        a = self.addressing
        jail, host = [], []
        for fam in (4, 6):
            fam_dns = [d for d in dns if ipaddress.ip_address(d).version == fam]
            jail.append(rules.jail_rules(
                fam, proxy_uid=self.proxy_user.uid, transparent_port=TRANSPARENT_PORT,
                dns_port=DNS_PORT, dns_servers=fam_dns,
            ))
            subnet = a.v4_subnet if fam == 4 else a.v6_subnet
            if subnet is not None:
                host.append(rules.host_rules(
                    fam, tag=self.names.tag, veth_host=self.names.veth_host,
                    subnet=str(subnet), dns_servers=fam_dns,
                ))
        return jail, host

    def _step(self, name: str, t0: float) -> float:
        t = time.monotonic()
        self.timings[name] = t - t0
        log.debug("step %s: %.0f ms", name, (t - t0) * 1000)
        return t

    def start(self) -> None:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        names, pu = self.names, self.proxy_user
        t = time.monotonic()
        dns = self.dns_servers()

        # Leftovers of a crashed run of the same instance go first.
        left = cleanup(names.instance)
        if left:
            log.info("removed leftovers of an earlier run: %s", ", ".join(left))
        t = self._step("cleanup", t)

        os.makedirs(os.path.dirname(names.run_dir), mode=0o755, exist_ok=True)
        os.makedirs(names.run_dir, mode=0o751)
        self._undo.callback(shutil.rmtree, names.run_dir, True)
        with open(os.path.join(names.run_dir, OWNER_FILE), "w") as f:
            f.write(f"{os.getpid()}\n")

        policy = Policy.build(names.instance, self.agent.allow, self.agent.deny, self.allow_hint)
        policy_path = os.path.join(names.run_dir, "policy.json")
        _write_private(policy_path, json.dumps(policy.to_dict(), indent=1), pu.gid)
        self._prepare_log()

        confdir = ca.prepare(names, self.agent.ca, pu.uid, pu.gid)
        self._undo.callback(ca.remove_ephemeral, names, self.agent.ca)
        upstream = ca.upstream_bundle(names, self.cfg.network.upstream_ca)

        # The namespace has only `lo` until its DROP rules are in.
        self.addressing = choose_addressing(
            names.tag, str(self.cfg.network.ipv4_pool),
            str(self.cfg.network.ipv6_pool) if self.ipv6 else None,
            netns.host_networks(),
        )
        netns.create(names)
        self._undo.callback(self._remove_netns)
        t = self._step("netns", t)

        # The proxy is the slowest to start: launch it now, wait for it last.
        self.proxy = Proxy(ProxySpec(
            names=names, uid=pu.uid, gid=pu.gid, confdir=confdir, policy_path=policy_path,
            log_path=self.log_path, dns_servers=tuple(dns), ipv6=self.ipv6,
            upstream_ca=upstream,
        ))
        self.proxy.start()
        self._undo.callback(self.proxy.stop)
        t = self._step("proxy-launch", t)

        # Both rule sets at once (each family in its own child, see firewall.py): the
        # jail's, DROP policies first, and the host's, which may name the veth before it
        # exists. Each is read back and compared with the plan before apply() returns.
        jail_rs, host_rs = self.rulesets(dns)
        self._undo.callback(firewall.remove_host_rules, names.tag)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            host_done = pool.submit(firewall.apply, host_rs, None)
            firewall.apply(jail_rs, names.netns)
            host_done.result()
        t = self._step("rules", t)

        # Only now does the namespace get a route out.
        netns.connect(names, self.addressing)
        t = self._step("link", t)

        self.proxy.wait_ready()
        t = self._step("proxy-ready", t)
        self.ca_info = ca.export(names, confdir)
        self._step("ca", t)
        log.info("ready: %s (%s%s), CA SHA-256 %s", names.netns, self.addressing.v4_jail,
                 f", {self.addressing.v6_jail}" if self.addressing.v6_jail else "",
                 self.ca_info.fingerprint)

    def _prepare_log(self) -> None:
        pu = self.proxy_user
        d = os.path.dirname(os.path.abspath(self.log_path))
        if not os.path.isdir(d):
            os.makedirs(d, mode=0o750)
            os.chown(d, pu.uid, pu.gid)
        fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o640)
        os.fchown(fd, pu.uid, pu.gid)
        self.log_offset = os.fstat(fd).st_size
        os.close(fd)

    def _remove_netns(self) -> None:
        for pid in netns.pids_in(self.names.netns):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        netns.delete(self.names)

    # -- the agent -----------------------------------------------------------------

    def run_agent(self, argv: list[str], user: agentmod.AgentUser,
                  extra_env: dict[str, str] | None = None) -> int:
        assert self.ca_info, "start() first"
        env = agentmod.build_env(user, os.environ, self.ca_info.agent_env(), extra_env or {})
        proc = agentmod.launch(self.names.netns, user, argv, env)

        # Ctrl-C reaches the agent from the terminal (same process group): let it decide.
        # SIGTERM/SIGHUP to us are passed on; we tear down once it has exited.
        def forward(signum, _frame):
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)

        old = {s: signal.signal(s, h) for s, h in (
            (signal.SIGINT, signal.SIG_IGN), (signal.SIGTERM, forward), (signal.SIGHUP, forward))}
        try:
            rc = proc.wait()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
        return agentmod.exit_code(rc)

    # -- stop ----------------------------------------------------------------------

    def stop(self) -> None:
        """Idempotent: undo everything start() built, in reverse order."""
        self._undo.close()

    def summary(self) -> dict:
        """Counts and blocked hosts from this run's part of the request log."""
        allowed = blocked = 0
        hosts: dict[str, int] = {}
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self.log_offset)
                for line in f:
                    try:
                        rec = json.loads(line)
                    except ValueError:
                        continue
                    if rec.get("instance") not in (None, self.names.instance):
                        continue
                    if rec.get("decision") == "allow":
                        allowed += 1
                    elif rec.get("decision") == "deny":
                        blocked += 1
                        h = str(rec.get("host") or rec.get("qname") or "?")
                        hosts[h] = hosts.get(h, 0) + 1
        except OSError:
            pass
        return {"allowed": allowed, "blocked": blocked, "blocked_hosts": hosts}


def proxy_group(name: str) -> int:
    return grp.getgrnam(name).gr_gid
