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
from pathlib import Path

from mitmproxy import options
from mitmproxy.tools.dump import DumpMaster
from mitmproxy.version import VERSION

from panopticond.addons import Enforce, dispatch, install
from panopticond.addons.operator_addons import load_scripts
from panopticond.errors import PanopticonError

HEARTBEAT = 1.0  # seconds between heartbeats on the readiness pipe (proxy.Proxy.last_beat)


class Ready:
    """Reports readiness once every listener is bound, and only if the policy is loaded:
    a proxy that would deny everything for want of a policy is not ready."""

    def __init__(self, fd: int, policy_loaded):
        self.fd = fd
        self.policy_loaded = policy_loaded

    def running(self) -> None:
        if not self.policy_loaded():
            logging.error("the policy is not loaded or an operator addon is broken: "
                          "not reporting readiness")
            return
        if self.fd >= 0:
            os.write(self.fd, b"ready\n")
            # Then a heartbeat on the same pipe, from the event loop: the daemon tells a
            # hung proxy (whose listening sockets still accept) from a live one by it.
            os.set_blocking(self.fd, False)
            asyncio.get_running_loop().call_later(HEARTBEAT, self._beat)

    def _beat(self) -> None:
        try:
            os.write(self.fd, b".")
        except BlockingIOError:
            pass  # nobody reads (panopticon run): never block the loop for it
        except OSError:
            os.close(self.fd)  # the reader is gone
            self.fd = -1
            return
        asyncio.get_running_loop().call_later(HEARTBEAT, self._beat)


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


# Loaded CAs, by the identity of their files (see `_load_ca_once`, `seed_ca`).
_ca_cache: dict = {}


def _ca_key(path, basename: str, key_size: int, passphrase) -> tuple | None:
    ident = []
    for kind in ("ca", "dhparam"):  # no dhparam file: mitmproxy's default ones
        try:
            st = os.stat(os.path.join(os.path.expanduser(str(path)), f"{basename}-{kind}.pem"))
            ident.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
        except FileNotFoundError:
            ident.append(None)
    if ident[0] is None:
        return None
    return (str(path), basename, key_size, passphrase, tuple(ident))


def _load_ca_once() -> None:
    """mitmproxy 11.0's TlsConfig loads the CA (and checks its key, ~40-55 ms) when the
    confdir is configured and again in its `running` hook (its own FIXME): the second
    load of the same unchanged files is served from the first, keyed on their identity."""
    from mitmproxy import certs

    orig = certs.CertStore.from_store.__func__

    def from_store(cls, path, basename, key_size, passphrase=None):
        key = _ca_key(path, basename, key_size, passphrase)
        if key is None:
            return orig(cls, path, basename, key_size, passphrase)  # it creates the CA
        if key not in _ca_cache:
            _ca_cache.clear()
            _ca_cache[key] = orig(cls, path, basename, key_size, passphrase)
        return _ca_cache[key]

    certs.CertStore.from_store = classmethod(from_store)


def seed_ca(confdir: str, private_key, certificate) -> None:
    """Before forking a proxy (helper.py): the CA just written to `confdir`, from the
    objects it was made of, so that the proxy does not load and check it again."""
    from mitmproxy import certs, options

    # First: mitmproxy writes its default DH parameters there if the file is missing,
    # which changes the identity the cache is keyed on.
    dh = certs.CertStore.load_dhparam(Path(confdir) / "mitmproxy-dhparam.pem")
    key = _ca_key(confdir, "mitmproxy", options.KEY_SIZE, None)
    if key is None:
        raise FileNotFoundError(f"no CA in {confdir}")
    _ca_cache.clear()
    _ca_cache[key] = certs.CertStore(private_key, certs.Cert(certificate), None, dh)


async def _main(opts_path: str, ready_fd: int) -> int:
    _bracket_udp_ipv6()
    _load_ca_once()
    with open(opts_path) as f:
        spec = json.load(f)
    # The operator's scripts: mitmdump -s would run on without one that fails to load;
    # here the proxy ends, before it could report ready.
    try:
        operator = load_scripts(spec.get("operator_addons", []))
    except PanopticonError as e:
        print(f"panopticon: error: {e}", file=sys.stderr, flush=True)
        return 1
    opts = options.Options()
    master = DumpMaster(opts, with_termlog=True, with_dumper=False)
    ours = install(master, operator)
    enforce = next(a for a in ours if isinstance(a, Enforce))
    master.addons.add(Ready(ready_fd, lambda: enforce.policy.policy is not None
                            and not any(a.broken for a in operator)))
    # mitmproxy's own ~35 addons and ours, in runs of one chain entry each: the same
    # addons, the same order, a fraction of the dispatch cost per event (dispatch.py).
    dispatch.flatten(master)
    opts.update(**spec["mitmproxy"])
    opts.update(**spec["panopticon"])

    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, master.shutdown)
    loop.add_signal_handler(signal.SIGINT, master.shutdown)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    await master.run()
    return 0


def prestarted(argv: list[str]) -> None:  # pragma: no cover - the prestarted child (proxy.prestart)
    """The prestarted interpreter: import, then wait for the one instruction."""
    ctl_r, ready_w = int(argv[0]), int(argv[1])
    from panopticond import ca
    from panopticond.proxy import _become_proxy

    # An ad-hoc run's CA is ephemeral: its RSA key (50-150 ms) is made now, in memory,
    # and written only as the proxy user, into its own confdir.
    fresh = ca.new_ephemeral() if argv[2] == "ca" else None
    with os.fdopen(ctl_r, "rb") as ctl:
        line = ctl.readline()
    if not line:
        os._exit(0)  # nobody needs us
    go = json.loads(line)
    err = os.open(go["stderr"], os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o640)
    devnull = os.open(os.devnull, os.O_RDONLY)

    def write_ca() -> None:
        confdir = go["fresh_ca"]
        if fresh and confdir and not os.path.exists(os.path.join(confdir, ca.CA_KEY_AND_CERT)):
            ca.write_ephemeral(confdir, fresh)
            seed_ca(confdir, fresh.private_key, fresh.certificate)

    _become_proxy(go["opts"], ready_w, err, devnull, go["env"], go["netns"], go["uid"],
                  go["gid"], as_proxy_user=write_ca)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    logging.getLogger().setLevel(logging.INFO)
    for noisy in ("tornado", "asyncio", "hpack", "quic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    rc = asyncio.run(_main(args[0], int(args[1])))
    # Every record is written and the log closed by now (flowlog's `done` hook, before
    # master.run() returned), and every task has ended with the loop. What is left is the
    # interpreter's teardown of mitmproxy's module graph: skipped, it is on the path of
    # every stop and writes nothing.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


if __name__ == "__main__":
    sys.exit(main())
