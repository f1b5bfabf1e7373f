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
from . import addresses, ca, destinations, firewall, netns, rules
from . import inbound as inbound_plan
from . import logread, secretsource, tripwatch, trusted, webhook
from .config import AgentConfig, Config
from .errors import ExitStatus, PanopticonError
from .plan import DNS_PORT, TRANSPARENT_PORT, Addressing, Names, choose_addressing
from .plan import transparent_ports
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
        fork_proxy: bool = False,
    ):
        """`fork_proxy`: the caller has mitmproxy loaded and no threads (the resident
        helper, helper.py): the proxy is forked from it (proxy.Proxy)."""
        self.cfg = cfg
        self.fork_proxy = fork_proxy
        # An ephemeral CA made ahead by the resident helper (ca.new_ephemeral), or None.
        self.ephemeral_ca: ca.EphemeralCA | None = None
        self.agent = agent
        self.names = Names.of(agent.name)
        self.proxy_user = ProxyUser.lookup(cfg.proxy.user)
        self.ipv6 = cfg.network.ipv6
        self.log_path = log_path or os.path.join(self.names.log_dir, "requests.jsonl")
        self.allow_hint = allow_hint
        self.addressing: Addressing | None = None
        self.ca_info: ca.CAInfo | None = None
        self.proxy: Proxy | None = None
        self.workers: list[Proxy] = []  # proxy workers 1..N-1 (proxy_workers); 0 is `proxy`
        self.heartbeat = False  # the daemon sets it: the proxy then beats (Proxy.last_beat)
        self.planned_rules: tuple[list[rules.RuleSet], list[rules.RuleSet]] = ([], [])
        self.log_offset = 0
        self.log_status = ""  # the proxy's report on the log (logread.status_path)
        self.monitor: webhook.Monitor | None = None
        self.secret_env: dict[str, str] = {}  # the agent's placeholders (secretsource.py)
        self.tripwatch: tripwatch.TripwireWatch | None = None
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
        published = inbound_plan.plan(self.agent.inbound, ipv6=self.ipv6)
        # One list with the proxy's own address check (addresses.py, binding.py).
        allowed = [addresses.parse_network(c) for c in self.agent.allow_cidrs]
        dest = destinations.of_agent(self.agent)
        tcp_ports = dest.tcp_ports if dest is not None else ()
        jail, host = [], []
        for fam in (4, 6):
            fam_dns = [d for d in dns if ipaddress.ip_address(d).version == fam]
            blocked = addresses.blocked_networks(fam, allowed, self.never_reach())
            jail.append(rules.jail_rules(
                fam, proxy_uid=self.proxy_user.uid, transparent_port=TRANSPARENT_PORT,
                workers=self.agent.proxy_workers, dns_port=DNS_PORT, dns_servers=fam_dns,
                inbound=inbound_plan.jail_inbound(published, fam), veth=self.names.veth_jail,
                blocked_ranges=blocked, tcp_ports=tcp_ports,
            ))
            subnet = a.v4_subnet if fam == 4 else a.v6_subnet
            jail_addr = a.v4_jail if fam == 4 else a.v6_jail
            if subnet is not None and jail_addr is not None:
                host.append(inbound_plan.with_host_rules(rules.host_rules(
                    fam, tag=self.names.tag, veth_host=self.names.veth_host,
                    subnet=str(subnet), dns_servers=fam_dns, blocked_ranges=blocked,
                    tcp_ports=tcp_ports,
                ), published, veth_host=self.names.veth_host, jail=jail_addr))
        return jail, host

    def never_reach(self) -> list[addresses.Network]:
        """Beyond the built-in ranges, what the proxy never reaches whatever allow_cidrs
        says: the pools (every instance's subnets) and every address of the host."""
        if getattr(self, "_never_reach", None) is None:
            n = self.cfg.network
            nets: list[addresses.Network] = [n.ipv4_pool, n.ipv6_pool]
            nets += [ipaddress.ip_network(a) for a in netns.host_addresses()]
            self._never_reach = list(dict.fromkeys(nets))
        return self._never_reach

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
        # Secret values are read first: a missing or exposed one touches nothing.
        secrets = secretsource.load(self.agent.secrets)
        self.secret_env = secretsource.agent_env(secrets)
        # Code the proxy will run must be root's alone; checked again as it loads.
        for path in self.agent.addons:
            trusted.check(path, "operator addon", pu.gid)

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

        policy_path = self.write_policy()
        # For the proxy user alone: never in argv, its environment or proxy.json.
        secrets_path = os.path.join(names.run_dir, secretsource.FILE_NAME)
        secretsource.write_for_proxy(
            secrets_path, secretsource.proxy_doc(secrets, self.agent.dlp, self.agent.dlp_patterns),
            pu.uid, pu.gid)
        del secrets
        self._prepare_log()
        if any(s.on_tripwire == "kill" for s in self.agent.secrets):
            self.tripwatch = tripwatch.TripwireWatch(
                self.log_path, names.instance, names.netns,
                lambda: {p.proc.pid for p in self.proxies() if p.proc})
            self._undo.callback(self.tripwatch.stop)
        # Alerts (and the journal's view of the log's health) from the host side. Its stop
        # is pushed before the proxy's, so that it stops after it and sees the proxy's
        # last records. Both watchers are threads: they start once the proxy is launched
        # (a forked proxy must be forked from a process with one thread).
        self.monitor = webhook.Monitor(names.instance, self.log_path, self.log_status,
                                       self.cfg.webhook)
        self._undo.callback(self.monitor.stop)

        confdir = ca.prepare(names, self.agent.ca, pu.uid, pu.gid, self.ephemeral_ca)
        if self.fork_proxy and self.ephemeral_ca and self.agent.ca.mode == "ephemeral":
            from .proxy_main import seed_ca

            seed_ca(confdir, self.ephemeral_ca.private_key, self.ephemeral_ca.certificate)
        self._undo.callback(ca.remove_ephemeral, names, self.agent.ca)
        pins_socket = self._prepare_workers(confdir)
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
            upstream_ca=upstream, log_max_bytes=self.agent.log_max_bytes,
            log_keep=self.agent.log_keep, log_status=self.log_status,
            operator_addons=self.agent.addons,
            blocked=tuple(str(n) for n in self.never_reach()),
            secrets_path=secrets_path,
            fresh_ca=self.agent.ca.mode == "ephemeral" and not os.path.exists(
                os.path.join(confdir, ca.CA_KEY_AND_CERT)),
            workers=self.agent.proxy_workers, pins_socket=pins_socket,
            **self._prepare_inbound(),
        ), fork=self.fork_proxy)
        self.proxy.start()
        self._undo.callback(self._stop_proxy)  # whichever proxy runs then (restart_proxy)
        for i in range(1, self.agent.proxy_workers):
            self.workers.append(Proxy(dataclasses.replace(self.proxy.spec, worker=i),
                                      fork=self.fork_proxy))
            self.workers[-1].start()
        # Both follow the log from its current end: nothing the proxy writes is missed.
        self.monitor.start()
        if self.tripwatch is not None:
            self.tripwatch.start()
        t = self._step("proxy-launch", t)

        # Both rule sets in one child per family (see firewall.apply_each: a child costs
        # about 0.3 s of CPU, on two cores beside the proxy's start-up): the jail's, DROP
        # policies first, then the host's, which may name the veth before it exists. Each
        # is read back and compared with the plan before apply_each() returns.
        jail_rs, host_rs = self.planned_rules = self.rulesets(dns)
        self._undo.callback(self._remove_host_rules_stopping_proxy)
        firewall.apply_each([(jail_rs, names.netns), (host_rs, None)])
        t = self._step("rules", t)

        # Only now does the namespace get a route out.
        netns.connect(names, self.addressing)
        t = self._step("link", t)

        self.proxy.wait_ready(heartbeat=self.heartbeat)
        for w in self.workers:
            w.wait_ready(heartbeat=self.heartbeat)
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
        # The proxy reports the log's state here (it cannot write the run dir itself).
        self.log_status = logread.status_path(self.names.run_dir)
        os.mkdir(os.path.dirname(self.log_status), 0o750)
        os.chown(os.path.dirname(self.log_status), pu.uid, pu.gid)

    def _prepare_workers(self, confdir: str) -> str:
        """With several proxy workers: their one CA, made before any starts, and the
        directory of worker 0's pin socket (pinshare.py), which only the proxy user may
        enter. Returns the socket's path; "" with one worker (nothing changes)."""
        if self.agent.proxy_workers == 1:
            return ""
        pu = self.proxy_user
        if ca.create_if_missing(confdir, pu.uid, pu.gid):
            log.debug("generated the CA for %d proxy workers", self.agent.proxy_workers)
        d = os.path.join(self.names.run_dir, "pins")
        os.mkdir(d, 0o700)
        os.chown(d, pu.uid, pu.gid)
        return os.path.join(d, "pins.sock")

    def _prepare_inbound(self) -> dict:
        """The proxy's inbound listeners and the files they read (see inbound.py)."""
        published = inbound_plan.plan(self.agent.inbound, ipv6=self.ipv6)
        if not published:
            return {}
        run_dir, gid = self.names.run_dir, self.proxy_user.gid
        for p in published:
            if p.route.tls == "custom":
                _write_private(inbound_plan.cert_file(run_dir, p.route),
                               _custom_cert(p.route), gid)
        path = os.path.join(run_dir, "inbound.json")
        _write_private(path, json.dumps(inbound_plan.proxy_config(published, run_dir),
                                        indent=1), gid)
        for warning in inbound_plan.shadowed(published, _host_listeners()):
            log.warning("%s", warning)
        for p in published:
            log.info("inbound route %s: %s (IPv%s) -> %s in the jail, from %s", p.route.name,
                     p.route.listen, "+".join(map(str, p.families)), p.route.to,
                     ", ".join(p.sources(4) + p.sources(6)))
        return {"inbound_modes": tuple(inbound_plan.proxy_modes(published)),
                "inbound_path": path}

    def _remove_netns(self) -> None:
        for pid in netns.pids_in(self.names.netns):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        netns.delete(self.names)

    # -- policy, supervision, reload (the daemon's; see daemon.py) -------------------

    def compiled_policy(self) -> dict:
        return Policy.build(self.names.instance, self.agent.allow, self.agent.deny,
                            self.allow_hint, rules=self.agent.rules, mode=self.agent.mode,
                            headers=self.agent.headers,
                            destinations=destinations.of_agent(self.agent)).to_dict()

    def write_policy(self) -> str:
        """Compile the agent's policy and swap it in by rename; the proxy's PolicyFile
        re-reads it within its interval. Compiled before anything is written: a policy
        that fails to compile leaves the one in force untouched."""
        text = json.dumps(self.compiled_policy(), indent=1)
        path = os.path.join(self.names.run_dir, "policy.json")
        _write_private(path, text, self.proxy_user.gid)
        return path

    def proxies(self) -> list[Proxy]:
        """Every proxy worker that was started, worker 0 first."""
        return [p for p in (self.proxy, *self.workers) if p is not None]

    def _stop_proxy(self) -> None:
        for p in self.proxies():
            p.stop()

    def _remove_host_rules_stopping_proxy(self) -> None:
        """The host's rules go while the proxy stops (before, they went first): neither
        needs the other, and either may take a few hundred ms (a fresh iptables child
        where none was prestarted, as in the daemon). A failed removal is raised once the
        proxy has stopped."""
        def timed(what: str, fn, *args) -> None:
            t0 = time.monotonic()
            fn(*args)
            log.debug("teardown %s: %.0f ms", what, (time.monotonic() - t0) * 1000)

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            removal = pool.submit(timed, "host-rules", firewall.remove_host_rules, self.names.tag)
            try:
                timed("proxy-stop", self._stop_proxy)
            finally:
                removal.result()

    def restart_proxy(self, worker: int = 0) -> None:
        """Replace the proxy (dead, hung or stopped) with a fresh one on the same spec;
        with several, proxy worker `worker`.

        The REDIRECT rules stay in place throughout: meanwhile the agent's connections
        (those the REDIRECT gives this worker) are refused, never let out. Raises
        PanopticonError if the new one does not come up.
        """
        assert self.proxy is not None, "start() first"
        old = self.proxies()[worker]
        if old.proc is not None and old.proc.poll() is None:
            old.proc.kill()  # a stopped or hung proxy would not heed SIGTERM
        old.stop()
        new = Proxy(old.spec, fork=old.fork)
        if worker == 0:
            self.proxy = new
        else:
            self.workers[worker - 1] = new
        new.start()
        new.wait_ready(heartbeat=self.heartbeat)

    def verify_rules(self) -> list[str]:
        """How the live rules (jail and host side) differ from the plan; empty: they match.

        PanopticonError if they cannot be read at all (the namespace is gone, say)."""
        jail_rs, host_rs = self.planned_rules
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            host = pool.submit(firewall.verify, host_rs, None)
            return firewall.verify(jail_rs, self.names.netns) + host.result()

    def reload(self, cfg: Config, agent: AgentConfig, allow_hint: str = "") -> tuple[list[str], bool]:
        """Apply a config that already passed validation to the running jail.

        The new policy is compiled first, then swapped in atomically. What only a restart
        can change (network, proxy user, the agent's command, user, CA, health address)
        keeps its running value and is returned as dotted keys. Also returned: whether
        the policy got narrower (something allowed before may now be denied).
        """
        pending = restart_only_changes(self.cfg, self.agent, cfg, agent)
        kept = {k: getattr(self.agent, k) for k in RESTART_ONLY_AGENT_KEYS}
        new_agent = dataclasses.replace(agent, **kept)
        old_agent, old_hint, old_policy = self.agent, self.allow_hint, self.compiled_policy()
        self.agent, self.allow_hint = new_agent, allow_hint
        try:
            new_policy = self.compiled_policy()
            self.write_policy()
        except BaseException:
            self.agent, self.allow_hint = old_agent, old_hint
            raise
        self.cfg = dataclasses.replace(cfg, network=self.cfg.network, proxy=self.cfg.proxy)
        return pending, policy_narrowed(old_policy, new_policy)

    def close_connections(self) -> int:
        """Abort every connection the agent has open through the proxy, so that each is
        made again and judged by the policy now in force; returns how many were closed.

        The kernel does it (SOCK_DESTROY, `ss -K`) on the proxy's side of each connection
        to its transparent port: the agent gets a reset, the proxy drops the upstream side.
        """
        ports = " or ".join(f"sport = :{p}" for p in transparent_ports(self.agent.proxy_workers))
        p = subprocess.run(
            ["nsenter", f"--net={netns.netns_path(self.names.netns)}", "ss", "-K", "-t", "-n",
             "-H", "state", "established", f"( {ports} )"],
            capture_output=True, text=True, timeout=30)
        if p.returncode != 0:
            raise PanopticonError(f"could not close the agent's connections: {p.stderr.strip()}",
                                  hint="the kernel needs CONFIG_INET_DIAG_DESTROY")
        return len([ln for ln in p.stdout.splitlines() if ln.strip()])

    # -- the agent -----------------------------------------------------------------

    def run_agent(self, argv: list[str], user: agentmod.AgentUser,
                  extra_env: dict[str, str] | None = None) -> int:
        return agentmod.run(self.names.netns, user, argv, self.agent_env(user, os.environ, extra_env))

    def agent_env(self, user: agentmod.AgentUser, caller_env, extra_env=None) -> dict[str, str]:
        """The agent's whole environment: the caller's allowed variables, the trust
        variables of the CA, `--env`, the placeholders of the secrets."""
        assert self.ca_info, "start() first"
        return agentmod.build_env(user, caller_env, self.ca_info.agent_env(),
                                  {**(extra_env or {}), **self.secret_env})

    # -- stop ----------------------------------------------------------------------

    def stop(self) -> None:
        """Idempotent: undo everything start() built, in reverse order."""
        self._undo.close()


def _custom_cert(route: inbound_plan.Route) -> str:
    """The operator's certificate chain and key for an inbound route, checked, as PEM."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    where = f"inbound route {route.name}"
    try:
        with open(route.cert or "", "rb") as f:
            cert = f.read()
        with open(route.key or "", "rb") as f:
            key = f.read()
    except OSError as e:
        raise PanopticonError(f"{where}: cannot read {e.filename}: {e.strerror}",
                              hint="tls = { cert = ..., key = ... } name PEM files root can read"
                              ) from None
    try:
        chain = x509.load_pem_x509_certificates(cert)
        pkey = serialization.load_pem_private_key(key, password=None)
    except (ValueError, TypeError) as e:
        raise PanopticonError(f"{where}: not a PEM certificate and unencrypted key: {e}",
                              hint="the key must not be encrypted") from None
    if chain[0].public_key().public_numbers() != pkey.public_key().public_numbers():
        raise PanopticonError(f"{where}: {route.key} is not the key of {route.cert}",
                              hint="the first certificate in the file is the server's own")
    pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain)
    pem += pkey.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption())
    return pem.decode()


def _host_listeners() -> dict[int, list[str]]:
    """TCP ports listened on in this (the host's) namespace: port -> bound addresses."""
    out: dict[int, list[str]] = {}
    for fam, name in ((4, "tcp"), (6, "tcp6")):
        try:
            with open(f"/proc/net/{name}") as f:
                text = f.read()
        except OSError:
            continue
        for port, addrs in inbound_plan.parse_proc_net_tcp(text, fam).items():
            out.setdefault(port, []).extend(addrs)
    return out


def proxy_group(name: str) -> int:
    return grp.getgrnam(name).gr_gid


# What a reload cannot change in a running jail: the agent process, its CA, its health
# address, and everything the namespace and the proxy were built with (the secrets: the
# agent's environment holds their placeholders).
RESTART_ONLY_AGENT_KEYS = ("command", "user", "ca", "health", "addons", "secrets", "dlp",
                           "dlp_patterns", "proxy_workers")


def restart_only_changes(old_cfg: Config, old: AgentConfig, new_cfg: Config,
                         new: AgentConfig) -> list[str]:
    """The dotted keys that differ between the two configs but need a restart."""
    out = [f"agents.{old.name}.{k}" for k in RESTART_ONLY_AGENT_KEYS
           if getattr(old, k) != getattr(new, k)]
    for section in ("network", "proxy"):
        a, b = getattr(old_cfg, section), getattr(new_cfg, section)
        out += [f"{section}.{f.name}" for f in dataclasses.fields(a)
                if getattr(a, f.name) != getattr(b, f.name)]
    return out


def policy_narrowed(old: dict, new: dict) -> bool:
    """Whether `new` (a compiled policy) may deny something `old` allowed: an allow
    pattern went, a deny pattern came, or anything else in it changed."""
    def items(d: dict, k: str) -> set[str]:
        return {json.dumps(x, sort_keys=True) for x in d.get(k) or ()}

    if items(old, "allow") - items(new, "allow") or items(new, "deny") - items(old, "deny"):
        return True
    rest = ("allow", "deny", "allow_hint")
    return {k: v for k, v in old.items() if k not in rest} != \
        {k: v for k, v in new.items() if k not in rest}
