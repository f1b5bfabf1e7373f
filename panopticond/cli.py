"""`panopticon` commands and the `panopticond` entry point.

Our own output goes to stderr; in `run`, stdout belongs to the agent alone. Operator
errors are `PanopticonError`s, printed once with their hint and mapped to exit codes;
a traceback only with --debug.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Sequence

from . import __version__
from .errors import ExitStatus, PanopticonError

DEFAULT_CONFIG = "/etc/panopticon/config.toml"
log = logging.getLogger("panopticon")


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(logging.Formatter("panopticon: %(message)s"))
    root = logging.getLogger("panopticon")
    root.handlers[:] = [h]
    root.setLevel(level)
    root.propagate = False


def _require_root() -> None:
    if os.geteuid() != 0:
        raise PanopticonError("this command needs root",
                              hint="run it with sudo", status=ExitStatus.NOPERM)


def _load_config(path: str | None, *, required: bool):
    from . import config

    p = path or DEFAULT_CONFIG
    if path is None and not os.path.exists(p) and not required:
        # `run` works without a config file: [defaults] only, nothing allowed but --allow.
        return config.loads("", path="<no config file>")
    return config.load(p)


# -- run --------------------------------------------------------------------------

def cmd_run(args: argparse.Namespace) -> int:
    from . import helperproto

    req = _run_request(args)
    if os.geteuid() == 0 and not args.no_helper:
        path = helperproto.socket_path()
        if path is not None:
            from . import helperclient

            rc = helperclient.run(path, req)
            if rc is not None:
                return rc
            log.info("no resident helper at %s: starting the jail here", path)
    return _run_cold(req)


def _run_request(args: argparse.Namespace):
    from .helperproto import RunRequest

    cmd = list(args.command)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    return RunRequest(
        config=os.path.abspath(args.config) if args.config else None,
        agent=args.agent, allow=tuple(args.allow), deny=tuple(args.deny), mode=args.mode,
        user=args.user, log=os.path.abspath(args.log) if args.log else None,
        command=tuple(cmd), env=_parse_env(args.env), environ=_caller_env(),
        verbose=args.verbose, pid=os.getpid(),
    )


def _caller_env() -> dict[str, str]:
    from .agent import caller_env

    return caller_env(os.environ)


def _run_cold(req) -> int:
    from . import proxy

    if os.geteuid() == 0:
        # The proxy's interpreter first: importing mitmproxy (~0.6-0.9 s of CPU) is the
        # longest part of a cold start, and it can begin before anything is decided.
        from .plan import Names

        name = req.agent or f"run-{req.pid}"
        proxy.prestart(os.path.join(Names.of(name).run_dir, "proxy.json"),
                       make_ca=req.agent is None)
    from . import firewall

    if os.geteuid() == 0:
        # Likewise the two iptables children (~0.25 s of CPU each, nearly all `import
        # iptc`): they import while the config is read and the jail is built, and the
        # same two remove the host's rules at the end.
        firewall.prestart()
    try:
        inst, user, cmd = setup_run(req)
        started = time.time()
        try:
            inst.start()
            log.info("jail %s ready in %.0f ms; agent runs as %s", inst.names.netns,
                     sum(inst.timings.values()) * 1000, user.name)
            if inst.ca_info:
                log.info("CA SHA-256 fingerprint: %s", inst.ca_info.fingerprint)
            rc = inst.run_agent(cmd, user, req.env)
        finally:
            inst.stop()
    finally:
        firewall.discard_prestarted()
        proxy.discard_prestarted()
    print_summary(inst.log_path, inst.names.instance, started, req.agent,
                  default_log=req.log is None)
    return rc


def setup_run(req, *, fork_proxy: bool = False):
    """(Instance, agent user, command) for a run request; nothing is built yet.
    Shared by the cold path and the resident helper's jail process (helper.py)."""
    from . import agent as agentmod
    from . import config
    from .instance import Instance, ProxyUser

    cfg = _load_config(req.config, required=False)
    ag = config.agent_config(cfg, req.agent, allow=tuple(req.allow), deny=tuple(req.deny),
                             user=req.user, mode=req.mode)
    cmd = list(req.command) or list(ag.command)
    if not cmd:
        raise PanopticonError("no command to run", hint="panopticon run [OPTIONS] -- CMD ARGS...",
                              status=ExitStatus.USAGE)
    _require_root()
    if req.agent is None:
        ag = _adhoc(ag, f"run-{req.pid}")
    pu = ProxyUser.lookup(cfg.proxy.user)
    user = agentmod.resolve_user(ag.user, req.environ, proxy_uid=pu.uid, proxy_gid=pu.gid)
    inst = Instance(cfg, ag, log_path=req.log, allow_hint=config.allow_hint(cfg, ag),
                    fork_proxy=fork_proxy)
    return inst, user, cmd


def _adhoc(ag, name: str):
    """An ad-hoc run (no --agent) gets a name of its own, so that several can run at once,
    and an ephemeral CA: one kept for a name that never comes back would pile up."""
    ag = _replace_name(ag, name)
    if ag.ca.mode == "persistent":
        ag = dataclasses.replace(ag, ca=dataclasses.replace(ag.ca, mode="ephemeral"))
    return ag


def _replace_name(ag, name: str):
    import dataclasses

    return dataclasses.replace(ag, name=name)


def _parse_env(items: Sequence[str]) -> dict[str, str]:
    env = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep:
            if k not in os.environ:
                raise PanopticonError(f"--env {k}: not set in the environment",
                                      hint="use --env NAME=VALUE", status=ExitStatus.USAGE)
            v = os.environ[k]
        env[k] = v
    return env


def print_summary(log_path: str, instance: str, started: float, agent: str | None, *,
                  default_log: bool) -> None:
    from .logcli import print_run_summary

    key = f"allow of [agents.{agent}]" if agent else "allow of [defaults]"
    print_run_summary(log_path, instance, started, key, default_log)


# -- check ------------------------------------------------------------------------

def cmd_check(args: argparse.Namespace) -> int:
    from . import config

    cfg = _load_config(args.config, required=True)
    names = [args.agent] if args.agent else sorted(cfg.agents)
    agents = [config.agent_config(cfg, n) for n in names]
    if args.plan and not args.agent:
        # What `panopticon run` without --agent gets: [defaults] alone, named run-<its pid>.
        agents.append(_adhoc(config.agent_config(cfg, None), "run-pid"))
    doc: dict = {"config": cfg.path, "agents": {}}
    for ag in agents:
        entry: dict = {
            "command": list(ag.command), "user": ag.user,
            "allow": list(ag.allow), "deny": list(ag.deny),
            "ca": ag.ca.mode if ag.ca.mode != "custom" else {"cert": ag.ca.cert, "key": ag.ca.key},
            "rules": [str(r) for r in ag.rules],
            "headers": {str(h.host): [n for n, _ in h.headers] for h in ag.headers},
            "addons": list(ag.addons), "mode": ag.mode,
            "secrets": _secrets_checked(ag), "dlp": ag.dlp,
            "inbound": {r.name: r.to_dict() for r in ag.inbound},
            "proxy_workers": ag.proxy_workers,
        }
        if args.plan:
            entry["plan"] = _plan(cfg, ag)
        doc["agents"][ag.name] = entry
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    print(f"{cfg.path}: OK, {len(cfg.agents)} agent(s)")
    for name, e in doc["agents"].items():
        print(f"\n[agents.{name}]")
        print(f"  command: {' '.join(e['command']) or '(none)'}")
        print(f"  user:    {e['user'] or '(the sudo caller)'}")
        print(f"  allow:   {', '.join(e['allow']) or '(nothing)'}")
        print(f"  deny:    {', '.join(e['deny']) or '(nothing)'}")
        print(f"  ca:      {e['ca']}")
        for route, r in e["inbound"].items():
            print(f"  inbound: {route}: {r['listen']} -> {r['to']} in the jail, tls "
                  f"{r['tls'] if isinstance(r['tls'], str) else 'own certificate'}, from "
                  f"{', '.join(r['allow_from'])}{', websocket' if r['websocket'] else ''}")
        for r in e["rules"]:
            print(f"  rule:    {r}")
        for host, names in e["headers"].items():
            print(f"  headers: {host}: {', '.join(names)}")
        for a in e["addons"]:
            print(f"  addon:   {a}")
        if e["mode"] != "enforce":
            print(f"  mode:    {e['mode']}")
        for sec in e["secrets"]:
            print(f"  secret:  {sec['name']} -> {', '.join(sec['domains'])} "
                  f"({sec['source']} {sec[sec['source']]}: {sec['status']})")
        if e["dlp"] != "block":
            print(f"  dlp:     {e['dlp']}")
        if e["proxy_workers"] != 1:
            print(f"  proxy workers: {e['proxy_workers']}")
        if args.plan:
            p = e["plan"]
            print(f"  netns {p['netns']}, veth {p['veth_host']} <-> {p['veth_jail']}")
            for k in ("v4", "v6"):
                if p.get(k):
                    print(f"  {k}: host {p[k]['host']}, jail {p[k]['jail']} ({p[k]['subnet']})")
            print(f"  upstream DNS: {', '.join(p['dns_servers'])}")
            print("  proxy options:")
            for k, v in p["proxy"]["mitmproxy"].items():
                print(f"    {k} = {v}")
            for where in ("jail", "host"):
                for rs in p["rules"][where]:
                    print(f"  rules ({where}, IPv{rs['family']}):")
                    for line in rs["lines"]:
                        print(f"    {line}")
    return 0


def _secrets_checked(ag) -> list[dict]:
    """The agent's secrets, each source read and checked as at start (as root; a bad one
    is a ConfigError with file:line:key), the values never shown."""
    from . import secretsource

    if not ag.secrets:
        return []
    status = "not read: run check as root"
    if os.geteuid() == 0:
        secretsource.load(ag.secrets)
        status = "ok"
    return [{**s.to_dict(), "status": status} for s in ag.secrets]


def _plan(cfg, ag) -> dict:
    """What a start would do, computed without touching anything."""
    from . import inbound, netns, plan, rules
    from .instance import Instance, ProxyUser

    inst = Instance.__new__(Instance)
    inst.cfg, inst.agent, inst.names = cfg, ag, plan.Names.of(ag.name)
    try:
        inst.proxy_user = ProxyUser.lookup(cfg.proxy.user)
    except PanopticonError:
        inst.proxy_user = ProxyUser(cfg.proxy.user, 999, 999)  # shown as a placeholder
    inst.ipv6 = cfg.network.ipv6
    try:
        used = netns.host_networks()
    except Exception:
        used = []
    inst.addressing = plan.choose_addressing(
        inst.names.tag, str(cfg.network.ipv4_pool),
        str(cfg.network.ipv6_pool) if cfg.network.ipv6 else None, used)
    try:
        dns = Instance.dns_servers(inst)
    except PanopticonError as e:
        dns = [f"(error: {e})"]
    good_dns = [d for d in dns if not d.startswith("(")]
    jail, host = Instance.rulesets(inst, good_dns)
    from . import ca, logread
    from .proxy import ProxySpec

    spec = ProxySpec(
        names=inst.names, uid=inst.proxy_user.uid, gid=inst.proxy_user.gid,
        confdir=ca.confdir_for(inst.names, ag.ca), policy_path=f"{inst.names.run_dir}/policy.json",
        log_path=f"{inst.names.log_dir}/requests.jsonl", dns_servers=tuple(good_dns),
        ipv6=cfg.network.ipv6, upstream_ca=cfg.network.upstream_ca or None,
        log_max_bytes=ag.log_max_bytes, log_keep=ag.log_keep,
        log_status=logread.status_path(inst.names.run_dir),
        inbound_modes=tuple(inbound.proxy_modes(inbound.plan(ag.inbound, ipv6=cfg.network.ipv6))),
        inbound_path=f"{inst.names.run_dir}/inbound.json" if ag.inbound else "",
        workers=ag.proxy_workers,
        pins_socket=f"{inst.names.run_dir}/pins/pins.sock" if ag.proxy_workers > 1 else "",
    )
    a = inst.addressing
    out = {
        "netns": inst.names.netns, "veth_host": inst.names.veth_host,
        "veth_jail": inst.names.veth_jail,
        "v4": {"subnet": str(a.v4_subnet), "host": str(a.v4_host), "jail": str(a.v4_jail)},
        "v6": ({"subnet": str(a.v6_subnet), "host": str(a.v6_host), "jail": str(a.v6_jail)}
               if a.v6_subnet else None),
        "dns_servers": dns,
        "proxy_user": inst.proxy_user.name,
        "proxy": spec.options(),
        "ca_mode": ag.ca.mode,
        "rules": {
            "jail": [{"family": rs.family, "lines": rs.describe()} for rs in jail],
            "host": [{"family": rs.family, "lines": rs.describe()} for rs in host],
        },
    }
    del rules
    return out


# -- cleanup ------------------------------------------------------------------------

def cmd_cleanup(args: argparse.Namespace) -> int:
    from .instance import cleanup

    _require_root()
    for name in args.names:
        removed = cleanup(name, force=args.force)
        if removed:
            print(f"panopticon: {name}: removed {', '.join(removed)}", file=sys.stderr)
        elif args.verbose:
            print(f"panopticon: {name}: nothing to remove", file=sys.stderr)
    return 0


# -- policy test --------------------------------------------------------------------

def cmd_policy_test(args: argparse.Namespace) -> int:
    from urllib.parse import urlsplit

    from . import config

    cfg = _load_config(args.config, required=args.config is not None)
    ag = config.agent_config(cfg, args.agent, mode=args.mode)
    if len(args.target) == 2:
        method, url = args.target
    elif len(args.target) == 1:
        method, url = "GET", args.target[0]
    else:
        raise PanopticonError("usage: panopticon policy test [METHOD] URL", status=ExitStatus.USAGE)
    if "://" not in url:
        url = "https://" + url
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as e:
        raise PanopticonError(f"not a URL: {url!r} ({e})", status=ExitStatus.USAGE) from None
    if not parts.hostname:
        raise PanopticonError(f"no host in {url!r}", status=ExitStatus.USAGE)
    method = method.upper()
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    d = config.policy_of(ag).decide(parts.hostname, method, target)
    verdict = "ALLOW" if d.allowed else "DENY"
    if d.would is not None and d.would.allowed != d.allowed:
        verdict += f" (discover mode; enforce would {d.would_action.upper()})"
    rule = d.rule or "(default deny)"
    print(f"{verdict} {method} {url}\n  rule: {rule}\n  why:  {d.reason}")
    if any(r.paths is not None for r in ag.rules):
        from .paths import RequestPath

        shown = RequestPath.of(target).path
        print(f"  path: {shown if shown is not None else '(invalid or ambiguous)'}")
    return 0 if d.allowed else 1


# -- demo -------------------------------------------------------------------------

def cmd_demo(args: argparse.Namespace) -> int:
    from . import demo

    _require_root()
    return demo.main(verbose=args.verbose)


# -- parser -------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """argparse exits 2 on wrong usage; ours is 64 (EX_USAGE), 2 meaning an error."""

    def error(self, message: str):  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(int(ExitStatus.USAGE), f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="panopticon",
        description="Jail the network of an AI agent behind a policy-enforcing proxy.",
    )
    p.add_argument("--version", action="version", version=f"panopticon {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    def common(sp, config=True):
        if config:
            sp.add_argument("--config", metavar="FILE",
                            help=f"config file (default {DEFAULT_CONFIG})")
        sp.add_argument("-v", "--verbose", action="count", default=0)

    r = sub.add_parser("run", help="run a command in a fresh jail",
                       usage="panopticon run [OPTIONS] -- CMD [ARGS...]")
    common(r)
    r.add_argument("--agent", metavar="NAME", help="use [agents.NAME] of the config")
    r.add_argument("--allow", action="append", default=[], metavar="HOST",
                   help="also allow HOST (exact, or *.domain for it and its subdomains)")
    r.add_argument("--deny", action="append", default=[], metavar="HOST")
    r.add_argument("--mode", choices=("enforce", "discover"),
                   help="discover: allow everything, log what enforce would decide")
    r.add_argument("--user", metavar="USER", help="run CMD as USER (default: the sudo caller)")
    r.add_argument("--log", metavar="FILE", help="request log (JSON lines)")
    r.add_argument("--env", action="append", default=[], metavar="NAME[=VALUE]",
                   help="pass a variable to CMD")
    r.add_argument("--no-helper", action="store_true",
                   help="start the jail in this process even if the resident helper runs "
                   "(also: PANOPTICON_HELPER=off)")
    r.add_argument("command", nargs=argparse.REMAINDER)
    r.set_defaults(func=cmd_run)

    c = sub.add_parser("check", help="validate the config and print the effective policy")
    common(c)
    c.add_argument("--agent", metavar="NAME")
    c.add_argument("--plan", action="store_true",
                   help="also show what a start would do (addresses, rules, proxy options)")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_check)

    cl = sub.add_parser("cleanup", help="remove what a killed run left behind")
    common(cl, config=False)
    cl.add_argument("--force", action="store_true", help="even if its owner still runs")
    cl.add_argument("names", nargs="+", metavar="NAME")
    cl.set_defaults(func=cmd_cleanup)

    po = sub.add_parser("policy", help="policy tools")
    posub = po.add_subparsers(dest="policy_cmd", required=True, metavar="COMMAND")
    pt = posub.add_parser("test", help="would this request be allowed? (no root, no jail)")
    common(pt)
    pt.add_argument("--agent", metavar="NAME")
    pt.add_argument("--mode", choices=("enforce", "discover"),
                    help="judge in this mode instead of the configured one")
    pt.add_argument("target", nargs="+", metavar="[METHOD] URL")
    pt.set_defaults(func=cmd_policy_test)

    from .logargs import add_parsers as add_log_parsers

    add_log_parsers(sub, posub, common)

    h = sub.add_parser("helper", help="the resident helper that makes `run` start fast "
                       "(normally socket-activated: panopticon-helper.socket)")
    common(h, config=False)
    h.add_argument("--socket", metavar="PATH",
                   help="listen here (default /run/panopticon/helper.sock; "
                   "clients find it there, or at $PANOPTICON_HELPER)")
    h.set_defaults(func=cmd_helper)

    d = sub.add_parser("demo", help="the jail against a built-in simulated internet")
    common(d, config=False)
    d.set_defaults(func=cmd_demo)
    return p


def cmd_helper(args: argparse.Namespace) -> int:
    from . import helper

    return helper.serve(args.socket)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(getattr(args, "verbose", 0))
    try:
        return int(args.func(args) or 0)
    except PanopticonError as e:
        if args.debug:
            raise
        print(f"panopticon: error: {e.message}", file=sys.stderr)
        if e.hint:
            print(f"panopticon: hint: {e.hint}", file=sys.stderr)
        return int(e.status)
    except KeyboardInterrupt:
        return int(ExitStatus.INTERRUPTED)


def daemon_main(argv: Sequence[str] | None = None) -> int:
    """`panopticond NAME`: the supervised jail of [agents.NAME] (daemon.py)."""
    from .daemon import main as daemon

    return daemon(argv)


if __name__ == "__main__":
    sys.exit(main())
