"""The rule plan: assertions on the data, no iptables."""

from __future__ import annotations

import ipaddress

import pytest

from panopticond import rules
from panopticond.rules import Rule, RuleError, RuleSet

P, T, D = 998, 15001, 15053
DNS = ["198.51.100.53", "2001:db8::53"]
DOC = ["192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32"]


def jail(family: int, **kw) -> RuleSet:
    args = dict(proxy_uid=P, transparent_port=T, dns_port=D, dns_servers=DNS)
    return rules.jail_rules(family, **(args | kw))


def host(family: int, **kw) -> RuleSet:
    args = dict(
        tag="0a1b2c3d",
        veth_host="pnh-0a1b2c3d",
        subnet="10.231.0.0/30" if family == 4 else "fd42:0:0:1::/64",
        dns_servers=["10.0.0.2", "2001:db8::53"],
    )
    return rules.host_rules(family, **(args | kw))


def lines(rs: RuleSet, table: str, chain: str) -> list[str]:
    return [r.describe() for r in rs.chain_rules(table, chain)]


def index(rs: RuleSet, table: str, chain: str, text: str) -> int:
    found = [i for i, line in enumerate(lines(rs, table, chain)) if text in line]
    assert len(found) == 1, (text, found)
    return found[0]


UID = f"-m owner --uid-owner {P}"


@pytest.mark.parametrize("family", [4, 6])
class TestJail:
    def test_filter_policies_drop_and_output_ends_in_reject(self, family):
        rs = jail(family)
        for chain in ("INPUT", "FORWARD", "OUTPUT"):
            assert rs.policies[("filter", chain)] == "DROP"
        unreach = "icmp-port-unreachable" if family == 4 else "icmp6-port-unreachable"
        assert lines(rs, "filter", "OUTPUT")[-2:] == [
            "-A OUTPUT -p tcp -j REJECT --reject-with tcp-reset",
            f"-A OUTPUT -j REJECT --reject-with {unreach}",
        ]
        assert lines(rs, "filter", "FORWARD") == []

    def test_nat_order(self, family):
        # The proxy uid is exempt before anything else; DNS is redirected before the
        # loopback RETURN (a stub resolver on 127.0.0.53 would escape otherwise).
        assert lines(jail(family), "nat", "OUTPUT") == [
            f"-A OUTPUT {UID} -j RETURN",
            f"-A OUTPUT -p udp -m udp --dport 53 -j REDIRECT --to-ports {D}",
            f"-A OUTPUT -p tcp -m tcp --dport 53 -j REDIRECT --to-ports {D}",
            "-A OUTPUT -o lo -j RETURN",
            f"-A OUTPUT -p tcp -m tcp --dport 80 -j REDIRECT --to-ports {T}",
            f"-A OUTPUT -p tcp -m tcp --dport 443 -j REDIRECT --to-ports {T}",
        ]

    def test_listeners_refused_before_loopback_and_dnat_accept(self, family):
        rs = jail(family)
        out = lines(rs, "filter", "OUTPUT")
        lo = out.index("-A OUTPUT -o lo -j ACCEPT")
        dnat = out.index("-A OUTPUT -m conntrack --ctstate DNAT -j ACCEPT")
        assert lo < dnat
        for proto, port in (("tcp", T), ("udp", D), ("tcp", D)):
            head = f"-A OUTPUT -o lo -p {proto} -m {proto} --dport {port} "
            for who in ("-m conntrack ! --ctstate DNAT", UID):
                i = [j for j, line in enumerate(out) if line.startswith(head + who + " -j REJECT")]
                assert len(i) == 1 and i[0] < lo, (head, who)

    def test_proxy_uid_order(self, family):
        rs = jail(family)
        out = lines(rs, "filter", "OUTPUT")
        dns = [i for i, line in enumerate(out) if UID in line and "--dport 53 -j ACCEPT" in line]
        blocked = [
            i for i, line in enumerate(out) if UID in line and "-d " in line and "REJECT" in line
        ]
        web = [i for i, line in enumerate(out) if UID in line and "--dport 80 -j ACCEPT" in line]
        web += [i for i, line in enumerate(out) if UID in line and "--dport 443 -j ACCEPT" in line]
        assert len(dns) == 2 and len(web) == 2
        assert len(blocked) == 2 * len(rules.BLOCKED_RANGES[family])  # TCP reset, then the rest
        assert max(dns) < min(blocked) and max(blocked) < min(web)
        quic = index(rs, "filter", "OUTPUT", "-p udp -m udp --dport 443 -j REJECT")
        assert max(web) < quic

    def test_dns_servers_of_this_family_only(self, family):
        out = "\n".join(lines(jail(family), "filter", "OUTPUT"))
        mine, other = ("198.51.100.53/32", "2001:db8::53/128")[:: 1 if family == 4 else -1]
        assert out.count(f"-d {mine} ") == 2 and other not in out

    def test_no_documentation_range_is_blocked(self, family):
        for rs in (jail(family), host(family)):
            for rule in rs.rules:
                if rule.target == "REJECT" and rule.dst:
                    net = ipaddress.ip_network(rule.dst)
                    for doc in DOC:
                        d = ipaddress.ip_network(doc)
                        assert d.version != net.version or not net.overlaps(d), rule.describe()

    def test_blocked_ranges_parameter(self, family):
        only = ["10.0.0.0/8", "fc00::/7"]
        rs = jail(family, blocked_ranges=only)
        blocked = [
            r.dst for r in rs.chain_rules("filter", "OUTPUT") if r.dst and r.target == "REJECT"
        ]
        assert blocked == [only[0] if family == 4 else only[1]] * 2

    def test_blocked_tcp_gets_reset(self, family):
        out = lines(jail(family), "filter", "OUTPUT")
        for net in rules.BLOCKED_RANGES[family]:
            mine = [line for line in out if f"-d {net} " in line]
            assert mine[0].endswith("-j REJECT --reject-with tcp-reset") and "-p tcp" in mine[0]
            assert "-p " not in mine[1] and "-j REJECT" in mine[1]

    def test_established_accepted_first(self, family):
        rs = jail(family)
        assert "--ctstate RELATED,ESTABLISHED -j ACCEPT" in lines(rs, "filter", "OUTPUT")[0]
        assert lines(rs, "filter", "INPUT")[:2] == [
            "-A INPUT -i lo -j ACCEPT",
            "-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        ]

    def test_neighbour_discovery(self, family):
        rs = jail(family)
        text = "\n".join(lines(rs, "filter", "INPUT") + lines(rs, "filter", "OUTPUT"))
        if family == 4:
            assert "-p icmp" not in text
        else:
            for chain, types in (
                ("INPUT", ("134", "135", "136")),
                ("OUTPUT", ("133", "135", "136")),
            ):
                for t in types:
                    assert f"-A {chain} -p icmpv6 -m icmp6 --icmpv6-type {t} -j ACCEPT" in text

    def test_describe(self, family):
        text = "\n".join(jail(family).describe())
        assert "*filter\n:INPUT DROP\n:FORWARD DROP\n:OUTPUT DROP\n" in text
        assert "*nat\n:PREROUTING ACCEPT" in text
        assert text.count("COMMIT") == 2


class TestJailArguments:
    @pytest.mark.parametrize(
        "kw",
        [
            {"proxy_uid": -1},
            {"proxy_uid": "998"},
            {"transparent_port": 0},
            {"dns_port": 70000},
            {"dns_port": T},
            {"dns_servers": ["not-an-ip"]},
            {"blocked_ranges": ["10.0.0.1/8"]},
        ],
    )
    def test_rejected(self, kw):
        with pytest.raises(RuleError):
            jail(4, **kw)

    def test_family(self):
        with pytest.raises(RuleError):
            jail(5)


@pytest.mark.parametrize("family", [4, 6])
class TestHost:
    def test_only_our_chains_and_jumps(self, family):
        rs = host(family)
        prefix = "PANO-0A1B2C3D-"
        assert rs.tag == "0A1B2C3D"
        assert rs.chains == (
            ("filter", prefix + "IN"),
            ("filter", prefix + "FWD"),
            ("nat", prefix + "NAT"),
        )
        assert rs.policies == {}
        assert all(len(c) <= rules.MAX_CHAIN_NAME for _, c in rs.chains)
        builtin = [r for r in rs.rules if r.chain in rules.BUILTIN_CHAINS[r.table]]
        assert [r.describe() for r in builtin] == [
            f"-A INPUT -i {rs.rules[0].in_iface} -j {prefix}IN",
            f"-A FORWARD -i {rs.rules[0].in_iface} -j {prefix}FWD",
            f"-A FORWARD -o {rs.rules[0].in_iface} -j {prefix}FWD",
            f"-A POSTROUTING -s {host(family).rules[3].src} -j {prefix}NAT",
        ]
        assert all(r.target.startswith(prefix) for r in builtin)

    def test_in_chain(self, family):
        rs = host(family)
        out = lines(rs, "filter", "PANO-0A1B2C3D-IN")
        assert out[-2:] == [
            "-A PANO-0A1B2C3D-IN -p tcp -j REJECT --reject-with tcp-reset",
            "-A PANO-0A1B2C3D-IN -j REJECT --reject-with "
            + ("icmp-port-unreachable" if family == 4 else "icmp6-port-unreachable"),
        ]
        dns = "10.0.0.2/32" if family == 4 else "2001:db8::53/128"
        assert sum(f"-d {dns} " in line and "--dport 53 -j ACCEPT" in line for line in out) == 2
        nd = [line for line in out if "icmpv6-type" in line]
        assert len(nd) == (3 if family == 6 else 0)

    def test_fwd_chain_order(self, family):
        rs = host(family)
        out = lines(rs, "filter", "PANO-0A1B2C3D-FWD")
        assert "-o pnh-0a1b2c3d -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT" in out[0]
        dns = [i for i, line in enumerate(out) if "--dport 53 -j ACCEPT" in line]
        blocked = [i for i, line in enumerate(out) if "-d " in line and "REJECT" in line]
        web = [
            i
            for i, line in enumerate(out)
            if "--dport 80 -j ACCEPT" in line or "--dport 443 -j ACCEPT" in line
        ]
        assert len(blocked) == len(rules.BLOCKED_RANGES[family])
        assert max(dns) < min(blocked) < max(blocked) < min(web)
        assert all("-i pnh-0a1b2c3d " in out[i] for i in dns + blocked + web)
        assert out[-1].startswith("-A PANO-0A1B2C3D-FWD -j REJECT")

    def test_masquerade(self, family):
        rs = host(family)
        subnet = "10.231.0.0/30" if family == 4 else "fd42:0:0:1::/64"
        assert lines(rs, "nat", "PANO-0A1B2C3D-NAT") == [
            f"-A PANO-0A1B2C3D-NAT -s {subnet} ! -o pnh-0a1b2c3d -j MASQUERADE"
        ]

    def test_describe_shows_inserts(self, family):
        text = "\n".join(host(family).describe())
        assert "-I FORWARD 2 -o pnh-0a1b2c3d -j PANO-0A1B2C3D-FWD" in text
        assert ":INPUT" not in text  # host policies are not ours

    def test_bad_arguments(self, family):
        for kw in (
            {"tag": "xyz"},
            {"tag": "0a1b2c3d0"},
            {"subnet": "10.231.0.1/30"},
            {"subnet": "fd42::/64" if family == 4 else "10.0.0.0/8"},
            {"veth_host": "a-name-far-too-long"},
        ):
            with pytest.raises(RuleError):
                host(family, **kw)


class TestRuleValidation:
    def test_valid(self):
        r = Rule(
            "filter",
            "OUTPUT",
            "REJECT",
            protocol="tcp",
            dst="10.0.0.0/8",
            matches=(("owner", (("uid-owner", "998"),)),),
            target_args=(("reject-with", "tcp-reset"),),
        )
        assert r.describe() == (
            "-A OUTPUT -d 10.0.0.0/8 -p tcp -m owner --uid-owner 998"
            " -j REJECT --reject-with tcp-reset"
        )

    @pytest.mark.parametrize(
        "kw",
        [
            dict(table="mangle", chain="OUTPUT", target="ACCEPT"),
            dict(table="filter", chain="OUPTUT", target="ACCEPT"),
            dict(table="filter", chain="OUTPUT", target="ACCPET"),
            dict(table="nat", chain="OUTPUT", target="DROP"),
            dict(
                table="filter", chain="OUTPUT", target="REDIRECT", target_args=(("to-ports", "1"),)
            ),
            dict(
                table="nat",
                chain="POSTROUTING",
                target="REDIRECT",
                target_args=(("to-ports", "1"),),
            ),
            dict(table="nat", chain="OUTPUT", target="REDIRECT"),
            dict(table="nat", chain="OUTPUT", target="REDIRECT", target_args=(("to-port", "1"),)),
            dict(
                table="nat", chain="OUTPUT", target="REDIRECT", target_args=(("to-ports", "99999"),)
            ),
            dict(table="filter", chain="OUTPUT", target="REJECT"),
            dict(
                table="filter",
                chain="OUTPUT",
                target="REJECT",
                target_args=(("reject-with", "tcp-rst"),),
            ),
            dict(
                table="filter",
                chain="OUTPUT",
                target="REJECT",
                target_args=(("reject-with", "tcp-reset"),),
            ),
            dict(table="filter", chain="OUTPUT", target="ACCEPT", protocol="tpc"),
            dict(table="filter", chain="OUTPUT", target="ACCEPT", dst="10.0.0.1/8"),
            dict(table="filter", chain="OUTPUT", target="ACCEPT", dst="example.com"),
            dict(table="filter", chain="OUTPUT", target="ACCEPT", in_iface="lo"),
            dict(table="filter", chain="INPUT", target="ACCEPT", out_iface="lo"),
            dict(table="filter", chain="OUTPUT", target="ACCEPT", out_iface="a/b"),
            dict(
                table="filter",
                chain="OUTPUT",
                target="ACCEPT",
                matches=(("ownr", (("uid-owner", "1"),)),),
            ),
            dict(
                table="filter",
                chain="OUTPUT",
                target="ACCEPT",
                matches=(("owner", (("uid_owner", "1"),)),),
            ),
            dict(
                table="filter",
                chain="OUTPUT",
                target="ACCEPT",
                matches=(("owner", (("uid-owner", "root"),)),),
            ),
            dict(table="filter", chain="OUTPUT", target="ACCEPT", matches=(("owner", ()),)),
            dict(
                table="filter",
                chain="OUTPUT",
                target="ACCEPT",
                matches=(("tcp", (("dport", "80"),)),),
            ),
            dict(
                table="filter",
                chain="OUTPUT",
                target="ACCEPT",
                protocol="udp",
                matches=(("tcp", (("dport", "80"),)),),
            ),
            dict(
                table="filter",
                chain="OUTPUT",
                target="ACCEPT",
                protocol="tcp",
                matches=(("tcp", (("dport", "80"), ("dport", "81"))),),
            ),
            dict(
                table="filter",
                chain="OUTPUT",
                target="ACCEPT",
                matches=(("conntrack", (("ctstate", "ESTABLISHED,BOGUS"),)),),
            ),
            dict(table="filter", chain="OUTPUT", target="ACCEPT", matches=("owner",)),
            dict(table="filter", chain="OUTPUT", target="ACCEPT", target_args=(("x", "y"),)),
            dict(table="filter", chain="OUTPUT", target="PANO-X", target_args=(("x", "y"),)),
            dict(table="filter", chain="PANO-" + "X" * 30, target="ACCEPT"),
        ],
    )
    def test_invalid_field_raises(self, kw):
        with pytest.raises(RuleError):
            Rule(**kw)

    def test_canonical_values(self):
        r = Rule(
            "filter",
            "OUTPUT",
            "ACCEPT",
            src="!10.1.2.3",
            dst="2001:DB8::/32",
            matches=(("conntrack", (("ctstate", "ESTABLISHED,RELATED"),)),),
        )
        assert r.src == "!10.1.2.3/32" and r.dst == "2001:db8::/32"
        assert r.matches == (("conntrack", (("ctstate", "RELATED,ESTABLISHED"),)),)
        assert "! -s 10.1.2.3/32" in r.describe()

    def test_negated_match_value(self):
        r = Rule("filter", "OUTPUT", "ACCEPT", matches=(("conntrack", (("ctstate", "!DNAT"),)),))
        assert r.describe() == "-A OUTPUT -m conntrack ! --ctstate DNAT -j ACCEPT"

    def test_frozen(self):
        r = Rule("filter", "OUTPUT", "ACCEPT")
        with pytest.raises(AttributeError):
            r.target = "DROP"  # type: ignore[misc]


class TestRuleSetValidation:
    def test_wrong_family_address(self):
        with pytest.raises(RuleError, match="not an IPv6"):
            RuleSet(6, rules=(Rule("filter", "OUTPUT", "ACCEPT", dst="10.0.0.0/8"),))

    def test_wrong_family_reject(self):
        r = Rule(
            "filter", "OUTPUT", "REJECT", target_args=(("reject-with", "icmp-port-unreachable"),)
        )
        with pytest.raises(RuleError):
            RuleSet(6, rules=(r,))

    def test_icmp_protocols(self):
        with pytest.raises(RuleError):
            RuleSet(4, rules=(Rule("filter", "OUTPUT", "ACCEPT", protocol="icmpv6"),))
        with pytest.raises(RuleError):
            RuleSet(6, rules=(Rule("filter", "OUTPUT", "ACCEPT", protocol="icmp"),))

    def test_undeclared_chain(self):
        with pytest.raises(RuleError, match="not declared"):
            RuleSet(4, rules=(Rule("filter", "INPUT", "PANO-X-IN"),))
        with pytest.raises(RuleError, match="not declared"):
            RuleSet(4, rules=(Rule("filter", "PANO-X-IN", "ACCEPT"),))
        with pytest.raises(RuleError, match="not declared"):
            RuleSet(
                4, chains=(("nat", "PANO-X-IN"),), rules=(Rule("filter", "INPUT", "PANO-X-IN"),)
            )

    def test_tagged_set_is_confined(self):
        with pytest.raises(RuleError):
            RuleSet(4, tag="0a1b2c3d", chains=(("filter", "PANO-FFFFFFFF-IN"),))
        with pytest.raises(RuleError):
            RuleSet(4, tag="0a1b2c3d", rules=(Rule("filter", "INPUT", "ACCEPT"),))
        with pytest.raises(RuleError):
            RuleSet(4, tag="0a1b2c3d", policies={("filter", "INPUT"): "DROP"})

    def test_policies(self):
        with pytest.raises(RuleError):
            RuleSet(4, policies={("nat", "OUTPUT"): "DROP"})
        with pytest.raises(RuleError):
            RuleSet(4, policies={("filter", "OUTPUT"): "REJECT"})
        with pytest.raises(RuleError):
            RuleSet(4, policies={("filter", "PANO-X"): "DROP"})

    def test_tables_filter_first(self):
        assert jail(4).tables == ("filter", "nat")
        assert rules.killswitch(6).tables == ("filter",)

    def test_picklable(self):
        import pickle

        rs = jail(6)
        assert pickle.loads(pickle.dumps(rs)) == rs


def test_killswitch():
    ks = rules.killswitch(4)
    assert set(ks.policies.values()) == {"DROP"} and len(ks.policies) == 3
    assert [r.describe() for r in ks.rules] == [
        "-A INPUT -i lo -j ACCEPT",
        "-A OUTPUT -o lo -j ACCEPT",
    ]


def test_chain_prefix():
    assert rules.chain_prefix("deadbeef") == "PANO-DEADBEEF-"
    with pytest.raises(RuleError):
        rules.chain_prefix("PANO-X")


# -- port rules and operator networks (destinations.py, addresses.py) --------------------

@pytest.mark.parametrize("family", [4, 6])
def test_tcp_rule_ports_are_redirected_and_let_out_for_the_proxy_only(family):
    rs = jail(family, tcp_ports=[2222, 22, 22])
    nat = lines(rs, "nat", "OUTPUT")
    assert nat[-3:] == [
        f"-A OUTPUT -p tcp -m tcp --dport {p} -j REDIRECT --to-ports {T}" for p in (443, 22, 2222)]
    out = lines(rs, "filter", "OUTPUT")
    for p in (22, 2222):
        accept = index(rs, "filter", "OUTPUT", f"{UID} -m tcp --dport {p} -j ACCEPT")
        # After every blocked range: an allowed port never opens a private address.
        assert accept > max(i for i, line in enumerate(out) if "-d 10.0.0.0/8" in line
                            or "-d fc00::/7" in line)
    hs = host(family, tcp_ports=[22])
    assert "-A PANO-0A1B2C3D-FWD -i pnh-0a1b2c3d -p tcp -m tcp --dport 22 -j ACCEPT" in lines(
        hs, "filter", "PANO-0A1B2C3D-FWD")
    assert jail(family).describe() == jail(family, tcp_ports=()).describe()


@pytest.mark.parametrize("port", [53, 80, 443, 0, 70000])
def test_tcp_rule_ports_exclude_what_is_handled_already(port):
    with pytest.raises(RuleError):
        jail(4, tcp_ports=[port])
    with pytest.raises(RuleError):
        host(4, tcp_ports=[port])


def test_an_operator_network_is_cut_out_of_the_blocked_ranges_at_both_ends():
    from panopticond.addresses import blocked_networks, parse_network

    blocked = blocked_networks(4, [parse_network("10.99.0.0/24")],
                               [ipaddress.ip_network("203.0.113.2/32")])
    for rs, chain in ((jail(4, blocked_ranges=blocked), "OUTPUT"),
                      (host(4, blocked_ranges=blocked), "PANO-0A1B2C3D-FWD")):
        text = "\n".join(lines(rs, "filter", chain))
        assert "-d 10.99.0.0/24" not in text and "-d 10.99.1.0/24" in text
        assert "-d 203.0.113.2/32" in text and "-d 10.0.0.0/8" not in text


# -- proxy workers (proxy_workers): one REDIRECT per worker, spread per connection -------

def _nth(every: int) -> str:
    return f"-m statistic --every {every} --mode nth --packet 0"


@pytest.mark.parametrize("family", [4, 6])
def test_one_worker_is_the_plan_of_old(family):
    assert jail(family, workers=1).describe() == jail(family).describe()
    assert "statistic" not in "\n".join(jail(family).describe())


@pytest.mark.parametrize("family", [4, 6])
def test_each_redirected_port_goes_to_every_worker_in_turn(family):
    rs = jail(family, workers=3, tcp_ports=[22])
    nat = lines(rs, "nat", "OUTPUT")
    for port in (80, 443, 22):
        assert [line for line in nat if f"--dport {port} " in line] == [
            f"-A OUTPUT -p tcp -m tcp --dport {port} {_nth(3)} -j REDIRECT --to-ports {T}",
            f"-A OUTPUT -p tcp -m tcp --dport {port} {_nth(2)} -j REDIRECT --to-ports {T + 1}",
            # The last takes the rest unconditionally: nothing falls through unproxied.
            f"-A OUTPUT -p tcp -m tcp --dport {port} -j REDIRECT --to-ports {T + 2}",
        ]
    # DNS goes to the one DNS listener; the uid and loopback exemptions are unchanged.
    assert nat[:4] == lines(jail(family), "nat", "OUTPUT")[:4]


@pytest.mark.parametrize("workers", range(1, 9))
def test_the_spread_is_even_for_any_count(workers):
    # The kernel's nth match: a counter per rule, over the packets that reach the rule.
    counters = [0] * workers
    got = [0] * workers
    for _ in range(workers * 100):
        for i, extra in enumerate(rules.spread(workers)):
            if not extra:
                got[i] += 1
                break
            params = dict(extra[0][1])
            every, packet = int(params["every"]), int(params["packet"])
            hit = counters[i] % every == packet
            counters[i] += 1
            if hit:
                got[i] += 1
                break
    assert got == [100] * workers


@pytest.mark.parametrize("family", [4, 6])
def test_every_worker_port_is_closed_to_direct_and_proxy_user_connections(family):
    rs = jail(family, workers=2)
    for port in (T, T + 1):
        for who in ("-m conntrack ! --ctstate DNAT", UID):
            rule = f"-A OUTPUT -o lo -p tcp -m tcp --dport {port} {who} -j REJECT"
            i = index(rs, "filter", "OUTPUT", rule)
            assert i < index(rs, "filter", "OUTPUT", "-A OUTPUT -o lo -j ACCEPT")
    # No third port: nothing else became reachable.
    assert not [ln for ln in lines(rs, "filter", "OUTPUT") if f"--dport {T + 2}" in ln]
    assert lines(rs, "filter", "INPUT") == lines(jail(family), "filter", "INPUT")


@pytest.mark.parametrize("kw", [
    {"workers": 0}, {"workers": True}, {"workers": "2"},
    {"workers": 4, "transparent_port": 15050},  # 15053 would be a worker's and DNS's
    {"workers": 2, "inbound": [(15002, ["0.0.0.0/0"])], "veth": "pnj-0a1b2c3d"},
])
def test_bad_worker_plans(kw):
    with pytest.raises(RuleError):
        jail(4, **kw)


@pytest.mark.parametrize("params", [
    (("mode", "random"), ("every", "2"), ("packet", "0")),
    (("mode", "nth"), ("every", "2")),
    (("mode", "nth"), ("every", "1"), ("packet", "0")),
    (("mode", "nth"), ("every", "2"), ("packet", "2")),
    (("mode", "nth"), ("every", "!2"), ("packet", "0")),
    (("mode", "nth"), ("every", "2"), ("packet", "0"), ("probability", "0.5")),
])
def test_the_statistic_match_is_nth_whole_or_refused(params):
    with pytest.raises(RuleError):
        Rule("nat", "OUTPUT", "REDIRECT", protocol="tcp",
             matches=(("statistic", params),), target_args=(("to-ports", "15001"),))
