"""The lab: a simulated internet in network namespaces, for integration tests and the demo.

See `topology` for the picture. Typical use:

    with Lab.create() as lab:
        mark = lab.mark()
        lab.host_exec(["curl", "-sS", "http://www.allowed.example/"], check=True)
        assert lab.events("http", since=mark, server_ip="198.51.100.10")
"""

from panopticond.lab.topology import (
    DEFAULT_NAMES,
    DNS_NAME,
    HOST_V4,
    HOST_V6,
    PORTS,
    ROUTER_V4,
    ROUTER_V6,
    Lab,
    cleanup_stale,
)

__all__ = [
    "DEFAULT_NAMES",
    "DNS_NAME",
    "HOST_V4",
    "HOST_V6",
    "PORTS",
    "ROUTER_V4",
    "ROUTER_V6",
    "Lab",
    "cleanup_stale",
]
