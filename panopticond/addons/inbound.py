"""Inbound: the proxy's side of inbound routes (the plan and the path are in
`panopticond/inbound.py`).

Each route is a reverse-mode listener (`reverse:http://127.0.0.1:TO@...:PORT`) that
the host DNATs clients to. For connections on those listeners only, this addon:

- refuses a client whose address is not in the route's `allow_from` as soon as it
  connects (the host firewall should have dropped it: the refusal is logged as an
  error), and checks again on every request;
- holds the route to its TLS mode (`none`: plain HTTP only; `self` or custom: TLS
  only; a connection that starts otherwise is closed at once and logged) and serves
  a custom certificate where the route has one;
- refuses CONNECT, upgrades other than WebSocket (and WebSocket unless allowed), and
  requests whose query string or body matches a `block_patterns` expression (403;
  nothing reaches the agent; a body too large to hold for inspection gets 413);
- replaces `X-Forwarded-For`/`X-Forwarded-Proto` (and drops `Forwarded`) so the agent
  learns the real client, then records the decision ("allow", by "inbound") and
  approves the one upstream address, the agent's port on loopback, for the
  `server_connect` gate that Enforce and FinalGuard hold;
- marks the flow inbound: `is_inbound(flow)`, `flow.metadata["panopticon_direction"]`,
  and `direction = "inbound"`, `route` in its log record; logs every WebSocket
  message (`kind = "websocket"`, `from` client or agent, `bytes`, `type`); a client
  message that matches a block pattern is dropped and ends the connection.

It must run before Enforce, whose requestheaders leaves flows that already carry a
decision alone (`addons.all_addons` orders it so). Everything after it (the secret
and DLP addons, FlowLog, FinalGuard) sees inbound flows like any other; their
responses, which leave the jail, pass the same response hooks. Addons that must treat
the two directions differently ask `is_inbound(flow)`: on an inbound flow the client
is outside and the server is the agent. The decision's `host` is None (the log shows
the client's SNI): no addon keyed on the judged name (the operator's headers, secrets)
matches an inbound request. The Host header is the agent's own address
(mitmproxy's reverse mode rewrites it, `keep_host_header` stays off), so no rule keyed
on a destination name applies to an inbound request by accident.

Every hook fails closed: an exception kills the flow or refuses the connection.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import logging
import re
from pathlib import Path
from typing import Any
from urllib.parse import unquote_plus

from mitmproxy import connection, ctx, exceptions, http, tls
from mitmproxy.proxy import commands, layers, mode_specs
from mitmproxy.proxy import layer as proxy_layer

from panopticond.addons import flowlog, verdict

logger = logging.getLogger(__name__)

OPTION = "panopticon_inbound"
DIRECTION = "panopticon_direction"
WS_REFUSED = "panopticon_ws_refused"
BY = "inbound"
INTERNAL_ERROR = "internal error in the proxy"
# Options that must hold while inbound routes are served: mitmproxy kills clients
# with public addresses by default, and keeping the client's Host would let it name
# a destination that other addons key on.
REQUIRED_OPTIONS: dict[str, object] = {"block_global": False, "keep_host_header": False}

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclasses.dataclass(frozen=True)
class RouteSpec:
    """One route as the proxy holds it (parsed from `inbound.proxy_config`)."""

    name: str
    port: int
    to: tuple[str, int]
    tls: str
    allow_from: tuple[Network, ...]
    websocket: bool = False
    patterns: tuple[re.Pattern[str], ...] = ()
    cert_file: str | None = None
    cert: Any = None  # a custom certificate and its key (cryptography objects)
    key: Any = None

    def allows(self, address: str) -> bool:
        ip = _ip(address)
        return ip is not None and any(ip.version == n.version and ip in n
                                      for n in self.allow_from)

    def blocked(self, text: str) -> bool:
        return any(p.search(text) for p in self.patterns)


def is_inbound(flow_or_client) -> bool:
    """Whether a flow (or a client connection) came in through an inbound route."""
    client = getattr(flow_or_client, "client_conn", flow_or_client)
    return isinstance(getattr(client, "proxy_mode", None), mode_specs.ReverseMode)


def load_routes(path: str) -> dict[int, RouteSpec]:
    """The routes of the JSON file at `path`, by listener port; ValueError/OSError if bad."""
    with open(path) as f:
        doc = json.load(f)
    routes: dict[int, RouteSpec] = {}
    for r in doc["routes"]:
        port = int(r["port"])
        if port in routes:
            raise ValueError(f"two routes on port {port}")
        if r["tls"] not in ("self", "none", "custom"):
            raise ValueError(f"route {r['name']}: unknown tls mode {r['tls']!r}")
        cert = key = None
        if r["tls"] == "custom":
            cert, key = _load_cert(r["cert_file"])
        allow = tuple(ipaddress.ip_network(n) for n in r["allow_from"])
        if not allow:
            raise ValueError(f"route {r['name']}: allow_from is empty")
        routes[port] = RouteSpec(
            name=str(r["name"]), port=port, to=(str(r["to"][0]), int(r["to"][1])),
            tls=r["tls"], allow_from=allow, websocket=bool(r["websocket"]),
            patterns=tuple(re.compile(p) for p in r["block_patterns"]),
            cert_file=r.get("cert_file"), cert=cert, key=key,
        )
    return routes


def _load_cert(path: str) -> tuple[Any, Any]:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    data = Path(path).read_bytes()
    chain = x509.load_pem_x509_certificates(data)
    key = serialization.load_pem_private_key(data, password=None)
    if chain[0].public_key().public_numbers() != key.public_key().public_numbers():
        raise ValueError(f"{path}: the key does not belong to the first certificate")
    return chain[0], key


def _ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(str(address).split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        return ip.ipv4_mapped
    return ip


def _addr(address) -> str | None:
    if not address:
        return None
    host, port = str(address[0]), address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _kill(self, flow, _hook: str = "") -> None:
    verdict.record(flow, allowed=False, reason=INTERNAL_ERROR, host=None, by=BY)
    verdict.kill(flow)


class _Close(proxy_layer.Layer):
    """Closes the client connection on its first event; nothing is read or forwarded."""

    def _handle_event(self, event):
        yield commands.CloseConnection(self.context.client)


class Inbound:
    name = "panopticon_inbound"

    def __init__(self, approvals: verdict.Approvals | None = None):
        self.approvals = approvals or verdict.Approvals()
        self.routes: dict[int, RouteSpec] = {}

    def load(self, loader):
        loader.add_option(
            OPTION, str, "",
            "Path of panopticon's inbound routes (JSON); empty for none.",
        )

    def configure(self, updated):
        if OPTION in updated:
            path = ctx.options.panopticon_inbound
            try:
                self.routes = load_routes(path) if path else {}
            except (OSError, ValueError, KeyError, TypeError, re.error) as e:
                self.routes = {}
                raise exceptions.OptionsError(f"panopticon: cannot load the inbound routes "
                                              f"{path}: {e}") from None
        if self.routes:
            for name, required in REQUIRED_OPTIONS.items():
                if name in updated and getattr(ctx.options, name) != required:
                    raise exceptions.OptionsError(
                        f"panopticon: inbound routes need {name}={required!r}")

    def running(self):
        if not self.routes:
            return
        fixes = {k: v for k, v in REQUIRED_OPTIONS.items()
                 if k in ctx.options and getattr(ctx.options, k) != v}
        if fixes:
            ctx.options.update(**fixes)

    def route(self, client: connection.Client) -> RouteSpec | None:
        """The route of an inbound client connection (by the listener it came in on)."""
        if not client.sockname:
            return None
        return self.routes.get(int(client.sockname[1]))

    def refusal(self, client: connection.Client) -> str | None:
        """Why this inbound client may not use its route, or None."""
        route = self.route(client)
        if route is None:
            return "no inbound route on this listener"
        if not client.peername or not route.allows(str(client.peername[0])):
            return f"source address not allowed by route {route.name}"
        return None

    # Connection level

    def client_connected(self, client: connection.Client):
        if not is_inbound(client):
            return
        try:
            why = self.refusal(client)
        except Exception:
            logger.exception("panopticon: inbound client check failed; refusing")
            why = INTERNAL_ERROR
        if why:
            # The host firewall drops these: one arriving here means a gap there.
            logger.error(f"panopticon: refused inbound connection from "
                         f"{_addr(client.peername)}: {why}")
            client.error = f"panopticon: {why}"
            route = None
            try:
                route = self.route(client)
            except Exception:
                pass
            flowlog.write_record({
                "kind": "connection", "direction": "inbound",
                "route": route.name if route else None, "client": _addr(client.peername),
                "host": None, "decision": "deny", "reason": why, "rule": None,
                "duration_ms": None,
            })

    def client_disconnected(self, client: connection.Client):
        self.approvals.forget(client)

    @verdict.fail_closed(lambda self, nextlayer, _: setattr(nextlayer, "layer", None), "inbound ")
    def next_layer(self, nextlayer: proxy_layer.NextLayer):
        context = nextlayer.context
        # Only the connection's first decision, the layer right under ReverseProxy (the
        # layers an addon builds append themselves to the stack); later ones are nested.
        if not is_inbound(context.client) or len(context.layers) < 2 \
                or context.layers[1] is not nextlayer.layer:
            return
        route = self.route(context.client)
        if route is None:
            return  # refused in client_connected; requestheaders denies anyway
        is_tls = isinstance(nextlayer.layer, layers.ClientTLSLayer)
        if (route.tls == "none") != is_tls:
            return
        why = f"{'TLS' if is_tls else 'plain HTTP'} on route {route.name}, which is " \
              f"{'plain HTTP' if is_tls else 'TLS'}"
        del context.layers[1:]
        nextlayer.layer = _Close(context)
        flowlog.write_record({
            "kind": "connection", "direction": "inbound", "route": route.name,
            "client": _addr(context.client.peername), "host": None, "decision": "deny",
            "reason": why, "rule": None, "duration_ms": None,
        })

    @verdict.fail_closed(lambda self, data, _: setattr(data, "ssl_conn", None), "inbound ")
    def tls_start_client(self, data: tls.TlsData):
        client = data.context.client
        if not is_inbound(client) or data.is_dtls:
            return
        route = self.route(client)
        if route is None or route.tls != "custom":
            return
        data.ssl_conn = self._custom_conn(route, data.ssl_conn)

    def _custom_conn(self, route: RouteSpec, old) -> Any:
        from OpenSSL import SSL

        from mitmproxy.addons import tlsconfig
        from mitmproxy.net import tls as net_tls

        opts = ctx.options
        store = ctx.master.addons.get("tlsconfig").certstore
        ssl_ctx = net_tls.create_client_proxy_context(
            method=net_tls.Method.TLS_SERVER_METHOD,
            min_version=net_tls.Version[opts.tls_version_client_min],
            max_version=net_tls.Version[opts.tls_version_client_max],
            cipher_list=tuple(tlsconfig._default_ciphers(
                net_tls.Version[opts.tls_version_client_min])),
            ecdh_curve=opts.tls_ecdh_curve_client,
            # Its other certificates complete the chain sent to the client.
            chain_file=Path(route.cert_file) if route.cert_file else None,
            alpn_select_callback=tlsconfig.alpn_select_callback,
            request_client_cert=False,
            extra_chain_certs=(),
            dhparams=store.dhparams,
        )
        conn = SSL.Connection(ssl_ctx)
        conn.use_certificate(route.cert)
        conn.use_privatekey(route.key)
        if old is not None:
            conn.set_app_data(old.get_app_data())
        conn.set_accept_state()
        return conn

    # Flow level

    @verdict.fail_closed(_kill, "inbound ")
    def requestheaders(self, flow: http.HTTPFlow):
        if not is_inbound(flow) or verdict.get(flow):
            return
        flow.metadata[DIRECTION] = "inbound"
        client = flow.client_conn
        route = self.route(client)
        flowlog.annotate(flow, direction="inbound", route=route.name if route else None)
        if flow.error or not flow.live:
            return
        req = flow.request
        # Never a name the client chose: addons that act on the judged host (the
        # operator's headers, secrets) must not match an inbound request by its SNI.
        host = None

        def deny(status: int, reason: str, text: str | None = None) -> None:
            verdict.deny_http(flow, status, f"panopticon: {text or reason}.\n",
                              phase="requestheaders", reason=reason, host=host, by=BY)

        why = self.refusal(client)
        if why or route is None:
            return deny(403, why or "no inbound route on this listener", "forbidden")
        if (route.tls == "none") == bool(client.tls):
            return deny(403, f"route {route.name} is {'not ' if route.tls == 'none' else ''}"
                        "TLS", "forbidden")
        if req.method.upper() == "CONNECT":
            return deny(403, "CONNECT is not allowed", "forbidden")
        upgrade = req.headers.get("upgrade")
        if upgrade is not None:
            if upgrade.strip().lower() != "websocket":
                return deny(403, "protocol upgrade is not allowed", "forbidden")
            if not route.websocket:
                return deny(403, f"route {route.name} does not allow WebSocket", "forbidden")
        query = req.path.partition("?")[2]
        if query and (route.blocked(query) or route.blocked(unquote_plus(query))):
            return deny(403, "the query matches a block pattern", "request refused")
        if route.patterns and req.stream:
            # Streamed bodies (past stream_large_bodies) cannot be held for the check.
            return deny(413, "the body is too large to inspect", "request too large")
        for name in ("forwarded", "x-forwarded-for", "x-forwarded-proto",
                     "x-forwarded-host", "x-real-ip"):
            req.headers.pop(name, None)
        req.headers["X-Forwarded-For"] = str(_ip(client.peername[0]))
        req.headers["X-Forwarded-Proto"] = "https" if client.tls else "http"
        verdict.record(flow, allowed=True, reason=f"inbound route {route.name}", host=host,
                       by=BY)
        self.approvals.approve(client, route.to)

    @verdict.fail_closed(_kill, "inbound ")
    def request(self, flow: http.HTTPFlow):
        if not is_inbound(flow) or flow.error or not flow.live:
            return
        if not verdict.is_allowed(flow) or (v := verdict.get(flow)) is None or v["by"] != BY:
            return
        route = self.route(flow.client_conn)
        if route is None or not route.patterns:
            return
        raw = flow.request.raw_content
        if not raw:
            return
        try:
            body = flow.request.get_content(strict=True) or b""
        except ValueError:
            verdict.deny_http(flow, 403, "panopticon: request refused.\n", phase="request",
                              reason="the body cannot be decoded for inspection", host=v["host"],
                              by=BY)
            return
        text = body.decode("utf-8", "surrogateescape")
        if route.blocked(text) or route.blocked(unquote_plus(text)):
            verdict.deny_http(flow, 403, "panopticon: request refused.\n", phase="request",
                              reason="the body matches a block pattern", host=v["host"], by=BY)

    @verdict.fail_closed(_kill, "inbound ")
    def websocket_message(self, flow: http.HTTPFlow):
        if not is_inbound(flow) or flow.websocket is None or not flow.websocket.messages:
            return
        message = flow.websocket.messages[-1]
        # mitmproxy keeps every message of a connection; later hooks need the last only.
        del flow.websocket.messages[:-1]
        route = self.route(flow.client_conn)
        v = verdict.get(flow) or {}
        decision, reason = v.get("decision", "none"), v.get("reason", "no decision")
        refuse = flow.metadata.get(WS_REFUSED)
        if refuse:
            refuse = "the connection was refused earlier"
        elif route is None or decision != "allow":
            refuse = "no allowed inbound request carries this connection"
        elif message.from_client and route.patterns and route.blocked(
                message.content.decode("utf-8", "surrogateescape")):
            refuse = "a message matches a block pattern"
        if refuse:
            decision, reason = "deny", refuse
        written = flowlog.write_record({
            "kind": "websocket", "direction": "inbound",
            "route": route.name if route else None,
            "client": _addr(flow.client_conn.peername), "host": flow.client_conn.sni,
            "decision": decision, "reason": reason, "rule": None,
            "path": flow.request.path.split("?", 1)[0][:flowlog.MAX_PATH],
            "from": "client" if message.from_client else "agent",
            "type": message.type.name.lower(), "bytes": len(message.content),
            "duration_ms": None,
        })
        if refuse or not written:
            message.drop()
            # mitmproxy 11 cannot kill a WebSocket in transit (its issue 4711): every
            # later message is dropped too, and the client's socket is closed, which
            # makes mitmproxy close the agent's side.
            flow.metadata[WS_REFUSED] = True
            _close_client(flow.client_conn)


def _close_client(client: connection.Client) -> bool:
    """Close `client`'s socket the way mitmproxy's own client kill does; False if the
    connection was not found (this relies on mitmproxy internals)."""
    try:
        server = ctx.master.addons.get("proxyserver")
        for handler in list(server.connections.values()):
            if handler.client.id == client.id:
                io = handler.transports.get(handler.client)
                if io is not None and io.writer is not None:
                    io.writer.close()
                    return True
    except Exception:
        logger.exception("panopticon: could not close an inbound connection")
    return False
