"""Entry point of the proxy process: `python -I -m panopticond.proxy_main OPTIONS.json FD`.

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

from panopticond.addons import all_addons


class Ready:
    def __init__(self, fd: int):
        self.fd = fd

    def running(self) -> None:
        if self.fd >= 0:
            os.write(self.fd, b"ready\n")
            os.close(self.fd)
            self.fd = -1


def _modes(modes: list[str]) -> list[str]:
    # mitmproxy 11.0 passes a UDP listen host to mitmproxy_rs as "host:port", so a literal
    # IPv6 address must arrive bracketed (fixed in 11.1, where brackets would be doubled).
    major, minor = (int(x) for x in VERSION.split(".")[:2])
    if (major, minor) != (11, 0):
        return modes
    out = []
    for m in modes:
        if m.startswith("dns@::1:"):
            m = "dns@[::1]:" + m.rsplit(":", 1)[1]
        out.append(m)
    return out


async def _main(opts_path: str, ready_fd: int) -> int:
    with open(opts_path) as f:
        spec = json.load(f)
    opts = options.Options()
    master = DumpMaster(opts, with_termlog=True, with_dumper=False)
    master.addons.add(*all_addons(), Ready(ready_fd))
    mitm = dict(spec["mitmproxy"])
    mitm["mode"] = _modes(mitm["mode"])
    opts.update(**mitm)
    opts.update(**spec["panopticon"])

    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, master.shutdown)
    loop.add_signal_handler(signal.SIGINT, master.shutdown)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    await master.run()
    return 0


def main() -> int:
    logging.getLogger().setLevel(logging.INFO)
    for noisy in ("tornado", "asyncio", "hpack", "quic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return asyncio.run(_main(sys.argv[1], int(sys.argv[2])))


if __name__ == "__main__":
    sys.exit(main())
