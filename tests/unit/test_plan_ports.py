"""The proxy's ports in the jail (plan.py, inbound.py): all below 1024, and distinct."""

from __future__ import annotations

from panopticond.inbound import BASE_PORT, MAX_ROUTES, UNPRIVILEGED_PORT_START
from panopticond.plan import DNS_PORT, MAX_WORKER_PORTS, TRANSPARENT_PORT, transparent_ports


def test_every_proxy_port_is_privileged_and_none_is_shared():
    # Below 1024 the agent (no capabilities) cannot bind a port even while the proxy is
    # down (threats.md 41); the proxy keeps CAP_NET_BIND_SERVICE for them (privs.py).
    workers = transparent_ports(MAX_WORKER_PORTS)
    routes = tuple(range(BASE_PORT, BASE_PORT + MAX_ROUTES))
    ports = (*workers, DNS_PORT, *routes)
    assert max(ports) < UNPRIVILEGED_PORT_START == 1024
    assert min(ports) > 0 and len(set(ports)) == len(ports)
    assert workers[0] == TRANSPARENT_PORT
