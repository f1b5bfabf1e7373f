"""ProxySpec.options: what each proxy worker is handed (no process is started)."""

from __future__ import annotations

import dataclasses

from panopticond.plan import Names
from panopticond.proxy import ProxySpec


def spec(**kw) -> ProxySpec:
    return ProxySpec(names=Names.of("pnt-proxy"), uid=998, gid=998, confdir="/c",
                     policy_path="/p", log_path="/l", dns_servers=("198.51.100.53",),
                     ipv6=True, upstream_ca=None, inbound_modes=("reverse:https://x@8443",),
                     **kw)


def test_one_worker_is_as_it_always_was():
    o = spec().options()
    assert o["mitmproxy"]["mode"] == [
        "transparent@127.0.0.1:901", "dns@127.0.0.1:953", "transparent@::1:901",
        "dns@::1:953", "reverse:https://x@8443"]
    assert "panopticon_worker" not in o["panopticon"]
    assert "panopticon_pins_socket" not in o["panopticon"]
    assert spec().suffix == ""


def test_worker_0_answers_dns_and_serves_the_pins_and_inbound_routes():
    s = spec(workers=2, pins_socket="/run/x/pins/pins.sock")
    o = s.options()
    assert o["mitmproxy"]["mode"][:4] == [
        "transparent@127.0.0.1:901", "dns@127.0.0.1:953", "transparent@::1:901",
        "dns@::1:953"]
    assert "reverse:https://x@8443" in o["mitmproxy"]["mode"]
    assert o["panopticon"]["panopticon_worker"] == 0
    assert o["panopticon"]["panopticon_pins_socket"] == "/run/x/pins/pins.sock"


def test_other_workers_have_their_own_port_only():
    s = dataclasses.replace(spec(workers=3, pins_socket="/s"), worker=2)
    o = s.options()
    assert o["mitmproxy"]["mode"] == ["transparent@127.0.0.1:903", "transparent@::1:903"]
    assert "block_global" not in o["mitmproxy"]
    assert o["panopticon"]["panopticon_worker"] == 2
    assert o["mitmproxy"]["confdir"] == "/c" and o["panopticon"]["panopticon_log"] == "/l"
    assert s.suffix == "-2"
