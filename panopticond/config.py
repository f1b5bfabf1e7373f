"""The operator's config: TOML in, frozen dataclasses out, or one `ConfigError`.

Pure: reading the file is the only I/O, and nothing on the host is looked at or touched,
so `panopticon check` and the daemon run exactly the same validation before any side
effect. The loader is strict: an unknown key, a wrong type or a bad host pattern is an
error that names the file, the line and the dotted key, e.g.

    /etc/panopticon/config.toml:7: agents.bot.allow[1]: '*.*.com': '*' may only ...

An empty file is valid and means "no agents, and the ad-hoc agent may reach nothing".

Schema (built-in defaults in parentheses)::

    [defaults]                 # every agent starts from these
    allow = [...]              # host patterns, or method/path rules ([]):
                               #   { host = "api.x", methods = ["GET"], paths = ["/a/*"] }
                               #   { host = "github.com", port = 22 }: raw TCP (destinations.py)
    deny = [...]               # host patterns, win over allow ([])
    allow_cidrs = [...]        # addresses reachable by IP literal, even private ones ([])
    passthrough = [...]        # host patterns whose TLS is relayed undecrypted ([])
    headers = { "host pattern" = { "X-Name" = "value" } }   # set on allowed requests ({})
    addons = ["/abs/addon.py"] # operator mitmproxy addons, root-owned ([])
    mode = "enforce" | "discover"   # discover: allow all, log what enforce would do ("enforce")
    user = "name"              # user the agent runs as (none: the CLI decides)
    ca = "persistent" | "ephemeral" | { cert = "/abs", key = "/abs" }   ("persistent")
    log_max_bytes = N          # rotate the request log past N bytes; 0: never (64 MiB)
    log_keep = N               # rotated request logs kept, 1-1000 (7)
    proxy_workers = N          # proxy processes sharing the agent's connections, 1-8 (1)
    dlp = "block" | "log"      # credential shapes in requests ("block"); secretconfig.py
    [defaults.dlp_patterns]    # name = "regex" adds a DLP rule, name = "" drops a built-in
    [defaults.secrets.NAME]    # domains, file|env|credential, placeholder, env_name, ...
    [network]
    ipv4_pool = "10.231.0.0/16"          # one /29 per instance is carved from it
    ipv6_pool = "fd7a:7c1d:5e2b::/48"    # one /64 per instance
    ipv6 = true                          # false: the agent gets no IPv6 at all
    dns_servers = []                     # the proxy's upstream resolvers ([] = the host's)
    upstream_ca = ""                     # extra CA bundle the proxy trusts upstream
    [proxy]
    user = "panopticon-proxy"
    [webhook]                  # optional: alerts, POSTed by the daemon from the host
    url = "https://..."        # http or https
    events = ["block", "tripwire", "health"]   (all three)
    secret_file = "/abs"       # optional: key of an HMAC-SHA256 signature header
    [agents.NAME]              # NAME: [a-z0-9][a-z0-9_-]{0,31}
    command = ["argv0", ...]
    user = "name"              # replaces defaults.user
    allow = [...]              # added to defaults.allow
    deny = [...]               # added to defaults.deny
    allow_cidrs, passthrough   # added to the defaults'
    headers, addons            # added to the defaults' (an agent's header wins)
    mode                       # replaces defaults.mode
    ca = ...                   # replaces defaults.ca
    log_max_bytes, log_keep    # replace the defaults'
    proxy_workers              # replaces the defaults'
    health = "127.0.0.1:9180"  # panopticond's /healthz: loopback, one port per agent (none)
    dlp, dlp_patterns, secrets # replace, merge over, and add to the defaults' (by name)
    [agents.NAME.inbound.ROUTE]  # a way in to the agent's own service (inbound.py)
    listen = "*:443"  to = 8443  allow_from = [...]  tls  websocket  block_patterns

tomllib reports no positions for values, so errors are located afterwards by `_Locator`,
a small scanner over the (already valid) TOML text; it is consulted only on failure, so
a weakness in it can cost an error its line number, never a valid config.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import difflib
import ipaddress
import json
import re
import types
from collections.abc import Iterable, Mapping
from typing import Any, Literal, NoReturn

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib  # type: ignore[no-redef, import-not-found]

from panopticond import destconfig, destinations, inbound, secretconfig
from panopticond.errors import ConfigError
from panopticond.policy import (
    MODES,
    HeaderRule,
    HostPattern,
    Policy,
    RequestRule,
    header_problem,
)

DEFAULT_PATH = "/etc/panopticon/config.toml"
ADHOC_NAME = "run"  # the agent of `panopticon run` without --agent

DEFAULT_IPV4_POOL = ipaddress.IPv4Network("10.231.0.0/16")
DEFAULT_IPV6_POOL = ipaddress.IPv6Network("fd7a:7c1d:5e2b::/48")
DEFAULT_PROXY_USER = "panopticon-proxy"
INSTANCE_V4_PREFIX = 29
INSTANCE_V6_PREFIX = 64

# A pool outside these would shadow real hosts on the internet for the host itself.
_V4_POOL_RANGES = tuple(
    ipaddress.IPv4Network(n)
    for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10")
)
_V6_POOL_RANGE = ipaddress.IPv6Network("fc00::/7")

_AGENT_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
_USER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9._-]{0,31}")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_SCALAR = re.compile(r"[^,\]}\n#]*")  # numbers, booleans, dates (which may hold a space)

_TOP_KEYS = ("defaults", "network", "proxy", "agents", "webhook")
_DEFAULTS_KEYS = ("allow", "deny", "user", "ca", "log_max_bytes", "log_keep", "headers",
                  "addons", "mode", "proxy_workers", *secretconfig.KEYS, *destconfig.KEYS)
_NETWORK_KEYS = ("ipv4_pool", "ipv6_pool", "ipv6", "dns_servers", "upstream_ca")
_PROXY_KEYS = ("user",)
_AGENT_KEYS = ("command", "user", "allow", "deny", "ca", "log_max_bytes", "log_keep", "health",
               "headers", "addons", "mode", "inbound", "proxy_workers", *secretconfig.KEYS,
               *destconfig.KEYS)
_CA_MODES = ("persistent", "ephemeral")
_WEBHOOK_KEYS = ("url", "events", "secret_file")
WEBHOOK_EVENTS = ("block", "tripwire", "health")

DEFAULT_LOG_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_LOG_KEEP = 7
MIN_LOG_MAX_BYTES = 1024  # below, a unit was forgotten ("50" meant megabytes)
MAX_LOG_KEEP = 1000
# Each worker is a whole mitmproxy (~75 MB) and saturates one core; past the cores the
# machine has, more only cost memory. A fixed bound: the loader looks at nothing on the host.
MAX_PROXY_WORKERS = 8

Path = tuple[str | int, ...]


# --- the result --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CASpec:
    """Which CA the instance's proxy signs with.

    persistent: generated once and kept in the instance's state directory;
    ephemeral: a fresh one per start; custom: the operator's `cert` and `key` files.
    """

    mode: Literal["persistent", "ephemeral", "custom"] = "persistent"
    cert: str | None = None
    key: str | None = None


@dataclasses.dataclass(frozen=True)
class NetworkConfig:
    ipv4_pool: ipaddress.IPv4Network = DEFAULT_IPV4_POOL
    ipv6_pool: ipaddress.IPv6Network = DEFAULT_IPV6_POOL
    ipv6: bool = True
    dns_servers: tuple[str, ...] = ()  # canonical IP literals; () = the host's own
    upstream_ca: str = ""  # absolute path or ""


@dataclasses.dataclass(frozen=True)
class ProxyConfig:
    user: str = DEFAULT_PROXY_USER


@dataclasses.dataclass(frozen=True)
class AgentConfig:
    """An agent's EFFECTIVE settings: [defaults] already merged in.

    `allow` and `deny` hold canonical patterns (`str(HostPattern)`), first occurrence
    kept; `command` is empty when the config gives none; `user` None means the config
    names no user and the caller must choose (or refuse).
    """

    name: str
    command: tuple[str, ...] = ()
    user: str | None = None
    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    ca: CASpec = CASpec()
    log_max_bytes: int = DEFAULT_LOG_MAX_BYTES  # 0: never rotate
    log_keep: int = DEFAULT_LOG_KEEP
    proxy_workers: int = 1  # mitmproxy processes behind the one REDIRECT (instance.py)
    health: tuple[str, int] | None = None  # (loopback address, port) of panopticond's /healthz
    rules: tuple[RequestRule, ...] = ()  # the method/path tables of `allow`
    headers: tuple[HeaderRule, ...] = ()  # in order; a later one wins for the same header
    addons: tuple[str, ...] = ()  # absolute paths of operator addon scripts
    mode: str = "enforce"
    inbound: tuple[inbound.Route, ...] = ()  # [agents.NAME.inbound.*] only, never [defaults]
    # secretconfig.py: where each secret's value comes from (never the value), DLP.
    secrets: tuple[secretconfig.SecretSpec, ...] = ()
    dlp: str = "block"
    dlp_patterns: tuple[tuple[str, str], ...] = ()  # (name, regex); "" switches a built-in off
    # destconfig.py: canonical CIDRs, passthrough patterns, (host pattern, port) rules.
    allow_cidrs: tuple[str, ...] = ()
    passthrough: tuple[str, ...] = ()
    ports: tuple[tuple[str, int], ...] = ()


@dataclasses.dataclass(frozen=True)
class WebhookConfig:
    """Where the daemon POSTs alerts; `secret_file` holds the HMAC key (read at start)."""

    url: str
    events: tuple[str, ...] = WEBHOOK_EVENTS
    secret_file: str | None = None


@dataclasses.dataclass(frozen=True)
class Config:
    path: str
    network: NetworkConfig
    proxy: ProxyConfig
    defaults: AgentConfig  # named ADHOC_NAME: it is what `panopticon run` gets
    agents: Mapping[str, AgentConfig]  # read-only, in file order
    webhook: WebhookConfig | None = None


# --- public functions --------------------------------------------------------------------


def load(path: str = DEFAULT_PATH) -> Config:
    """Read and validate the config at `path`; ConfigError on any problem. No side effects."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(
            f"cannot read the config: {e.strerror or e}",
            file=path,
            hint=f"install the documented default (cp config/config.toml {DEFAULT_PATH}) "
            "or pass --config PATH",
        ) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            "the config is not valid UTF-8",
            file=path,
            line=data[: e.start].count(b"\n") + 1,
            hint="save the file as UTF-8",
        ) from None
    return loads(text, path)


def loads(text: str, path: str = "<config>") -> Config:
    """Validate TOML `text`; `path` only names the source in errors and `Config.path`."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        message, line = _toml_error(str(e), text)
        raise ConfigError(
            f"invalid TOML: {message}", file=path, line=line,
            hint="compare with the documented default, config/config.toml in panopticon's source",
        ) from None
    return _Checker(text, path).config(raw)


def agent_config(
    cfg: Config,
    name: str | None,
    *,
    allow: Iterable[str] = (),
    deny: Iterable[str] = (),
    user: str | None = None,
    mode: str | None = None,
) -> AgentConfig:
    """The effective config of agent `name`, or of the ad-hoc agent (`ADHOC_NAME`) if None.

    `allow`/`deny` (from --allow/--deny) are added after the config's own patterns and
    validated like them; `user` (from --user) and `mode` (--mode) replace the configured.
    """
    if name is None:
        base = cfg.defaults
    elif name in cfg.agents:
        base = cfg.agents[name]
    else:
        known = ", ".join(cfg.agents) or "none"
        raise ConfigError(
            f"no agent {name!r} in the config{_did_you_mean(name, cfg.agents)}; "
            f"known agents: {known}",
            file=cfg.path,
            hint=f"add an [agents.{name}] table, or run ad hoc without naming an agent",
        )
    extra_allow = _flag_patterns(allow, "--allow")
    extra_deny = _flag_patterns(deny, "--deny")
    if user is not None:
        problem = _user_problem(user, cfg.proxy.user)
        if problem:
            raise ConfigError(problem[0], key="--user", hint=problem[1])
    return dataclasses.replace(
        base,
        allow=_dedupe(base.allow + extra_allow),
        deny=_dedupe(base.deny + extra_deny),
        user=user if user is not None else base.user,
        mode=_flag_mode(mode) if mode is not None else base.mode,
    )


def policy_of(agent: AgentConfig, instance: str | None = None, hint: str = "") -> Policy:
    """The policy `agent` is judged by (what the proxy gets, compiled), named `instance`."""
    return Policy.build(instance or agent.name, agent.allow, agent.deny, hint,
                        rules=agent.rules, mode=agent.mode, headers=agent.headers,
                        destinations=destinations.of_agent(agent))


def allow_hint(cfg: Config, agent: AgentConfig) -> str:
    """Where an operator adds a host so that `agent` may reach it (for 403 pages and summaries).

    The agent reads this too: it names the config key, never the file (nothing about the
    host machine goes into a page the agent sees)."""
    if agent.name in cfg.agents:
        return f"allow of [agents.{agent.name}] in the config"
    return "allow of [defaults] in the config (or pass --allow HOST)"


def to_dict(cfg: Config) -> dict[str, Any]:
    """A JSON-able view for `panopticon check --json`. Holds no secret values."""

    def agent(a: AgentConfig) -> dict[str, Any]:
        return {
            "name": a.name,
            "command": list(a.command),
            "user": a.user,
            "allow": list(a.allow),
            "deny": list(a.deny),
            "ca": {"mode": a.ca.mode, "cert": a.ca.cert, "key": a.ca.key},
            "rules": [r.to_dict() for r in a.rules],
            # Names only: a header's value may be a credential.
            "headers": [{"host": str(h.host), "names": [n for n, _ in h.headers]}
                        for h in a.headers],
            "addons": list(a.addons),
            "mode": a.mode,
            "log_max_bytes": a.log_max_bytes,
            "log_keep": a.log_keep,
            "proxy_workers": a.proxy_workers,
            "health": f"{_host_port(*a.health)}" if a.health else None,
            "inbound": {r.name: r.to_dict() for r in a.inbound},
            "secrets": {s.name: s.to_dict() for s in a.secrets},  # sources, never values
            "dlp": a.dlp,
            "dlp_patterns": dict(a.dlp_patterns),
            "allow_cidrs": list(a.allow_cidrs),
            "passthrough": list(a.passthrough),
            "ports": [{"host": h, "port": port} for h, port in a.ports],
        }

    n = cfg.network
    return {
        "path": cfg.path,
        "network": {
            "ipv4_pool": str(n.ipv4_pool),
            "ipv6_pool": str(n.ipv6_pool),
            "ipv6": n.ipv6,
            "dns_servers": list(n.dns_servers),
            "upstream_ca": n.upstream_ca,
        },
        "proxy": {"user": cfg.proxy.user},
        "webhook": None if cfg.webhook is None else {
            "url": cfg.webhook.url, "events": list(cfg.webhook.events),
            "secret_file": cfg.webhook.secret_file,
        },
        "defaults": agent(cfg.defaults),
        "agents": {name: agent(a) for name, a in cfg.agents.items()},
    }


# --- validation --------------------------------------------------------------------------


class _Checker:
    """Turns tomllib's dict into a Config; the first problem raises, located by path."""

    def __init__(self, text: str, file: str):
        self.text = text
        self.file = file
        self._locator: _Locator | None = None

    def line(self, path: Path) -> int | None:
        """The line of `path` (for errors found later, when a secret is read)."""
        if self._locator is None:
            self._locator = _Locator(self.text)
        return self._locator.line(path)

    def fail(self, path: Path, message: str, hint: str | None = None) -> NoReturn:
        if self._locator is None:
            self._locator = _Locator(self.text)
        raise ConfigError(
            message, file=self.file, line=self._locator.line(path), key=dotted_key(path) or None,
            hint=hint,
        )

    # -- sections

    def config(self, raw: dict[str, Any]) -> Config:
        self.table(raw, (), _TOP_KEYS)
        proxy = self.proxy(raw.get("proxy", {}))
        network = self.network(raw.get("network", {}))
        defaults = self.defaults(raw.get("defaults", {}), proxy.user)
        agents_raw = self.table(raw.get("agents", {}), ("agents",), None)
        agents: dict[str, AgentConfig] = {}
        for name, value in agents_raw.items():
            agents[name] = self.agent(name, value, defaults, proxy.user)
        self.distinct_health(agents)
        self.inbound_routes(agents, network.ipv6)
        return Config(
            path=self.file,
            network=network,
            proxy=proxy,
            defaults=defaults,
            agents=types.MappingProxyType(agents),
            webhook=self.webhook(raw["webhook"]) if "webhook" in raw else None,
        )

    def proxy(self, raw: Any) -> ProxyConfig:
        t = self.table(raw, ("proxy",), _PROXY_KEYS)
        user = DEFAULT_PROXY_USER
        if "user" in t:
            user = self.user(t["user"], ("proxy", "user"), proxy_user=None)
        return ProxyConfig(user=user)

    def network(self, raw: Any) -> NetworkConfig:
        t = self.table(raw, ("network",), _NETWORK_KEYS)
        kw: dict[str, Any] = {}
        if "ipv4_pool" in t:
            kw["ipv4_pool"] = self.pool(t["ipv4_pool"], ("network", "ipv4_pool"), 4)
        if "ipv6_pool" in t:
            kw["ipv6_pool"] = self.pool(t["ipv6_pool"], ("network", "ipv6_pool"), 6)
        if "ipv6" in t:
            kw["ipv6"] = self.boolean(t["ipv6"], ("network", "ipv6"))
        if "dns_servers" in t:
            kw["dns_servers"] = self.dns_servers(t["dns_servers"], ("network", "dns_servers"))
        if "upstream_ca" in t:
            path = ("network", "upstream_ca")
            value = self.string(t["upstream_ca"], path)
            kw["upstream_ca"] = self.abspath(value, path) if value else ""
        return NetworkConfig(**kw)

    def defaults(self, raw: Any, proxy_user: str) -> AgentConfig:
        p: Path = ("defaults",)
        t = self.table(raw, p, _DEFAULTS_KEYS)
        return AgentConfig(
            name=ADHOC_NAME,
            user=self.user(t["user"], (*p, "user"), proxy_user) if "user" in t else None,
            allow=self.patterns(t.get("allow", []), (*p, "allow"), tables=True),
            rules=self.rules(t.get("allow", []), (*p, "allow")),
            headers=self.headers(t.get("headers", {}), (*p, "headers")),
            addons=self.addon_paths(t.get("addons", []), (*p, "addons")),
            mode=self.mode(t["mode"], (*p, "mode")) if "mode" in t else "enforce",
            deny=self.patterns(t.get("deny", []), (*p, "deny")),
            ca=self.ca(t["ca"], (*p, "ca")) if "ca" in t else CASpec(),
            **self.log_settings(t, p, AgentConfig(name=ADHOC_NAME)),
            **secretconfig.agent_fields(self, t, p),
            **destconfig.agent_fields(self, t, p),
        )

    def agent(self, name: str, raw: Any, defaults: AgentConfig, proxy_user: str) -> AgentConfig:
        p: Path = ("agents", name)
        if not _AGENT_NAME.fullmatch(name):
            self.fail(
                p, f"invalid agent name {name!r}",
                hint="an agent name is 1-32 characters of a-z, 0-9, '_' and '-', "
                "starting with a letter or digit",
            )
        if name == ADHOC_NAME:
            self.fail(
                p, f"the agent name {ADHOC_NAME!r} is reserved for ad-hoc `panopticon run`",
                hint="choose another name; ad-hoc runs take their settings from [defaults]",
            )
        t = self.table(raw, p, _AGENT_KEYS)
        return AgentConfig(
            name=name,
            command=self.command(t["command"], (*p, "command")) if "command" in t else (),
            user=self.user(t["user"], (*p, "user"), proxy_user) if "user" in t else defaults.user,
            allow=_dedupe(defaults.allow + self.patterns(t.get("allow", []), (*p, "allow"),
                                                         tables=True)),
            rules=_dedupe(defaults.rules + self.rules(t.get("allow", []), (*p, "allow"))),
            headers=defaults.headers + self.headers(t.get("headers", {}), (*p, "headers")),
            addons=_dedupe(defaults.addons
                           + self.addon_paths(t.get("addons", []), (*p, "addons"))),
            mode=self.mode(t["mode"], (*p, "mode")) if "mode" in t else defaults.mode,
            deny=_dedupe(defaults.deny + self.patterns(t.get("deny", []), (*p, "deny"))),
            ca=self.ca(t["ca"], (*p, "ca")) if "ca" in t else defaults.ca,
            **self.log_settings(t, p, defaults),
            health=self.health(t["health"], (*p, "health")) if "health" in t else None,
            inbound=inbound.parse_routes(self, t.get("inbound", {}), (*p, "inbound")),
            **secretconfig.agent_fields(self, t, p, defaults),
            **destconfig.agent_fields(self, t, p, defaults),
        )

    def inbound_routes(self, agents: Mapping[str, AgentConfig], ipv6: bool) -> None:
        routes = [(("agents", a.name, "inbound", r.name, "listen"), r)
                  for a in agents.values() for r in a.inbound]
        inbound.check_overlaps(self, routes)
        for path, r in routes:
            inbound.check_ipv6(self, path, r, ipv6)

    def distinct_health(self, agents: Mapping[str, AgentConfig]) -> None:
        seen: dict[tuple[str, int], str] = {}
        for name, a in agents.items():
            if a.health is None:
                continue
            if a.health in seen:
                self.fail(
                    ("agents", name, "health"),
                    f"{_host_port(*a.health)} is already the health address of agent "
                    f"{seen[a.health]!r}",
                    hint="give each agent a port of its own",
                )
            seen[a.health] = name

    def log_settings(self, t: dict[str, Any], p: Path, base: AgentConfig) -> dict[str, int]:
        """The agent's integer settings (the request log's rotation, the proxy workers)."""
        return {
            "proxy_workers": self.integer(
                t["proxy_workers"], (*p, "proxy_workers"), 1, MAX_PROXY_WORKERS,
                hint="how many proxy processes share the agent's connections; at most "
                "the number of CPU cores is useful",
            ) if "proxy_workers" in t else base.proxy_workers,
            "log_max_bytes": self.integer(
                t["log_max_bytes"], (*p, "log_max_bytes"), MIN_LOG_MAX_BYTES, None, zero=True,
                hint="the request log's size in bytes before it is rotated, e.g. "
                "67108864 (64 MiB); 0 never rotates",
            ) if "log_max_bytes" in t else base.log_max_bytes,
            "log_keep": self.integer(
                t["log_keep"], (*p, "log_keep"), 1, MAX_LOG_KEEP,
                hint="how many rotated request logs to keep",
            ) if "log_keep" in t else base.log_keep,
        }

    def webhook(self, raw: Any) -> WebhookConfig:
        p: Path = ("webhook",)
        t = self.table(raw, p, _WEBHOOK_KEYS)
        if "url" not in t:
            self.fail(p, "the webhook has no 'url'", hint='url = "https://alerts.example/hook"')
        url = self.string(t["url"], (*p, "url"))
        if not re.fullmatch(r"(https?)://[^/?#@\s]+(?:[/?][^\s]*)?", url):
            self.fail(
                (*p, "url"), "not an http:// or https:// URL (without user:password@); "
                "the value is not repeated here: a webhook URL may be a credential",
                hint='url = "https://alerts.example/hook"; authenticate with secret_file',
            )
        events: tuple[str, ...] = WEBHOOK_EVENTS
        if "events" in t:
            items = self.array(t["events"], (*p, "events"))
            for i, e in enumerate(items):
                if self.string(e, (*p, "events", i)) not in WEBHOOK_EVENTS:
                    self.fail(
                        (*p, "events", i),
                        f"unknown event {e!r}{_did_you_mean(e, WEBHOOK_EVENTS)}",
                        hint=f"events are {', '.join(WEBHOOK_EVENTS)}",
                    )
            events = _dedupe(tuple(items))
        secret_file = None
        if "secret_file" in t:
            path = (*p, "secret_file")
            secret_file = self.abspath(self.string(t["secret_file"], path), path)
        return WebhookConfig(url=url, events=events, secret_file=secret_file)

    # -- value kinds

    def integer(
        self, value: Any, path: Path, low: int, high: int | None, *, zero: bool = False,
        hint: str | None = None,
    ) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(path, f"expected an integer, got {_describe(value)}", hint=hint)
        if not (zero and value == 0) and (value < low or (high is not None and value > high)):
            bounds = f"at least {low}" if high is None else f"between {low} and {high}"
            self.fail(path, f"{value} is out of range: it must be {bounds}"
                      + (" (or 0)" if zero else ""), hint=hint)
        return value


    def table(self, value: Any, path: Path, known: tuple[str, ...] | None) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.fail(path, f"expected a table, got {_describe(value)}")
        if known is not None:
            for key in value:
                if key not in known:
                    where = f"in [{dotted_key(path)}]" if path else "at the top level"
                    self.fail(
                        (*path, key),
                        f"unknown key {key!r} {where}{_did_you_mean(key, known)}",
                        hint=f"valid keys there: {', '.join(known)}",
                    )
        return value

    def string(self, value: Any, path: Path) -> str:
        if not isinstance(value, str):
            self.fail(path, f"expected a string, got {_describe(value)}")
        if "\0" in value:
            self.fail(path, "a NUL character is not allowed here")
        return value

    def boolean(self, value: Any, path: Path) -> bool:
        if not isinstance(value, bool):
            self.fail(path, f"expected true or false, got {_describe(value)}")
        return value

    def array(self, value: Any, path: Path) -> list[Any]:
        if not isinstance(value, list):
            self.fail(path, f"expected an array, got {_describe(value)}")
        return value

    def abspath(self, value: str, path: Path) -> str:
        if not value.startswith("/"):
            self.fail(
                path, f"{value!r} is not an absolute path",
                hint="the daemon does not run in your working directory: give the full path",
            )
        return value

    def patterns(self, value: Any, path: Path, tables: bool = False) -> tuple[str, ...]:
        """The host patterns of an array; with `tables`, its tables are left to rules()."""
        out = []
        for i, item in enumerate(self.array(value, path)):
            if tables and isinstance(item, dict):
                continue
            text = self.string(item, (*path, i))
            try:
                pattern = HostPattern.parse(text)
            except ValueError as e:
                self.fail((*path, i), str(e), hint=_PATTERN_HINT)
            self.scope(pattern, path, (*path, i))
            out.append(str(pattern))
        return _dedupe(tuple(out))

    def scope(self, pattern: HostPattern, array: Path, path: Path) -> None:
        """Refuse an allowing wildcard over a public suffix or a platform (deny may)."""
        problem = None if array[-1] == "deny" else destconfig.scope_problem(pattern)
        if problem:
            self.fail(path, problem, hint=destconfig.SCOPE_HINT)

    def rules(self, value: Any, path: Path) -> tuple[RequestRule, ...]:
        """The method/path tables of an allow array (its strings are patterns())."""
        out = []
        for i, item in enumerate(self.array(value, path)):
            if not isinstance(item, dict) or destconfig.is_port_rule(item):
                continue
            p = (*path, i)
            t = self.table(item, p, _RULE_KEYS)
            if "host" not in t:
                self.fail(p, "a rule has no 'host'", hint=_RULE_HINT)
            host = self.string(t["host"], (*p, "host"))
            lists: dict[str, list[str] | None] = {}
            for k in ("methods", "paths"):
                if k not in t:
                    lists[k] = None
                    continue
                items = self.array(t[k], (*p, k))
                if not items:
                    self.fail((*p, k), f"'{k}' is empty, so the rule would allow nothing",
                              hint=f"leave '{k}' out to allow any")
                lists[k] = [self.string(x, (*p, k, j)) for j, x in enumerate(items)]
            try:
                self.scope(HostPattern.parse(host), path, (*p, "host"))
            except ValueError as e:
                self.fail((*p, "host"), str(e), hint=_PATTERN_HINT)
            for k in ("methods", "paths"):
                for j, x in enumerate(lists[k] or ()):
                    try:
                        RequestRule.parse(host, [x] if k == "methods" else None,
                                          [x] if k == "paths" else None)
                    except ValueError as e:
                        self.fail((*p, k, j), str(e), hint=_RULE_HINT)
            out.append(RequestRule.parse(host, lists["methods"], lists["paths"]))
        return _dedupe(tuple(out))

    def headers(self, value: Any, path: Path) -> tuple[HeaderRule, ...]:
        out = []
        for host, headers in self.table(value, path, None).items():
            p = (*path, host)
            try:
                HostPattern.parse(host)
            except ValueError as e:
                self.fail(p, str(e), hint=_PATTERN_HINT)
            t = self.table(headers, p, None)
            if not t:
                self.fail(p, "no headers given", hint=_HEADERS_HINT)
            for name, v in t.items():
                problem = header_problem(name, self.string(v, (*p, name)))
                if problem:
                    self.fail((*p, name), problem, hint=_HEADERS_HINT)
            out.append(HeaderRule.parse(host, t))
        return tuple(out)

    def addon_paths(self, value: Any, path: Path) -> tuple[str, ...]:
        out = []
        for i, item in enumerate(self.array(value, path)):
            p = (*path, i)
            text = self.abspath(self.string(item, p), p)
            if not text.endswith(".py"):
                self.fail(p, f"{text!r} is not a Python file (.py)", hint=_ADDONS_HINT)
            out.append(text)
        return _dedupe(tuple(out))

    def mode(self, value: Any, path: Path) -> str:
        text = self.string(value, path)
        if text not in MODES:
            self.fail(path, f"unknown mode {text!r}{_did_you_mean(text, MODES)}",
                      hint=_MODE_HINT)
        return text

    def command(self, value: Any, path: Path) -> tuple[str, ...]:
        items = self.array(value, path)
        if not items:
            self.fail(
                path, "the command is empty", hint='e.g. command = ["/usr/bin/agent", "--flag"]'
            )
        argv = tuple(self.string(item, (*path, i)) for i, item in enumerate(items))
        if not argv[0]:
            self.fail((*path, 0), "the program name is empty")
        return argv

    def user(self, value: Any, path: Path, proxy_user: str | None) -> str:
        name = self.string(value, path)
        problem = _user_problem(name, proxy_user)
        if problem:
            self.fail(path, problem[0], hint=problem[1])
        return name

    def ca(self, value: Any, path: Path) -> CASpec:
        if isinstance(value, str):
            if value in _CA_MODES:
                return CASpec(mode=value)  # type: ignore[arg-type]
            self.fail(
                path, f"unknown CA mode {value!r}{_did_you_mean(value, _CA_MODES)}",
                hint=_CA_HINT,
            )
        if not isinstance(value, dict):
            self.fail(path, f"expected a CA mode or a table, got {_describe(value)}", hint=_CA_HINT)
        t = self.table(value, path, ("cert", "key"))
        for k in ("cert", "key"):
            if k not in t:
                self.fail(path, f"the CA table has no {k!r}", hint=_CA_HINT)
        cert = self.abspath(self.string(t["cert"], (*path, "cert")), (*path, "cert"))
        key = self.abspath(self.string(t["key"], (*path, "key")), (*path, "key"))
        return CASpec(mode="custom", cert=cert, key=key)

    def pool(
        self, value: Any, path: Path, family: int
    ) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        text = self.string(value, path)
        try:
            net = ipaddress.ip_network(text)
        except ValueError as e:
            hint = None
            with contextlib.suppress(ValueError):
                hint = f"did you mean {str(ipaddress.ip_network(text, strict=False))!r}?"
            self.fail(path, f"{text!r} is not a network: {e}", hint=hint)
        if net.version != family:
            self.fail(path, f"{text!r} is not an IPv{family} network")
        if isinstance(net, ipaddress.IPv4Network):
            if not INSTANCE_V4_PREFIX >= net.prefixlen >= 8:
                self.fail(
                    path, f"{text!r}: the prefix must be between /8 and /{INSTANCE_V4_PREFIX}",
                    hint=f"each instance takes a /{INSTANCE_V4_PREFIX} from the pool",
                )
            if not any(net.subnet_of(r) for r in _V4_POOL_RANGES):
                self.fail(
                    path, f"{text!r} is not inside a private range",
                    hint="use part of 10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16 or "
                    "100.64.0.0/10 that nothing on this host uses",
                )
        else:
            if not INSTANCE_V6_PREFIX >= net.prefixlen >= 16:
                self.fail(
                    path, f"{text!r}: the prefix must be between /16 and /{INSTANCE_V6_PREFIX}",
                    hint=f"each instance takes a /{INSTANCE_V6_PREFIX} from the pool",
                )
            if not net.subnet_of(_V6_POOL_RANGE):
                self.fail(
                    path, f"{text!r} is not a unique local (fc00::/7) network",
                    hint="use a /48 from fd00::/8, e.g. the default fd7a:7c1d:5e2b::/48",
                )
        return net

    def health(self, value: Any, path: Path) -> tuple[str, int]:
        text = self.string(value, path)
        host, sep, port = text.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        try:
            ip = ipaddress.ip_address(host) if sep else None
        except ValueError:
            ip = None
        if ip is None or not port.isdigit() or not 0 < int(port) < 65536:
            self.fail(path, f"{text!r} is not ADDRESS:PORT",
                      hint='e.g. health = "127.0.0.1:9180" (or "[::1]:9180")')
        if not ip.is_loopback:
            # On loopback the jail cannot reach it (its own lo is another), nor can the LAN.
            self.fail(path, f"{text!r} is not a loopback address",
                      hint="use 127.0.0.1 or [::1]; put a reverse proxy in front to expose it")
        return (str(ip), int(port))

    def dns_servers(self, value: Any, path: Path) -> tuple[str, ...]:
        out = []
        for i, item in enumerate(self.array(value, path)):
            text = self.string(item, (*path, i))
            try:
                ip = ipaddress.ip_address(text)
            except ValueError:
                self.fail(
                    (*path, i), f"{text!r} is not an IP address",
                    hint="name servers are IP addresses without a port, e.g. \"9.9.9.9\"",
                )
            if ip.is_loopback or ip.is_link_local or ip.is_unspecified or ip.is_multicast:
                self.fail(
                    (*path, i), f"{text!r} cannot be reached from inside the jail",
                    hint="the proxy resolves from the instance's own network namespace, where "
                    "loopback is not the host's; leave dns_servers empty to use the host's "
                    "real upstream servers",
                )
            out.append(str(ip))
        return _dedupe(tuple(out))


_PATTERN_HINT = "a host pattern is a name ('api.example.com'), '*.example.com' or an IP address"
_RULE_KEYS = ("host", "methods", "paths")
_RULE_HINT = ('e.g. { host = "api.github.com", methods = ["GET"], paths = ["/repos/acme/*"] }; '
              "paths are written decoded, '*' matches anything, '/a/*' also matches '/a'")
_HEADERS_HINT = 'e.g. headers = { "api.example.com" = { "X-Org" = "acme" } }'
_ADDONS_HINT = 'e.g. addons = ["/etc/panopticon/addons/compliance.py"] (root-owned, not writable ' \
    "by others)"
_MODE_HINT = '"enforce" (the default) or "discover" (allow everything, log what enforce would do)'
_CA_HINT = 'ca = "persistent", "ephemeral" or { cert = "/path/ca.crt", key = "/path/ca.key" }'


def _user_problem(name: str, proxy_user: str | None) -> tuple[str, str] | None:
    """(message, hint) if `name` may not be used; `proxy_user` None checks the proxy user itself."""
    if not _USER_NAME.fullmatch(name):
        return f"{name!r} is not a valid user name", "give the name of a system user, e.g. 'agent'"
    if name == "root":
        # root in the instance's namespace may rewrite its firewall: no jail at all.
        return "'root' is not allowed here", "create an unprivileged system user for it"
    if proxy_user is not None and name == proxy_user:
        # The proxy's uid is exempt from the REDIRECT rules: an agent with it bypasses the proxy.
        return (
            f"an agent cannot run as the proxy user {proxy_user!r}",
            "give the agent its own user",
        )
    return None


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _flag_mode(mode: str) -> str:
    if mode not in MODES:
        raise ConfigError(f"unknown mode {mode!r}{_did_you_mean(mode, MODES)}", key="--mode",
                          hint=_MODE_HINT)
    return mode


def _flag_patterns(patterns: Iterable[str], flag: str) -> tuple[str, ...]:
    if isinstance(patterns, str):
        patterns = (patterns,)
    out = []
    for text in patterns:
        try:
            pattern = HostPattern.parse(text)
        except ValueError as e:
            raise ConfigError(str(e), key=flag, hint=_PATTERN_HINT) from None
        problem = destconfig.scope_problem(pattern) if flag != "--deny" else None
        if problem:
            raise ConfigError(problem, key=flag, hint=destconfig.SCOPE_HINT)
        out.append(str(pattern))
    return tuple(out)


def _dedupe(items: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _describe(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a float", str: "a string",
             list: "an array", dict: "a table"}
    name = names.get(type(value), "a date/time")
    if isinstance(value, str) and len(value) > 16:
        # A value in the wrong place may be a credential: errors reach the journal.
        return f"{name} ({json.dumps(value[:4] + '...')}, {len(value)} characters)"
    if isinstance(value, (bool, int, float, str)):
        return f"{name} ({json.dumps(value)})"
    return name


def dotted_key(path: Iterable[str | int]) -> str:
    """`("agents", "b c", "allow", 1)` -> `agents."b c".allow[1]`."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            text = part if _BARE_KEY.fullmatch(part) else json.dumps(part)
            out += f".{text}" if out else text
    return out


_TOML_POSITION = re.compile(r"\s*\(at (?:line (\d+), column (\d+)|end of document)\)$")


def _toml_error(message: str, text: str) -> tuple[str, int]:
    m = _TOML_POSITION.search(message)
    if not m:
        return message, 1
    bare = message[: m.start()]
    if m.group(1):
        return f"{bare} (column {m.group(2)})", int(m.group(1))
    return f"{bare} (at the end of the file)", max(1, len(text.splitlines()))


# --- locating keys in the text -----------------------------------------------------------


class _Locator:
    """Maps key paths (as tomllib nests them) to the line that defines them.

    Knows table headers (`[a."b c"]`, `[[a]]` without an index), `key = value` with dotted
    and quoted keys, keys inside inline tables, and elements of (multi-line) arrays, and
    skips strings and comments. It assumes the text already parsed as TOML; on anything it
    does not follow it stops and keeps what it found.
    """

    def __init__(self, text: str):
        self.s = text
        self.n = len(text)
        self._newlines = [i for i, c in enumerate(text) if c == "\n"]
        self.lines: dict[tuple[str | int, ...], int] = {}
        with contextlib.suppress(IndexError, ValueError, tomllib.TOMLDecodeError):
            self._document()

    def line(self, path: Iterable[str | int]) -> int | None:
        """The line of `path`, else of its nearest enclosing key or table found."""
        p = tuple(path)
        while p:
            if p in self.lines:
                return self.lines[p]
            p = p[:-1]
        return None

    def _line_at(self, i: int) -> int:
        return bisect.bisect_left(self._newlines, i) + 1

    def _record(self, base: Path, keys: list[str], line: int) -> None:
        for k in range(1, len(keys)):
            self.lines.setdefault((*base, *keys[:k]), line)
        self.lines[(*base, *keys)] = line

    def _document(self) -> None:
        s, i = self.s, 0
        table: Path = ()
        while True:
            i = self._skip(i, newlines=True)
            if i >= self.n:
                return
            if s[i] == "[":
                double = s.startswith("[[", i)
                start = i
                keys, i = self._key(i + (2 if double else 1))
                i = self._skip(i) + (2 if double else 1)
                table = tuple(keys)
                line = self._line_at(start)
                for k in range(1, len(keys)):
                    self.lines.setdefault(table[:k], line)
                if double:
                    self.lines.setdefault(table, line)
                else:
                    self.lines[table] = line
            else:
                i = self._keyval(i, table)

    def _keyval(self, i: int, base: Path) -> int:
        line = self._line_at(i)
        keys, i = self._key(i)
        i = self._skip(i)
        if self.s[i] != "=":
            raise ValueError("expected '='")
        self._record(base, keys, line)
        return self._value(self._skip(i + 1), (*base, *keys))

    def _key(self, i: int) -> tuple[list[str], int]:
        keys = []
        while True:
            i = self._skip(i)
            c = self.s[i]
            if c in "\"'":
                end = self._string_end(i)
                keys.append(tomllib.loads(self.s[i:end] + " = 0").popitem()[0])
                i = end
            else:
                m = _BARE_KEY.match(self.s, i)
                if not m:
                    raise ValueError("expected a key")
                keys.append(m.group())
                i = m.end()
            i = self._skip(i)
            if i < self.n and self.s[i] == ".":
                i += 1
                continue
            return keys, i

    def _value(self, i: int, path: Path) -> int:
        s = self.s
        c = s[i]
        if c in "\"'":
            return self._string_end(i)
        if c == "[":
            i, index = i + 1, 0
            while True:
                i = self._skip(i, newlines=True)
                if s[i] == "]":
                    return i + 1
                self.lines[(*path, index)] = self._line_at(i)
                i = self._skip(self._value(i, (*path, index)), newlines=True)
                index += 1
                if s[i] == ",":
                    i += 1
        if c == "{":
            i = i + 1
            while True:
                i = self._skip(i, newlines=True)
                if s[i] == "}":
                    return i + 1
                i = self._skip(self._keyval(i, path), newlines=True)
                if s[i] == ",":
                    i += 1
        m = _SCALAR.match(s, i)
        assert m is not None  # the pattern matches the empty string
        if m.end() == i:
            raise ValueError("expected a value")
        return m.end()

    def _string_end(self, i: int) -> int:
        """The index just after the string literal starting at `i`."""
        s = self.s
        q = s[i]
        if s.startswith(q * 3, i):
            j = i + 3
            while not s.startswith(q * 3, j):
                j += 2 if (q == '"' and s[j] == "\\") else 1
                if j >= self.n:
                    raise ValueError("unterminated string")
            j += 3
            # Up to two quotes may end the content right before the closing delimiter.
            for _ in range(2):
                if j < self.n and s[j] == q:
                    j += 1
            return j
        j = i + 1
        while s[j] != q:
            j += 2 if (q == '"' and s[j] == "\\") else 1
        return j + 1

    def _skip(self, i: int, newlines: bool = False) -> int:
        s = self.s
        space = " \t\r\n" if newlines else " \t"
        while i < self.n:
            if s[i] in space:
                i += 1
            elif s[i] == "#" and newlines:
                end = s.find("\n", i)
                i = self.n if end < 0 else end
            else:
                break
        return i
