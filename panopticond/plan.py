"""What a start of an instance would do, as data: names, addresses, ports.

Pure. Everything that a crashed run could leave behind is named from the instance name
alone (`Names`), so `panopticon cleanup NAME` can rebuild every handle without state.
Interface names have at most 15 characters, chain names at most 28: both carry a short
hash of the instance name instead of the name itself.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import re
from collections.abc import Iterable

from .errors import PanopticonError

INSTANCE_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")

# Inside the instance namespace, so fixed values never collide between instances. Below
# 1024: the agent, with no capability, cannot bind them, not even while the proxy is
# down (threats.md 41); the proxy keeps CAP_NET_BIND_SERVICE alone (privs.py).
TRANSPARENT_PORT = 901
DNS_PORT = 953
# Proxy worker i (config `proxy_workers`) listens on TRANSPARENT_PORT + i; worker 0 alone
# answers DNS. At most config.MAX_PROXY_WORKERS, well below DNS_PORT.
MAX_WORKER_PORTS = 8


def transparent_ports(workers: int) -> tuple[int, ...]:
    """The transparent ports of `workers` proxy workers, worker 0's first."""
    if not 1 <= workers <= MAX_WORKER_PORTS:
        raise ValueError(f"1 to {MAX_WORKER_PORTS} proxy workers, not {workers}")
    return tuple(TRANSPARENT_PORT + i for i in range(workers))

# Sizes carved from the pools: a /29 leaves room for the two ends and later helpers.
V4_PREFIX = 29
V6_PREFIX = 64

RUN_DIR = "/run/panopticon"
STATE_DIR = "/var/lib/panopticon"
LOG_DIR = "/var/log/panopticon"


@dataclasses.dataclass(frozen=True)
class Names:
    instance: str
    tag: str  # 8 hex characters, stable for the instance name
    netns: str
    veth_host: str
    veth_jail: str
    run_dir: str
    state_dir: str
    log_dir: str

    @classmethod
    def of(cls, instance: str) -> Names:
        if not INSTANCE_NAME.fullmatch(instance):
            raise PanopticonError(
                f"invalid instance name {instance!r}",
                hint="use 1-32 characters: lower-case letters, digits, '-' and '_'",
            )
        tag = hashlib.sha256(instance.encode()).hexdigest()[:8]
        return cls(
            instance=instance,
            tag=tag,
            netns=f"panopticon-{instance}",
            veth_host=f"pnh{tag}",
            veth_jail=f"pnj{tag}",
            run_dir=f"{RUN_DIR}/{instance}",
            state_dir=f"{STATE_DIR}/{instance}",
            log_dir=f"{LOG_DIR}/{instance}",
        )


@dataclasses.dataclass(frozen=True)
class Addressing:
    v4_subnet: ipaddress.IPv4Network
    v4_host: ipaddress.IPv4Address
    v4_jail: ipaddress.IPv4Address
    v6_subnet: ipaddress.IPv6Network | None  # None: the agent has no IPv6 at all
    v6_host: ipaddress.IPv6Address | None
    v6_jail: ipaddress.IPv6Address | None


Net = ipaddress.IPv4Network | ipaddress.IPv6Network


def _candidates(pool: Net, prefix: int, tag: str) -> Iterable[Net]:
    # Start at a place derived from the tag so that instances rarely probe the same
    # blocks, and a restart of one instance tends to get its old subnet back.
    count = 2 ** (prefix - pool.prefixlen)
    start = int(tag, 16) % count
    step = 2 ** (pool.max_prefixlen - prefix)
    base = int(pool.network_address)
    for i in range(min(count, 65536)):
        idx = (start + i) % count
        yield ipaddress.ip_network((base + idx * step, prefix))


def choose_addressing(
    tag: str,
    v4_pool: str,
    v6_pool: str | None,
    in_use: Iterable[Net],
) -> Addressing:
    """Pick subnets from the pools that overlap nothing in `in_use` (the host's routes
    and addresses, and other instances' subnets)."""
    used = list(in_use)

    def pick(pool_text: str, prefix: int) -> Net:
        pool = ipaddress.ip_network(pool_text)
        if pool.prefixlen > prefix:
            raise PanopticonError(
                f"pool {pool} is smaller than one instance subnet (/{prefix})",
                hint="choose a larger pool in [network] of the config",
            )
        for cand in _candidates(pool, prefix, tag):
            if not any(cand.version == u.version and cand.overlaps(u) for u in used):
                return cand
        raise PanopticonError(
            f"no free /{prefix} left in pool {pool}: every one overlaps a route, an address "
            "or another instance",
            hint="choose another pool in [network] of the config",
        )

    v4 = pick(v4_pool, V4_PREFIX)
    assert isinstance(v4, ipaddress.IPv4Network)
    if v6_pool is None:
        return Addressing(v4, v4[1], v4[2], None, None, None)
    v6 = pick(v6_pool, V6_PREFIX)
    assert isinstance(v6, ipaddress.IPv6Network)
    return Addressing(v4, v4[1], v4[2], v6, v6[1], v6[2])
