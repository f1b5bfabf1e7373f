"""The daemon's HTTP endpoint on the host side: `/healthz`, `/metrics`, the dashboard.

It listens on the loopback address and port of the agent's `health` key, in the host's
network namespace. The jail cannot reach it: its own `lo` is another interface in
another namespace, and a packet from the instance's veth to 127.0.0.0/8 or ::1 is a
martian the host drops (its INPUT rules drop everything from that veth anyway).

Requests are served from a thread of their own, so a slow client or a long step of the
supervision loop (a rule check, a proxy restart) never holds the other up. Pages are
functions returning (status, content type, body[, headers]); each reads a snapshot that
the supervision loop replaces whole, so no page sees half an update. A page made with
`page(fn, query=True)` gets the query string as a dict; one made with `browser=True` (the
dashboard and its API) is refused unless the Host header is an address or `localhost`:
a web page the operator visits could otherwise point a name of its own at 127.0.0.1
(DNS rebinding) and read the dashboard through the operator's browser.
"""

from __future__ import annotations

import errno
import http.server
import ipaddress
import json
import socket
import threading
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Any

from .errors import ExitStatus, PanopticonError

Page = Callable[..., tuple]  # () or (query) -> (status, content type, body[, headers])

# Sent with every answer: nothing here is meant to be framed, sniffed or followed.
_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff",
            "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer"}


def page(fn: Callable[..., tuple], *, query: bool = False, browser: bool = False) -> Page:
    """`fn` as a page: called with the query string ({name: last value}) if `query`;
    refused (403) if `browser` and the Host header names something other than an
    address or localhost."""
    fn.takes_query = query  # type: ignore[attr-defined]
    fn.browser = browser  # type: ignore[attr-defined]
    return fn


def local_host_header(value: str | None) -> bool:
    """True if a Host header is an IP literal or `localhost`, with or without a port."""
    if not value:
        return False
    host = value.strip()
    if host.startswith("["):
        if "]" not in host:
            return False
        host = host[1:].split("]", 1)[0]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def json_page(report: Callable[[], tuple[int, Any]]) -> Page:
    """A page whose body is `report()`'s second item as JSON, with its first as status."""

    def page() -> tuple[int, str, bytes]:
        status, doc = report()
        return status, "application/json", json.dumps(doc, indent=1).encode() + b"\n"

    return page


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    server_version = "panopticond"
    sys_version = ""
    timeout = 10  # an idle or trickling client is dropped

    def do_GET(self) -> None:  # noqa: N802 - the name http.server dispatches to
        self._answer(head=False)

    def do_HEAD(self) -> None:  # noqa: N802
        self._answer(head=True)

    def _answer(self, head: bool) -> None:
        path, _, qs = self.path.partition("?")
        page = self.server.pages.get(path)
        headers: dict[str, str] = {}
        if page is None:
            status, ctype, body = 404, "text/plain", b"not found\n"
        elif getattr(page, "browser", False) and not local_host_header(self.headers["Host"]):
            status, ctype, body = 403, "text/plain", b"use an address or localhost\n"
        else:
            try:
                if getattr(page, "takes_query", False):
                    out = page({k: v[-1] for k, v in urllib.parse.parse_qs(qs).items()})
                else:
                    out = page()
                status, ctype, body = out[:3]
                if len(out) > 3:
                    headers = dict(out[3])
            except Exception:  # noqa: BLE001 - a broken page must not say "healthy"
                status, ctype, body = 500, "text/plain", b"internal error\n"
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in {**_HEADERS, **headers}.items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # a health checker polls every few seconds: not journal material


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True  # a restart must not wait for TIME_WAIT on the port
    pages: Mapping[str, Page]


class HealthServer:
    """Serves `pages` (path -> Page) on `address` once `start()` returned."""

    def __init__(self, address: tuple[str, int], pages: Mapping[str, Page]):
        self.address = address
        self.pages = dict(pages)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        assert self._server is not None, "start() first"
        return int(self._server.server_address[1])

    def start(self) -> None:
        host, port = self.address

        class Server(_Server):
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

        try:
            server = Server((host, port), _Handler)
        except OSError as e:
            where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            hint = "another service (or another agent's daemon) uses it: change `health`"
            if e.errno != errno.EADDRINUSE:
                hint = "check the `health` address of the agent in the config"
            raise PanopticonError(f"cannot listen on {where} for /healthz: {e.strerror or e}",
                                  hint=hint, status=ExitStatus.UNAVAILABLE) from None
        server.pages = self.pages
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="healthz",
                                        kwargs={"poll_interval": 0.5}, daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Idempotent."""
        server, self._server = self._server, None
        if server is None:
            return
        if self._thread is not None and self._thread.is_alive():
            server.shutdown()  # waits for serve_forever: only if it runs, or forever
        server.server_close()
        if self._thread is not None:
            self._thread.join(5)
