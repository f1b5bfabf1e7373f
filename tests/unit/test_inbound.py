"""inbound.py: routes from the config (strict, located errors), the plan, the rules."""

from __future__ import annotations

import ipaddress
import textwrap

import pytest

from panopticond import config, inbound, rules
from panopticond.errors import ConfigError
from panopticond.plan import Names
from panopticond.proxy import ProxySpec

F = "/etc/panopticon/config.toml"
TAG = "abcdef01"
VETH = "pnhabcdef01"
J4 = ipaddress.ip_address("10.231.0.2")
J6 = ipaddress.ip_address("fd7a::2")


def load(text: str) -> config.Config:
    return config.loads(textwrap.dedent(text), F)


def routes(body: str, agent: str = "bot") -> tuple[inbound.Route, ...]:
    return load(f"[agents.{agent}.inbound.web]\n" + textwrap.dedent(body)).agents[agent].inbound


def error(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as e:
        load(text)
    return e.value


WEB = 'listen = "*:443"\nto = 8443\nallow_from = ["203.0.113.0/24", "2001:db8::/32"]\n'


# --- config --------------------------------------------------------------------------


def test_a_route_with_its_defaults():
    (r,) = routes(WEB)
    assert (r.name, r.listen_port, r.listen_families, r.listen_addr) == ("web", 443, (4, 6), None)
    assert (r.to_addr, r.to_port, r.tls, r.websocket, r.block_patterns) == (
        "127.0.0.1", 8443, "self", False, ())
    assert [str(n) for n in r.allow_from] == ["203.0.113.0/24", "2001:db8::/32"]
    assert r.families == (4, 6) and r.listen == "*:443" and r.to == "127.0.0.1:8443"


def test_every_key():
    (r,) = routes("""\
        listen = "[2001:db8::7]:8443"
        to = "[::1]:9000"
        tls = { cert = "/etc/p/c.pem", key = "/etc/p/k.pem" }
        allow_from = ["2001:db8::/32", "2001:db8::/32", "2001:db8:1::5"]
        websocket = true
        block_patterns = ['(?i)<script', 'x', 'x']
        """)
    assert r.listen_addr == ipaddress.ip_address("2001:db8::7") and r.listen_families == (6,)
    assert (r.to_addr, r.to_port, r.tls, r.cert, r.key) == (
        "::1", 9000, "custom", "/etc/p/c.pem", "/etc/p/k.pem")
    assert [str(n) for n in r.allow_from] == ["2001:db8::/32", "2001:db8:1::5/128"]
    assert r.websocket and r.block_patterns == ("(?i)<script", "x")
    assert r.listen == "[2001:db8::7]:8443" and r.to == "[::1]:9000"


def test_families_follow_the_listen_address_and_the_sources():
    (r,) = routes('listen = "0.0.0.0:80"\nto = 8080\nallow_from = ["0.0.0.0/0"]\ntls = "none"\n')
    assert r.listen_families == (4,) and r.families == (4,) and r.listen == "0.0.0.0:80"
    (r,) = routes('listen = "[::]:80"\nto = 8080\nallow_from = ["::/0"]\n')
    assert r.families == (6,) and r.listen == "[::]:80"
    # "*" but only IPv4 sources: IPv6 is not served at all.
    (r,) = routes('listen = "*:80"\nto = 8080\nallow_from = ["198.51.100.0/24"]\n')
    assert r.listen_families == (4, 6) and r.families == (4,)


ERRORS = [
    # (route body, "line: key" in the message, words in it)
    ('to = 8443\nallow_from = ["203.0.113.0/24"]\n', "2: agents.bot.inbound.web", "no 'listen'"),
    ('listen = 443\n' + WEB[16:], "3: agents.bot.inbound.web.listen", "has no address"),
    ('listen = "localhost:443"\n' + WEB[16:], "3: agents.bot.inbound.web.listen",
     "not an IP address"),
    ('listen = "127.0.0.1:443"\n' + WEB[16:], "3: agents.bot.inbound.web.listen", "loopback"),
    ('listen = "[::1]:443"\n' + WEB[16:], "3: agents.bot.inbound.web.listen", "loopback"),
    ('listen = "::1:443"\n' + WEB[16:], "3: agents.bot.inbound.web.listen", "in brackets"),
    ('listen = "*:70000"\n' + WEB[16:], "3: agents.bot.inbound.web.listen", "not a port"),
    ('listen = "*:0"\n' + WEB[16:], "3: agents.bot.inbound.web.listen", "not a port"),
    ('listen = "*:443"\nto = 443\nallow_from = ["::/0"]\n', "4: agents.bot.inbound.web.to",
     "privileged"),
    # The proxy's own ports in the jail are privileged too (plan.py): never a `to`.
    ('listen = "*:443"\nto = 901\nallow_from = ["::/0"]\n', "4: agents.bot.inbound.web.to",
     "privileged"),
    ('listen = "*:443"\nto = 960\nallow_from = ["::/0"]\n', "4: agents.bot.inbound.web.to",
     "privileged"),
    ('listen = "*:443"\nto = "10.0.0.1:8443"\nallow_from = ["::/0"]\n',
     "4: agents.bot.inbound.web.to", "over loopback only"),
    ('listen = "*:443"\nto = 8443\nallow_from = []\n', "5: agents.bot.inbound.web.allow_from",
     "nobody could connect"),
    ('listen = "*:443"\nto = 8443\nallow_from = ["203.0.113.7/24"]\n',
     "5: agents.bot.inbound.web.allow_from[0]", "not a network"),
    ('listen = "*:443"\nto = 8443\nallow_from = [\n  "::/0",\n  "nope",\n]\n',
     "7: agents.bot.inbound.web.allow_from[1]", "not a network"),
    ('listen = "*:443"\nto = 8443\nallow_from = ["::ffff:1.2.3.0/120"]\n',
     "5: agents.bot.inbound.web.allow_from[0]", "IPv4-mapped"),
    ('listen = "0.0.0.0:443"\nto = 8443\nallow_from = ["203.0.113.0/24", "2001:db8::/32"]\n',
     "5: agents.bot.inbound.web.allow_from[1]", "listens on IPv4 only"),
    (WEB + 'tls = "yes"\n', "6: agents.bot.inbound.web.tls", "unknown TLS mode"),
    (WEB + 'tls = { cert = "c.pem", key = "/k" }\n', "6: agents.bot.inbound.web.tls.cert",
     "not an absolute path"),
    (WEB + 'tls = { cert = "/c.pem" }\n', "6: agents.bot.inbound.web.tls", "no 'key'"),
    (WEB + 'websocket = "yes"\n', "6: agents.bot.inbound.web.websocket", "true or false"),
    (WEB + "block_patterns = ['ok', '(unclosed']\n",
     "6: agents.bot.inbound.web.block_patterns[1]", "not a regular expression"),
    (WEB + "block_patterns = ['']\n", "6: agents.bot.inbound.web.block_patterns[0]",
     "matches every request"),
    (WEB + 'listn = "x"\n', "6: agents.bot.inbound.web.listn", "did you mean 'listen'"),
]


@pytest.mark.parametrize("body,where,words", ERRORS)
def test_errors_name_file_line_and_key(body, where, words):
    e = error("[agents.bot]\n[agents.bot.inbound.web]\n" + body)
    assert str(e).startswith(f"{F}:{where}:"), str(e)
    assert words in str(e)


def test_bad_route_name():
    e = error('[agents.bot.inbound."Web UI"]\n' + WEB)
    assert 'agents.bot.inbound."Web UI"' in str(e) and "invalid route name" in str(e)


def test_inbound_is_not_a_defaults_key():
    assert "unknown key 'inbound'" in str(error("[defaults.inbound.web]\n" + WEB))


def test_overlapping_listen_ports_within_an_agent():
    e = error(f"[agents.bot.inbound.a]\n{WEB}\n[agents.bot.inbound.b]\n"
              'listen = "203.0.113.9:443"\nto = 9000\nallow_from = ["0.0.0.0/0"]\n')
    assert str(e).startswith(f"{F}:7: agents.bot.inbound.b.listen:")
    assert "overlaps '*:443' of agents.bot.inbound.a" in str(e)


def test_overlapping_listen_ports_across_agents():
    e = error(f"[agents.one.inbound.a]\n{WEB}\n[agents.two.inbound.b]\n"
              'listen = "[::]:443"\nto = 9000\nallow_from = ["::/0"]\n')
    assert "agents.two.inbound.b.listen" in str(e) and "agents.one.inbound.a" in str(e)


def test_what_does_not_overlap():
    cfg = load(f"[agents.one.inbound.a]\n{WEB.replace('*:443', '0.0.0.0:443')}"
               .replace(', "2001:db8::/32"', "")
               + '[agents.two.inbound.b]\nlisten = "[::]:443"\nto = 9000\nallow_from = ["::/0"]\n'
               + '[agents.two.inbound.c]\nlisten = "203.0.113.1:8443"\nto = 9001\n'
               + 'allow_from = ["::/0", "0.0.0.0/0"]\n'.replace('"::/0", ', "")
               + '[agents.two.inbound.d]\nlisten = "203.0.113.2:8443"\nto = 9002\n'
               + 'allow_from = ["0.0.0.0/0"]\n')
    assert [r.name for a in cfg.agents.values() for r in a.inbound] == ["a", "b", "c", "d"]


def test_ipv6_only_route_when_the_jail_has_no_ipv6():
    e = error('[network]\nipv6 = false\n[agents.bot.inbound.web]\n'
              'listen = "[::]:443"\nto = 8443\nallow_from = ["::/0"]\n')
    assert "agents.bot.inbound.web.listen" in str(e) and "ipv6 = false" in str(e)
    # Both families: fine, IPv4 only is served.
    cfg = load('[network]\nipv6 = false\n[agents.bot.inbound.web]\n' + WEB)
    assert inbound.plan(cfg.agents["bot"].inbound, ipv6=False)[0].families == (4,)


def test_to_dict_shows_routes_without_secrets():
    cfg = load("[agents.bot.inbound.web]\n" + WEB + 'tls = { cert = "/c", key = "/k" }\n')
    assert config.to_dict(cfg)["agents"]["bot"]["inbound"] == {"web": {
        "listen": "*:443", "to": "127.0.0.1:8443", "tls": {"cert": "/c", "key": "/k"},
        "allow_from": ["203.0.113.0/24", "2001:db8::/32"], "websocket": False,
        "block_patterns": []}}


def test_too_many_routes():
    text = "".join(f'[agents.bot.inbound.r{i}]\nlisten = "*:{2000 + i}"\nto = {3000 + i}\n'
                   'allow_from = ["::/0"]\n' for i in range(inbound.MAX_ROUTES + 1))
    assert "at most" in str(error(text))


# --- plan ----------------------------------------------------------------------------


def two_routes():
    return routes(WEB + 'websocket = true\nblock_patterns = ["evil"]\n'
                  '[agents.bot.inbound.plain]\nlisten = "0.0.0.0:8080"\nto = 8080\n'
                  'tls = "none"\nallow_from = ["198.51.100.0/24"]\n')


def test_plan_gives_each_route_a_listener_and_drops_missing_families():
    pubs = inbound.plan(two_routes(), ipv6=True)
    assert [(p.route.name, p.port, p.families) for p in pubs] == [
        ("web", 960, (4, 6)), ("plain", 961, (4,))]
    assert [(p.port, p.families) for p in inbound.plan(two_routes(), ipv6=False)] == [
        (960, (4,)), (961, (4,))]


def test_proxy_modes_and_config():
    pubs = inbound.plan(two_routes(), ipv6=True)
    assert inbound.proxy_modes(pubs) == [
        "reverse:http://127.0.0.1:8443@0.0.0.0:960",
        "reverse:http://127.0.0.1:8443@:::960",
        "reverse:http://127.0.0.1:8080@0.0.0.0:961",
    ]
    doc = inbound.proxy_config(pubs, "/run/panopticon/bot")
    assert doc["routes"][0] == {
        "name": "web", "port": 960, "to": ["127.0.0.1", 8443], "tls": "self",
        "cert_file": None, "allow_from": ["203.0.113.0/24", "2001:db8::/32"],
        "websocket": True, "block_patterns": ["evil"]}
    # A family the jail does not serve is not allowed by the proxy either.
    assert inbound.proxy_config(inbound.plan(two_routes(), ipv6=False), "/r")["routes"][0][
        "allow_from"] == ["203.0.113.0/24"]


def test_custom_certificate_file_lives_in_the_run_dir():
    (r,) = routes(WEB + 'tls = { cert = "/c", key = "/k" }\n')
    doc = inbound.proxy_config(inbound.plan((r,), ipv6=True), "/run/panopticon/bot")
    assert doc["routes"][0]["cert_file"] == "/run/panopticon/bot/inbound-web.pem"


def test_proxy_spec_adds_the_listeners_and_lets_public_clients_in():
    names = Names.of("bot")
    spec = ProxySpec(names=names, uid=1, gid=1, confdir="/c", policy_path="/p", log_path="/l",
                     dns_servers=(), ipv6=True, upstream_ca=None,
                     inbound_modes=("reverse:http://127.0.0.1:8443@0.0.0.0:960",),
                     inbound_path="/run/panopticon/bot/inbound.json")
    opts = spec.options()
    assert opts["mitmproxy"]["mode"][-1] == "reverse:http://127.0.0.1:8443@0.0.0.0:960"
    assert opts["mitmproxy"]["block_global"] is False
    assert opts["panopticon"]["panopticon_inbound"] == "/run/panopticon/bot/inbound.json"
    plain = ProxySpec(names=names, uid=1, gid=1, confdir="/c", policy_path="/p", log_path="/l",
                      dns_servers=(), ipv6=True, upstream_ca=None).options()
    assert "block_global" not in plain["mitmproxy"]
    assert "panopticon_inbound" not in plain["panopticon"]
    assert not [m for m in plain["mitmproxy"]["mode"] if m.startswith("reverse")]


# --- rules ---------------------------------------------------------------------------


def host(family: int, pubs) -> rules.RuleSet:
    base = rules.host_rules(family, tag=TAG, veth_host=VETH,
                            subnet="10.231.0.0/29" if family == 4 else "fd7a::/64",
                            dns_servers=[])
    return inbound.with_host_rules(base, pubs, veth_host=VETH, jail=J4 if family == 4 else J6)


def test_host_rules_dnat_only_local_destinations_from_outside_the_jails():
    lines = host(4, inbound.plan(two_routes(), ipv6=True)).describe()
    assert "-I PREROUTING 1 ! -i pnh+ -j PANO-ABCDEF01-DNAT" in lines
    assert "-I OUTPUT 1 -j PANO-ABCDEF01-DNAT" in lines
    dnat = [x for x in lines if x.startswith("-A PANO-ABCDEF01-DNAT")]
    assert dnat == [
        "-A PANO-ABCDEF01-DNAT -d 127.0.0.0/8 -j RETURN",
        "-A PANO-ABCDEF01-DNAT -p tcp -m addrtype --dst-type LOCAL -m tcp --dport 443 "
        "-j DNAT --to-destination 10.231.0.2:960",
        "-A PANO-ABCDEF01-DNAT -p tcp -m addrtype --dst-type LOCAL -m tcp --dport 8080 "
        "-j DNAT --to-destination 10.231.0.2:961",
    ]


def test_host_rules_accept_only_allowed_dnated_sources_then_drop():
    rs = host(4, inbound.plan(two_routes(), ipv6=True))
    inb = [r.describe() for r in rs.chain_rules("filter", "PANO-ABCDEF01-INB")]
    assert inb == [
        "-A PANO-ABCDEF01-INB -s 10.231.0.2/32 -i pnhabcdef01 -p tcp -m tcp --sport 960 "
        "-m conntrack --ctstate ESTABLISHED -j ACCEPT",
        "-A PANO-ABCDEF01-INB -s 203.0.113.0/24 -d 10.231.0.2/32 -o pnhabcdef01 -p tcp "
        "-m tcp --dport 960 -m conntrack --ctstate DNAT -j ACCEPT",
        "-A PANO-ABCDEF01-INB -d 10.231.0.2/32 -o pnhabcdef01 -p tcp -m tcp --dport 960 -j DROP",
        "-A PANO-ABCDEF01-INB -s 10.231.0.2/32 -i pnhabcdef01 -p tcp -m tcp --sport 961 "
        "-m conntrack --ctstate ESTABLISHED -j ACCEPT",
        "-A PANO-ABCDEF01-INB -s 198.51.100.0/24 -d 10.231.0.2/32 -o pnhabcdef01 -p tcp "
        "-m tcp --dport 961 -m conntrack --ctstate DNAT -j ACCEPT",
        "-A PANO-ABCDEF01-INB -d 10.231.0.2/32 -o pnhabcdef01 -p tcp -m tcp --dport 961 -j DROP",
    ]


def test_inbound_jumps_come_before_the_instance_refusals():
    rs = host(6, inbound.plan(two_routes(), ipv6=True))
    for table, chain in (("filter", "INPUT"), ("filter", "FORWARD"), ("nat", "PREROUTING")):
        targets = [r.target for r in rs.chain_rules(table, chain)]
        assert targets[0].endswith(("-INB", "-DNAT")), (chain, targets)
    forward = [r.describe() for r in rs.chain_rules("filter", "FORWARD")]
    assert forward.index("-A FORWARD -o pnhabcdef01 -j PANO-ABCDEF01-INB") < \
        forward.index("-A FORWARD -o pnhabcdef01 -j PANO-ABCDEF01-FWD")
    # IPv6: the plain route (IPv4 only) is absent, the web route goes to [J6]:960.
    lines = rs.describe()
    assert "-A PANO-ABCDEF01-DNAT -d ::1/128 -j RETURN" in lines
    assert any("--to-destination [fd7a::2]:960" in x for x in lines)
    assert not any("961" in x for x in lines)


def test_specific_listen_address_is_matched():
    (r,) = routes('listen = "203.0.113.7:443"\nto = 8443\nallow_from = ["0.0.0.0/0"]\n')
    lines = host(4, inbound.plan((r,), ipv6=True)).describe()
    assert any(x.startswith("-A PANO-ABCDEF01-DNAT -d 203.0.113.7/32 -p tcp") for x in lines)
    # Nothing of it in IPv6.
    assert host(6, inbound.plan((r,), ipv6=True)).describe() == host(6, ()).describe()


def test_without_routes_the_host_rules_are_unchanged():
    base = rules.host_rules(4, tag=TAG, veth_host=VETH, subnet="10.231.0.0/29", dns_servers=[])
    assert inbound.with_host_rules(base, (), veth_host=VETH, jail=J4) is base


def test_veth_prefix_matches_every_instance():
    assert Names.of("anything").veth_host.startswith(inbound.VETH_HOST_PREFIX)


def test_jail_rules_accept_listeners_from_the_veth_only_and_refuse_loopback():
    pubs = inbound.plan(two_routes(), ipv6=True)
    rs = rules.jail_rules(4, proxy_uid=998, transparent_port=901, dns_port=953,
                          dns_servers=[], inbound=inbound.jail_inbound(pubs, 4), veth="pnjx")
    lines = rs.describe()
    assert "-A INPUT -s 203.0.113.0/24 -i pnjx -p tcp -m tcp --dport 960 -j ACCEPT" in lines
    assert "-A INPUT -s 198.51.100.0/24 -i pnjx -p tcp -m tcp --dport 961 -j ACCEPT" in lines
    out = [r.describe() for r in rs.chain_rules("filter", "OUTPUT")]
    refuse = "-A OUTPUT -o lo -p tcp -m tcp --dport 960 -j REJECT --reject-with tcp-reset"
    assert out.index(refuse) < out.index("-A OUTPUT -o lo -j ACCEPT")
    assert out[0] == "-A OUTPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
    six = rules.jail_rules(6, proxy_uid=998, transparent_port=901, dns_port=953,
                           dns_servers=[], inbound=inbound.jail_inbound(pubs, 6), veth="pnjx")
    assert [r.src for r in six.chain_rules("filter", "INPUT") if r.src] == ["2001:db8::/32"]


def test_jail_rules_refuse_bad_inbound():
    kw = dict(proxy_uid=998, transparent_port=901, dns_port=953, dns_servers=[])
    with pytest.raises(rules.RuleError):
        rules.jail_rules(4, **kw, inbound=((960, ["0.0.0.0/0"]),))  # no veth
    with pytest.raises(rules.RuleError):
        rules.jail_rules(4, **kw, inbound=((901, ["0.0.0.0/0"]),), veth="pnjx")


@pytest.mark.parametrize("dest,family,ok", [
    ("10.0.0.2:960", 4, True), ("[fd7a::2]:960", 6, True), ("[fd7a::2]:960", 4, False),
    ("10.0.0.2:960", 6, False), ("10.0.0.2", 4, False), ("10.0.0.2:0", 4, False),
    ("[10.0.0.2]:1", 4, False), ("010.0.0.2:1", 4, False),
])
def test_dnat_destination_is_validated(dest, family, ok):
    chain = "PANO-ABCDEF01-DNAT"

    def build():
        r = rules.Rule("nat", chain, "DNAT", protocol="tcp",
                       target_args=(("to-destination", dest),))
        rules.RuleSet(family, rules=(r,), chains=(("nat", chain),), tag=TAG)

    if ok:
        build()
    else:
        with pytest.raises(rules.RuleError):
            build()


def test_addrtype_and_dnat_are_checked():
    with pytest.raises(rules.RuleError):
        rules.Rule("nat", "OUTPUT", "RETURN", matches=(("addrtype", (("dst-type", "LOKAL"),)),))
    with pytest.raises(rules.RuleError):  # DNAT with a port needs tcp
        rules.Rule("nat", "OUTPUT", "DNAT", target_args=(("to-destination", "10.0.0.2:1"),))
    with pytest.raises(rules.RuleError):
        rules.Rule("filter", "OUTPUT", "DNAT", protocol="tcp",
                   target_args=(("to-destination", "10.0.0.2:1"),))


# --- host listeners ------------------------------------------------------------------

PROC_TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:01BB 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1
   1: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2
   2: 0200A8C0:0050 0100A8C0:D431 01 00000000:00000000 00:00000000 00000000     0        0 3
"""
PROC_TCP6 = """\
  sl  local_address                         remote_address                        st
   0: 00000000000000000000000001000000:1F91 00000000000000000000000000000000:0000 0A
   1: B80D0120000000000000000007000000:01BB 00000000000000000000000000000000:0000 0A
"""


def test_proc_net_tcp_parsing():
    assert inbound.parse_proc_net_tcp(PROC_TCP, 4) == {443: ["0.0.0.0"], 8080: ["127.0.0.1"]}
    assert inbound.parse_proc_net_tcp(PROC_TCP6, 6) == {8081: ["::1"], 443: ["2001:db8::7"]}


def test_shadowed_host_services_are_reported():
    pubs = inbound.plan(two_routes(), ipv6=True)
    warnings = inbound.shadowed(pubs, {443: ["0.0.0.0"], 8080: ["127.0.0.1"]})
    assert len(warnings) == 1 and "'web'" in warnings[0] and "0.0.0.0:443" in warnings[0]
    (r,) = routes('listen = "203.0.113.7:443"\nto = 8443\nallow_from = ["0.0.0.0/0"]\n')
    one = inbound.plan((r,), ipv6=True)
    assert inbound.shadowed(one, {443: ["203.0.113.8"]}) == []
    assert inbound.shadowed(one, {443: ["203.0.113.7"]})
