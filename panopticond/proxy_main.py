"""Entry point of the proxy process: `main([OPTIONS.json, FD])`, started by proxy.py.

Runs inside the instance namespace as the proxy user (proxy.py has entered the namespace
and dropped privileges before exec). Instead of `mitmdump -s script.py`, the addons are
added to the master directly: a script that fails to import is only logged by mitmdump,
which then runs without it; an import error here ends the process, and readiness is
never reported (fail closed).

Readiness: mitmproxy's `running` hook fires once every listener is bound (and the CA is
loaded); only then is "ready" written to the inherited pipe FD.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys

from mitmproxy import options
from mitmproxy.tools.dump import DumpMaster
from mitmproxy.version import VERSION

from panopticond.addons import Enforce, install


class Ready:
    """Reports readiness once every listener is bound, and only if the policy is loaded:
    a proxy that would deny everything for want of a policy is not ready."""

    def __init__(self, fd: int, policy_loaded):
        self.fd = fd
        self.policy_loaded = policy_loaded

    def running(self) -> None:
        if not self.policy_loaded():
            logging.error("the policy is not loaded: not reporting readiness")
            return
        if self.fd >= 0:
            os.write(self.fd, b"ready\n")
            os.close(self.fd)
            self.fd = -1


def _bracket_udp_ipv6() -> None:
    """mitmproxy 11.0 hands a UDP listen host to mitmproxy_rs, which parses "host:port",
    so a literal IPv6 address fails ("invalid socket address syntax"); fixed in 11.1.
    The same host goes to asyncio for TCP, where brackets would break, so bracket it
    only on the way to the UDP server."""
    major, minor = (int(x) for x in VERSION.split(".")[:2])
    if (major, minor) != (11, 0):
        return
    import mitmproxy_rs
    from mitmproxy.proxy import mode_servers

    orig = mitmproxy_rs.udp.start_udp_server

    async def start_udp_server(host, port, *args, **kwargs):
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return await orig(host, port, *args, **kwargs)

    mode_servers.mitmproxy_rs.udp.start_udp_server = start_udp_server


async def _main(opts_path: str, ready_fd: int) -> int:
    _bracket_udp_ipv6()
    with open(opts_path) as f:
        spec = json.load(f)
    opts = options.Options()
    master = DumpMaster(opts, with_termlog=True, with_dumper=False)
    ours = install(master)
    enforce = next(a for a in ours if isinstance(a, Enforce))
    master.addons.add(Ready(ready_fd, lambda: enforce.policy.policy is not None))
    opts.update(**spec["mitmproxy"])
    opts.update(**spec["panopticon"])

    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, master.shutdown)
    loop.add_signal_handler(signal.SIGINT, master.shutdown)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    await master.run()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    logging.getLogger().setLevel(logging.INFO)
    for noisy in ("tornado", "asyncio", "hpack", "quic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return asyncio.run(_main(args[0], int(args[1])))


if __name__ == "__main__":
    sys.exit(main())
