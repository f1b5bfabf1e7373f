"""The strict config loader: every error names file:line:key, merging, the shipped config."""

from __future__ import annotations

import copy
import dataclasses
import json
import pathlib
import re
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from panopticond import config
from panopticond.config import (
    AgentConfig,
    CASpec,
    ConfigError,
    agent_config,
    allow_hint,
    load,
    loads,
    to_dict,
)
from panopticond.errors import ExitStatus
from panopticond.suffixes import wildcard_problem

ROOT = pathlib.Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "config" / "config.toml"
F = "/etc/panopticon/config.toml"


def error(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        loads(text, F)
    return info.value


# --- the locator -------------------------------------------------------------------------


def test_locator_headers_keys_and_multiline_arrays():
    text = """\
# [not.a.header] = 1
top = 1
[defaults]
allow = [
  "a.com",   # a comment with [brackets] and "quotes"
  # [fake]
  'b.com',
]
[agents."b c"]
command = ["x", "y = 1", "#"]
[ agents . bot ]
user = "u"
"""
    loc = config._Locator(text)
    assert loc.line(("top",)) == 2
    assert loc.line(("defaults",)) == 3
    assert loc.line(("defaults", "allow")) == 4
    assert loc.line(("defaults", "allow", 0)) == 5
    assert loc.line(("defaults", "allow", 1)) == 7
    assert loc.line(("agents",)) == 9
    assert loc.line(("agents", "b c")) == 9
    assert loc.line(("agents", "b c", "command", 2)) == 10
    assert loc.line(("agents", "bot")) == 11
    assert loc.line(("agents", "bot", "user")) == 12
    assert ("fake",) not in loc.lines and ("not",) not in loc.lines


def test_locator_dotted_and_inline_tables():
    text = """\
defaults.allow = ["a.com"]
[agents]
bot.ca = { cert = "/c",
  key = "/k" }
other = { allow = ["x.com",
   "y.com"], "quoted key" = 1 }
"""
    loc = config._Locator(text)
    assert loc.line(("defaults",)) == 1
    assert loc.line(("defaults", "allow", 0)) == 1
    assert loc.line(("agents",)) == 2
    assert loc.line(("agents", "bot")) == 3
    assert loc.line(("agents", "bot", "ca", "cert")) == 3
    assert loc.line(("agents", "bot", "ca", "key")) == 4
    assert loc.line(("agents", "other", "allow", 1)) == 6
    assert loc.line(("agents", "other", "quoted key")) == 6


def test_locator_skips_strings_that_look_like_toml():
    text = '''\
a = """
[agents.fake]
allow = ["x"]
"""
b = \'\'\'
[more]\'\'\'
c = "escaped \\" [quote]"
d = 'literal \\'
e = """two quotes at the end"""""
f = 1979-05-27 07:32:00Z
g = [[1, 2], [3,
  4]]
[[arr]]
h = 1
'''
    loc = config._Locator(text)
    assert ("agents",) not in loc.lines and ("more",) not in loc.lines
    assert [loc.line((k,)) for k in "abcdefg"] == [1, 5, 7, 8, 9, 10, 11]
    assert loc.line(("g", 1, 1)) == 12
    assert loc.line(("arr",)) == 13
    assert loc.line(("arr", "h")) == 14


def test_locator_falls_back_to_the_enclosing_key_and_never_raises():
    loc = config._Locator('[agents.bot]\nallow = ["a"]\n')
    assert loc.line(("agents", "bot", "allow", 7)) == 2
    assert loc.line(("agents", "bot", "nothing")) == 1
    assert loc.line(("nowhere",)) is None
    assert config._Locator('x = "unterminated').line(("x",)) == 1  # not TOML: keeps what it saw


def test_dotted_key_formatting():
    assert config.dotted_key(("agents", "bot", "allow", 1)) == "agents.bot.allow[1]"
    assert config.dotted_key(("agents", "b c", "ca")) == 'agents."b c".ca'
    assert config.dotted_key(()) == ""


# --- every error names file, line and key ------------------------------------------------

ERRORS = [
    # (toml, "line: key", substring of the message)
    ("[defaults]\nalow = []\n", "2: defaults.alow", "did you mean 'allow'"),
    ("\n[agent.bot]\n", "2: agent", "did you mean 'agents'"),
    ("[agents.bot]\ncomand = ['x']\n", "2: agents.bot.comand", "did you mean 'command'"),
    ("[network]\nipv6pool = 'fd00::/48'\n", "2: network.ipv6pool", "did you mean 'ipv6_pool'"),
    ("[proxy]\nusr = 'p'\n", "2: proxy.usr", "did you mean 'user'"),
    ("network = 3\n", "1: network", "expected a table, got an integer (3)"),
    ("[[agents]]\ncommand = ['x']\n", "1: agents", "expected a table, got an array"),
    ("[agents]\nbot = 'x'\n", "2: agents.bot", "expected a table, got a string"),
    ("[defaults]\nallow = 'pypi.org'\n", "2: defaults.allow", "expected an array, got a string"),
    ("[defaults]\nallow = ['a.com', 3]\n", "2: defaults.allow[1]", "expected a string"),
    ("[network]\nipv6 = 'yes'\n", "2: network.ipv6", "expected true or false"),
    ("[network]\nipv6 = 1\n", "2: network.ipv6", "expected true or false, got an integer"),
    ("[agents.bot]\ncommand = 'x'\n", "2: agents.bot.command", "expected an array"),
    ("[agents.bot]\ncommand = []\n", "2: agents.bot.command", "the command is empty"),
    ("[agents.bot]\ncommand = ['', 'x']\n", "2: agents.bot.command[0]", "program name is empty"),
    ('[agents.bot]\ncommand = ["x", "a\\u0000b"]\n', "2: agents.bot.command[1]", "NUL"),
    ("[agents.bot]\ncommand = ['x']\nuser = 5\n", "3: agents.bot.user", "expected a string"),
    # host patterns: the ValueError of HostPattern.parse, at the element's own line
    ("[agents.bot]\nallow = [\n  'a.com',\n  '*.*.com',\n]\n", "4: agents.bot.allow[1]",
     "'*.*.com': '*' may only stand alone"),
    ("[defaults]\ndeny = ['exa mple.com']\n", "2: defaults.deny[0]", "not a valid host name"),
    ("[defaults]\nallow = ['*.10.0.0.1']\n", "2: defaults.allow[0]", "wildcard cannot apply"),
    ("[defaults]\nallow = ['a.com:443']\n", "2: defaults.allow[0]", "no port"),
    # agent names
    ("[agents.Bot]\n", "1: agents.Bot", "invalid agent name 'Bot'"),
    ('[agents."b c"]\n', '1: agents."b c"', "invalid agent name"),
    ("[agents.run]\n", "1: agents.run", "reserved"),
    ("[agents.a123456789012345678901234567890123]\n", "1: agents.a1234", "invalid agent name"),
    # ca
    ("[defaults]\nca = 'ephemral'\n", "2: defaults.ca", "did you mean 'ephemeral'"),
    ("[defaults]\nca = 'custom'\n", "2: defaults.ca", "unknown CA mode"),
    ("[defaults]\nca = 1\n", "2: defaults.ca", "expected a CA mode or a table"),
    ("[agents.bot]\nca = { cert = '/c' }\n", "2: agents.bot.ca", "has no 'key'"),
    ("[agents.bot]\nca = { cert = '/c', key = '/k', kye = '/k' }\n", "2: agents.bot.ca.kye",
     "unknown key 'kye'"),
    ("[agents.bot.ca]\ncert = '/c'\nkey = 'ca.key'\n", "3: agents.bot.ca.key", "not an absolute"),
    ("[agents.bot.ca]\ncert = 7\nkey = '/k'\n", "2: agents.bot.ca.cert", "expected a string"),
    # pools
    ("[network]\nipv4_pool = 'ten'\n", "2: network.ipv4_pool", "is not a network"),
    ("[network]\nipv4_pool = '10.1.2.3/16'\n", "2: network.ipv4_pool", "host bits set"),
    ("[network]\nipv4_pool = 'fd00::/48'\n", "2: network.ipv4_pool", "not an IPv4 network"),
    ("[network]\nipv6_pool = '10.0.0.0/8'\n", "2: network.ipv6_pool", "not an IPv6 network"),
    ("[network]\nipv4_pool = '10.0.0.0/30'\n", "2: network.ipv4_pool", "between /8 and /29"),
    ("[network]\nipv4_pool = '0.0.0.0/0'\n", "2: network.ipv4_pool", "between /8 and /29"),
    ("[network]\nipv4_pool = '198.51.100.0/24'\n", "2: network.ipv4_pool", "private range"),
    ("[network]\nipv4_pool = '10.0.0.0/7'\n", "2: network.ipv4_pool", "between /8"),
    ("[network]\nipv6_pool = '2001:db8::/48'\n", "2: network.ipv6_pool", "unique local"),
    ("[network]\nipv6_pool = 'fd00::/80'\n", "2: network.ipv6_pool", "between /16 and /64"),
    ("[network]\nipv4_pool = 10\n", "2: network.ipv4_pool", "expected a string"),
    # dns servers, upstream CA
    ("[network]\ndns_servers = ['9.9.9.9', 'dns.google']\n", "2: network.dns_servers[1]",
     "not an IP address"),
    ("[network]\ndns_servers = ['9.9.9.9:53']\n", "2: network.dns_servers[0]", "not an IP"),
    ("[network]\ndns_servers = [\n'::1']\n", "3: network.dns_servers[0]", "cannot be reached"),
    ("[network]\ndns_servers = ['127.0.0.53']\n", "2: network.dns_servers[0]", "cannot be reached"),
    ("[network]\ndns_servers = '9.9.9.9'\n", "2: network.dns_servers", "expected an array"),
    ("[network]\nupstream_ca = 'ca.pem'\n", "2: network.upstream_ca", "not an absolute path"),
    # users
    ("[defaults]\nuser = 'root'\n", "2: defaults.user", "'root' is not allowed"),
    ("[proxy]\nuser = 'root'\n", "2: proxy.user", "'root' is not allowed"),
    ("[agents.bot]\nuser = 'panopticon-proxy'\n", "2: agents.bot.user", "the proxy user"),
    ("[proxy]\nuser = 'p'\n[defaults]\nuser = 'p'\n", "4: defaults.user", "the proxy user"),
    ("[defaults]\nuser = 'a b'\n", "2: defaults.user", "not a valid user name"),
    ("[defaults]\nuser = ''\n", "2: defaults.user", "not a valid user name"),
    # other ways of writing the same tables
    ("agents.bot.allow = ['ok.com', 'bad..com']\n", "1: agents.bot.allow[1]", "not a valid host"),
    ("[agents]\nbot = { allow = ['ok.com',\n  'b*d.com'] }\n", "3: agents.bot.allow[1]", "'*'"),
    ("defaults = { ca = { cert = '/c', key = 'k' } }\n", "1: defaults.ca.key", "absolute"),
]


@pytest.mark.parametrize("text,where,message", ERRORS)
def test_error_names_file_line_and_key(text, where, message):
    e = error(text)
    line, key = where.split(": ")
    assert str(e).startswith(f"{F}:{line}: {key}"), str(e)
    assert e.file == F and e.line == int(line)
    assert e.key is not None and e.key.startswith(key)
    assert message in str(e)
    assert e.status == ExitStatus.CONFIG


def test_hints_guide_the_operator():
    assert "valid keys there: allow, deny, user, ca" in error("[defaults]\nalow = []\n").hint
    assert "'10.1.0.0/16'" in error("[network]\nipv4_pool = '10.1.2.3/16'\n").hint
    assert "loopback" in error("[network]\ndns_servers = ['127.0.0.53']\n").hint


def test_invalid_toml_reports_the_line_from_tomllib():
    e = error("[defaults]\nallow = []\n\n  bad key = 3\n")
    assert str(e).startswith(f"{F}:4: invalid TOML: Expected '='")
    assert e.line == 4 and e.key is None and "(column" in str(e)
    e = error("[a]\n[a]\n")
    assert e.line == 2 and "twice" in str(e)
    e = error("[defaults]\nallow = ")
    assert e.line == 2 and "end of the file" in str(e)


def test_load_missing_file_names_it_with_a_hint(tmp_path):
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load(str(missing))
    assert str(info.value).startswith(f"{missing}: cannot read the config")
    assert "config/config.toml" in info.value.hint and "--config" in info.value.hint
    with pytest.raises(ConfigError, match="cannot read"):
        load(str(tmp_path))  # a directory


def test_load_rejects_non_utf8_with_its_line(tmp_path):
    p = tmp_path / "c.toml"
    p.write_bytes(b"[defaults]\nallow = ['caf\xe9.com']\n")
    with pytest.raises(ConfigError) as info:
        load(str(p))
    assert info.value.line == 2 and "UTF-8" in str(info.value)


def test_load_reads_the_file_and_keeps_its_path(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[defaults]\nallow = ['pypi.org']\n")
    cfg = load(str(p))
    assert cfg.path == str(p) and cfg.defaults.allow == ("pypi.org",)
    p.write_text("[defaults]\nallow = ['pypi.org', '*']\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(p))}:2: defaults.allow\[1\]: "):
        load(str(p))


# --- meaning -----------------------------------------------------------------------------


def test_empty_file_denies_everything():
    cfg = loads("")
    assert cfg.agents == {}
    assert cfg.defaults == AgentConfig(name="run")
    assert cfg.defaults.allow == () and cfg.defaults.ca == CASpec("persistent")
    assert str(cfg.network.ipv4_pool) == "10.231.0.0/16"
    assert str(cfg.network.ipv6_pool) == "fd7a:7c1d:5e2b::/48"
    assert cfg.network.ipv6 is True and cfg.network.dns_servers == ()
    assert cfg.proxy.user == "panopticon-proxy"


MERGE = """\
[defaults]
allow = ["pypi.org", "*.pythonhosted.org"]
deny = ["evil.test"]
user = "agent"
ca = "ephemeral"

[network]
ipv4_pool = "172.20.0.0/24"
ipv6 = false
dns_servers = ["9.9.9.9", "2620:FE::FE", "9.9.9.9"]
upstream_ca = "/etc/ssl/corp.pem"

[agents.openclaw]
command = ["/usr/local/bin/openclaw", "gateway"]
allow = ["API.Anthropic.com.", "pypi.org", "api.anthropic.com"]
deny = ["evil.test", "files.slack.com"]
ca = { cert = "/etc/panopticon/ca.crt", key = "/etc/panopticon/ca.key" }

[agents.bot]
user = "botuser"
"""


def test_agents_merge_defaults_and_dedupe_keeping_order():
    cfg = loads(MERGE, F)
    claw = cfg.agents["openclaw"]
    assert claw.allow == ("pypi.org", "*.pythonhosted.org", "api.anthropic.com")
    assert claw.deny == ("evil.test", "files.slack.com")
    assert claw.user == "agent"
    assert claw.command == ("/usr/local/bin/openclaw", "gateway")
    assert claw.ca == CASpec("custom", "/etc/panopticon/ca.crt", "/etc/panopticon/ca.key")
    bot = cfg.agents["bot"]
    assert bot.user == "botuser" and bot.command == () and bot.ca == CASpec("ephemeral")
    assert bot.allow == ("pypi.org", "*.pythonhosted.org") and bot.deny == ("evil.test",)
    assert list(cfg.agents) == ["openclaw", "bot"]
    assert cfg.network.dns_servers == ("9.9.9.9", "2620:fe::fe")
    assert cfg.network.ipv6 is False and cfg.network.upstream_ca == "/etc/ssl/corp.pem"


def test_config_is_immutable():
    cfg = loads(MERGE)
    with pytest.raises(TypeError):
        cfg.agents["x"] = cfg.defaults  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.defaults.allow = ()  # type: ignore[misc]


def test_agent_config_adhoc_and_flags():
    cfg = loads(MERGE, F)
    run = agent_config(cfg, None, allow=["Example.com", "pypi.org"], deny=("x.test",))
    assert run.name == "run" and run.command == ()
    assert run.allow == ("pypi.org", "*.pythonhosted.org", "example.com")
    assert run.deny == ("evil.test", "x.test") and run.user == "agent"
    bot = agent_config(cfg, "bot", allow="extra.test", user="someone")
    assert bot.allow[-1] == "extra.test" and bot.user == "someone"
    assert agent_config(cfg, "bot") == cfg.agents["bot"]


def test_agent_config_flag_errors():
    cfg = loads(MERGE, F)
    with pytest.raises(ConfigError) as info:
        agent_config(cfg, None, allow=["ok.test", "*.*.com"])
    assert str(info.value).startswith("--allow: '*.*.com'")
    with pytest.raises(ConfigError, match=r"^--deny: "):
        agent_config(cfg, None, deny=["a b"])
    with pytest.raises(ConfigError, match=r"^--user: 'root'"):
        agent_config(cfg, None, user="root")
    with pytest.raises(ConfigError, match=r"^--user: .*proxy user"):
        agent_config(cfg, "bot", user="panopticon-proxy")


def test_agent_config_unknown_name_lists_the_known_ones():
    cfg = loads(MERGE, F)
    with pytest.raises(ConfigError) as info:
        agent_config(cfg, "openclow")
    msg = str(info.value)
    assert msg.startswith(F) and "did you mean 'openclaw'" in msg
    assert "known agents: openclaw, bot" in msg and "[agents.openclow]" in info.value.hint
    with pytest.raises(ConfigError, match="known agents: none"):
        agent_config(loads(""), "x")


def test_allow_hint():
    cfg = loads(MERGE, F)
    assert allow_hint(cfg, cfg.agents["openclaw"]) == "allow of [agents.openclaw] in the config"
    adhoc = allow_hint(cfg, agent_config(cfg, None))
    assert "[defaults]" in adhoc and "--allow HOST" in adhoc
    # The agent reads the hint in 403 pages: it never names a file of the host.
    assert F not in adhoc


def test_to_dict_is_json_and_complete():
    d = to_dict(loads(MERGE, F))
    assert json.loads(json.dumps(d)) == d
    assert d["network"]["ipv4_pool"] == "172.20.0.0/24"
    assert d["agents"]["openclaw"]["ca"] == {
        "mode": "custom", "cert": "/etc/panopticon/ca.crt", "key": "/etc/panopticon/ca.key"}
    assert set(d) == {"path", "network", "proxy", "defaults", "agents", "webhook"}


def test_the_module_is_pure():
    code = ("import sys, panopticond.config; "
            "print([m for m in ('iptc', 'pyroute2', 'mitmproxy') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


# --- the shipped config ------------------------------------------------------------------


def test_shipped_config_loads_and_states_the_builtin_defaults():
    cfg = load(str(SHIPPED))
    assert cfg.agents == {}
    assert {**to_dict(cfg), "path": ""} == {**to_dict(loads("")), "path": ""}


def test_shipped_config_example_loads_when_uncommented():
    # Commented-out settings are written `#key = ...` (no space), prose `# ...`.
    text = re.sub(r"(?m)^#(?=[\[a-z])", "", SHIPPED.read_text())
    cfg = loads(text, str(SHIPPED))
    claw = cfg.agents["openclaw"]
    assert claw.command and claw.user == "openclaw" and "api.anthropic.com" in claw.allow
    assert cfg.defaults.user == "agent"


def test_shipped_config_documents_every_key():
    text = SHIPPED.read_text()
    keys = set(config._DEFAULTS_KEYS + config._NETWORK_KEYS + config._PROXY_KEYS
               + config._AGENT_KEYS)
    for key in keys:
        assert re.search(rf"(?m)^#?{key} = ", text) or re.search(rf"(?m)^#\s+{key}\s", text), key


# --- random valid configs round-trip -----------------------------------------------------

_label = st.text("abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=8)


def _host_text(wild: bool, labels: list[str], tld: str, upper: bool) -> str:
    name = ".".join([*labels, tld])
    return ("*." if wild else "") + (name.upper() if upper else name)


# An allowing wildcard over a public suffix (say '*.us.com') is refused: test_destconfig.py.
_host = st.builds(_host_text, st.booleans(), st.lists(_label, min_size=1, max_size=3),
                  st.sampled_from(["com", "test", "io"]), st.booleans()).filter(
    lambda h: not h.startswith("*.") or wildcard_problem(h[2:].lower()) is None)
_hosts = st.lists(_host, max_size=4)
_user = st.from_regex(r"\A[a-z_][a-z0-9_-]{0,12}\Z").filter(
    lambda u: u not in ("root", "panopticon-proxy"))
_ca = st.one_of(
    st.sampled_from(["persistent", "ephemeral"]),
    st.builds(lambda a, b: {"cert": f"/etc/{a}.crt", "key": f"/etc/{b}.key"}, _label, _label),
)
_log_settings = {"log_max_bytes": st.sampled_from([0, 1024, 10**12]),
                 "log_keep": st.integers(1, 1000), "proxy_workers": st.integers(1, 8)}
_section = st.fixed_dictionaries({}, optional={"allow": _hosts, "deny": _hosts, "user": _user,
                                               "ca": _ca, **_log_settings})
_agent = st.fixed_dictionaries({}, optional={
    "allow": _hosts, "deny": _hosts, "user": _user, "ca": _ca, **_log_settings,
    "command": st.lists(st.text("abc/ -=\"'\\#[]", min_size=1, max_size=6), min_size=1,
                        max_size=3)})
_names = st.from_regex(r"\A[a-z0-9][a-z0-9_-]{0,31}\Z").filter(lambda n: n != "run")
_network = st.fixed_dictionaries({}, optional={
    "ipv4_pool": st.sampled_from(["10.0.0.0/8", "192.168.4.0/24", "100.64.0.0/29"]),
    "ipv6_pool": st.sampled_from(["fd00::/48", "fdff:1::/64", "fc00::/16"]),
    "ipv6": st.booleans(),
    "dns_servers": st.lists(st.sampled_from(["9.9.9.9", "198.51.100.53", "2001:db8::53"]),
                            unique=True),
    "upstream_ca": st.sampled_from(["", "/etc/ssl/x.pem"]),
})
_raw = st.fixed_dictionaries({}, optional={
    "defaults": _section, "network": _network,
    "agents": st.dictionaries(_names, _agent, max_size=4)})


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"


def render(raw, style) -> tuple[str, dict]:
    """TOML for `raw` in one of three layouts, and the line of every allow element."""
    lines: list[str] = ["# generated"]
    where: dict = {}

    def table(prefix: tuple, body: dict, header: bool):
        if header:
            lines.extend(["", "[" + ".".join(prefix) + "]"])
        lead = "" if header else ".".join(prefix) + "."
        if not body and not header:
            lines.append(f"{'.'.join(prefix)} = {{}}")
        for key, value in body.items():
            if key == "allow" and value and style == "multiline":
                lines.append(f"{lead}{key} = [  # one per line")
                for i, v in enumerate(value):
                    lines.append(f"    {_toml(v)},")
                    where[(*prefix, "allow", i)] = len(lines)
                lines.append("]")
            else:
                lines.append(f"{lead}{key} = {_toml(value)}")
                if key == "allow":
                    for i in range(len(value)):
                        where[(*prefix, "allow", i)] = len(lines)

    header = style != "dotted"
    for name in ("defaults", "network"):
        if name in raw:
            table((name,), raw[name], header)
    for agent, body in raw.get("agents", {}).items():
        table(("agents", agent), body, header)
    return "\n".join(lines) + "\n", where


def expected(raw) -> dict:
    """What to_dict must say, computed independently of the loader."""

    def canon(hosts):
        return list(dict.fromkeys(h.lower() for h in hosts))

    def ca(value):
        if isinstance(value, dict):
            return {"mode": "custom", **value}
        return {"mode": value, "cert": None, "key": None}

    d = raw.get("defaults", {})
    defaults = {"name": "run", "command": [], "user": d.get("user"),
                "allow": canon(d.get("allow", [])), "deny": canon(d.get("deny", [])),
                "ca": ca(d.get("ca", "persistent")),
                "log_max_bytes": d.get("log_max_bytes", 64 * 1024 * 1024),
                "log_keep": d.get("log_keep", 7),
                "proxy_workers": d.get("proxy_workers", 1),
                "rules": [], "headers": [], "addons": [], "mode": "enforce", "inbound": {},
                "secrets": {}, "dlp": "block", "dlp_patterns": {},
                "allow_cidrs": [], "passthrough": [], "ports": [], "health": None}
    agents = {}
    for name, a in raw.get("agents", {}).items():
        agents[name] = {
            "name": name, "command": a.get("command", []), "user": a.get("user", defaults["user"]),
            "allow": canon(defaults["allow"] + a.get("allow", [])),
            "deny": canon(defaults["deny"] + a.get("deny", [])),
            "ca": ca(a["ca"]) if "ca" in a else defaults["ca"],
            "log_max_bytes": a.get("log_max_bytes", defaults["log_max_bytes"]),
            "log_keep": a.get("log_keep", defaults["log_keep"]),
            "proxy_workers": a.get("proxy_workers", defaults["proxy_workers"]),
            "rules": [], "headers": [], "addons": [], "mode": "enforce", "inbound": {},
            "secrets": {}, "dlp": "block", "dlp_patterns": {},
            "allow_cidrs": [], "passthrough": [], "ports": [], "health": None,
        }
    network = {"ipv4_pool": "10.231.0.0/16", "ipv6_pool": "fd7a:7c1d:5e2b::/48", "ipv6": True,
               "dns_servers": [], "upstream_ca": "", **raw.get("network", {})}
    return {"path": F, "network": network, "proxy": {"user": "panopticon-proxy"},
            "defaults": defaults, "agents": agents, "webhook": None}


_style = st.sampled_from(["headers", "multiline", "dotted"])


@settings(max_examples=150, deadline=None)
@given(_raw, _style)
def test_random_valid_configs_round_trip(raw, style):
    text, _ = render(raw, style)
    assert to_dict(loads(text, F)) == expected(raw)


@settings(max_examples=150, deadline=None)
@given(_raw, _style, st.data())
def test_a_bad_pattern_anywhere_is_located(raw, style, data):
    raw = copy.deepcopy(raw)
    _, where = render(raw, style)
    if not where:
        raw = {**raw, "defaults": {**raw.get("defaults", {}), "allow": ["ok.test"]}}
        _, where = render(raw, style)
    path = data.draw(st.sampled_from(sorted(where)))
    bad = data.draw(st.sampled_from(["*.*.com", "a b.com", "x*.com", "*"]))
    section = raw[path[0]] if path[0] == "defaults" else raw["agents"][path[1]]
    section["allow"] = [*section["allow"]]
    section["allow"][path[-1]] = bad
    text, where = render(raw, style)
    e = error(text)
    assert (e.line, e.key) == (where[path], config.dotted_key(path)), text


# --- method/path rules, headers, operator addons, mode (issue 3) ------------------------------

RULES_ERRORS = [
    ("[defaults]\nallow = [{ hots = 'a.com' }]\n", "2: defaults.allow[0].hots",
     "did you mean 'host'"),
    ("[defaults]\nallow = [{ methods = ['GET'] }]\n", "2: defaults.allow[0]", "has no 'host'"),
    ("[defaults]\nallow = [\n  'x.com',\n  { host = 'a.com', methods = ['CONNECT'] },\n]\n",
     "4: defaults.allow[1].methods[0]", "never allowed"),
    ("[agents.bot]\nallow = [{ host = 'a.com', methods = ['GET', 'G T'] }]\n",
     "2: agents.bot.allow[0].methods[1]", "not an HTTP method"),
    ("[defaults]\nallow = [{ host = 'a.com', paths = [] }]\n", "2: defaults.allow[0].paths",
     "is empty"),
    ("[defaults]\nallow = [{ host = 'a.com', paths = ['/a/../b'] }]\n",
     "2: defaults.allow[0].paths[0]", "'..'"),
    ("[defaults]\nallow = [{ host = 'a.com', paths = ['/a%2Fb'] }]\n",
     "2: defaults.allow[0].paths[0]", "decoded"),
    ("[defaults]\nallow = [{ host = 'a.com', paths = 'x' }]\n", "2: defaults.allow[0].paths",
     "expected an array"),
    ("[defaults]\nallow = [{ host = '*.*.com' }]\n", "2: defaults.allow[0].host", "'*'"),
    ("[defaults]\nallow = [{ host = 3 }]\n", "2: defaults.allow[0].host", "expected a string"),
    ("[defaults]\ndeny = [{ host = 'a.com' }]\n", "2: defaults.deny[0]", "expected a string"),
    ("[defaults]\nheaders = { 'a.com' = { Host = 'b.com' } }\n", "2: defaults.headers.\"a.com\"",
     "names its host"),
    ("[defaults.headers.'a.com']\nX-Org = 'a'\n'X Bad' = 'b'\n",
     '3: defaults.headers."a.com"."X Bad"', "not a valid header name"),
    ('[defaults]\nheaders = { "a.com" = { X-Org = "a\\r\\nX-Evil: 1" } }\n',
     '2: defaults.headers."a.com".X-Org', "line break"),
    ("[defaults]\nheaders = { 'a..com' = { X-Org = 'a' } }\n", '2: defaults.headers."a..com"',
     "not a valid host"),
    ("[defaults]\nheaders = { 'a.com' = {} }\n", '2: defaults.headers."a.com"', "no headers"),
    ("[defaults]\nheaders = { 'a.com' = { X-Org = 1 } }\n", '2: defaults.headers."a.com".X-Org',
     "expected a string"),
    ("[defaults]\nheaders = ['a.com']\n", "2: defaults.headers", "expected a table"),
    ("[agents.bot]\naddons = ['compliance.py']\n", "2: agents.bot.addons[0]", "not an absolute"),
    ("[defaults]\naddons = ['/etc/x.sh']\n", "2: defaults.addons[0]", "not a Python file"),
    ("[defaults]\nmode = 'discovery'\n", "2: defaults.mode", "did you mean 'discover'"),
    ("[agents.bot]\nmode = true\n", "2: agents.bot.mode", "expected a string"),
]


@pytest.mark.parametrize("text,where,message", RULES_ERRORS)
def test_rule_header_addon_mode_errors_name_file_line_and_key(text, where, message):
    test_error_names_file_line_and_key(text, where, message)


def test_allow_mixes_host_strings_and_rule_tables():
    cfg = loads("""
[defaults]
allow = ["pypi.org", { host = "API.github.com", methods = ["get"], paths = ["/repos/acme/*"] }]
[agents.bot]
allow = [{ host = "uploads.example", methods = ["PUT"] }, "pypi.org"]
""", F)
    d, bot = cfg.defaults, cfg.agents["bot"]
    assert d.allow == ("pypi.org",)
    assert [r.to_dict() for r in d.rules] == [
        {"host": "api.github.com", "methods": ["GET"], "paths": ["/repos/acme/*"]}]
    assert bot.allow == ("pypi.org",)
    assert [str(r.host) for r in bot.rules] == ["api.github.com", "uploads.example"]
    assert bot.rules[1].paths is None
    assert to_dict(cfg)["agents"]["bot"]["rules"][1] == {
        "host": "uploads.example", "methods": ["PUT"], "paths": None}


def test_headers_addons_and_mode_merge():
    cfg = loads("""
[defaults]
headers = { "*.example.com" = { X-Org = "acme", X-Env = "prod" } }
addons = ["/etc/panopticon/addons/a.py"]
mode = "discover"
[agents.bot]
headers = { "api.example.com" = { X-Org = "bot" } }
addons = ["/etc/panopticon/addons/b.py", "/etc/panopticon/addons/a.py"]
[agents.strict]
mode = "enforce"
""", F)
    bot = cfg.agents["bot"]
    assert [str(h.host) for h in bot.headers] == ["*.example.com", "api.example.com"]
    assert bot.addons == ("/etc/panopticon/addons/a.py", "/etc/panopticon/addons/b.py")
    assert bot.mode == "discover" and cfg.agents["strict"].mode == "enforce"
    assert cfg.defaults.mode == "discover"
    # check --json names the headers, never their values (they may be credentials).
    shown = json.dumps(to_dict(cfg))
    assert "X-Org" in shown and "acme" not in shown.replace("acme/", "")


def test_agent_config_mode_flag():
    cfg = loads("[agents.bot]\nmode = 'discover'\n", F)
    assert agent_config(cfg, "bot").mode == "discover"
    assert agent_config(cfg, "bot", mode="enforce").mode == "enforce"
    assert agent_config(cfg, None, mode="discover").mode == "discover"
    with pytest.raises(ConfigError) as info:
        agent_config(cfg, "bot", mode="discovery")
    assert info.value.key == "--mode" and "did you mean 'discover'" in str(info.value)


def test_a_port_table_is_a_tcp_rule_never_a_host_rule():
    # { host, port } allows raw TCP on that port (destconfig.py), never "any request to host".
    cfg = loads("[defaults]\nallow = [{ host = 'github.com', port = 22 }]\n", F)
    assert cfg.defaults.ports == (("github.com", 22),)
    assert cfg.defaults.allow == () and cfg.defaults.rules == ()


def test_health_is_a_loopback_address_and_port_of_one_agent_only():
    cfg = loads('[agents.a]\nhealth = "127.0.0.1:9180"\n[agents.b]\nhealth = "[::1]:9180"\n', F)
    assert cfg.agents["a"].health == ("127.0.0.1", 9180)
    assert cfg.agents["b"].health == ("::1", 9180)
    assert to_dict(cfg)["agents"]["b"]["health"] == "[::1]:9180"
    assert loads("[agents.c]\n", F).agents["c"].health is None
    e = error('[agents.a]\nhealth = "127.0.0.1:9180"\n[agents.b]\nhealth = "127.0.0.1:9180"\n')
    assert (e.line, e.key) == (4, "agents.b.health") and "agent 'a'" in str(e)
    assert "loopback" in str(error('[agents.a]\nhealth = "10.0.0.1:9180"\n'))
    for bad in ("localhost:9180", "127.0.0.1", "127.0.0.1:0", "127.0.0.1:65536", "[::1]"):
        assert error(f'[agents.a]\nhealth = "{bad}"\n').key == "agents.a.health", bad
    # Per agent only: a default would put every agent on one port.
    assert error('[defaults]\nhealth = "127.0.0.1:1"\n').key == "defaults.health"


def test_a_long_value_in_the_wrong_place_is_not_repeated_in_the_error():
    # A credential pasted where a number belongs must not reach the journal whole.
    value = "sk-live-0123456789abcdefghijklmnop"
    text = f'[defaults]\nlog_keep = "{value}"\n'
    with pytest.raises(ConfigError) as e:
        loads(text, "/etc/panopticon/config.toml")
    msg = str(e.value)
    assert "/etc/panopticon/config.toml:2" in msg and "log_keep" in msg
    assert "0123456789abcdefghijklmnop" not in msg and f"{len(value)} characters" in msg


def test_proxy_workers_default_one_replaced_per_agent():
    cfg = loads('[defaults]\nproxy_workers = 2\n[agents.a]\ncommand = ["x"]\n'
                '[agents.b]\ncommand = ["x"]\nproxy_workers = 1\n', F)
    assert cfg.defaults.proxy_workers == 2
    assert cfg.agents["a"].proxy_workers == 2 and cfg.agents["b"].proxy_workers == 1
    assert loads('[agents.c]\ncommand = ["x"]\n', F).agents["c"].proxy_workers == 1


@pytest.mark.parametrize("value", ["0", "9", "-1", "true", '"2"', "1.5"])
def test_proxy_workers_out_of_range_or_not_an_integer_is_located(value):
    text = f'[agents.a]\ncommand = ["x"]\n\nproxy_workers = {value}\n'
    with pytest.raises(ConfigError) as e:
        loads(text, "/etc/panopticon/config.toml")
    assert e.value.key == "agents.a.proxy_workers"
    assert "/etc/panopticon/config.toml:4" in str(e.value)
