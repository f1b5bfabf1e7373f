"""Enforce: judge every connection and request on its name, and dial nothing unapproved.

The name judged is the TLS SNI for HTTPS and the Host header for plain HTTP, never
`flow.request.host`: in transparent mode that is the address the agent chose to
connect to. Without an SNI (or a Host) the name is that address itself, so an IP
literal passes only if the operator allowed that address.

Where mitmproxy would otherwise fail open (threats.md), this addon closes:
- it requires rawtcp off, lazy connection strategy, inbound header validation, and no
  ignore/allow/tcp/udp host lists (they make raw tunnels); it replaces any raw TCP
  layer with HTTP;
- CONNECT, absolute-form targets, Host != SNI and IP literals that are not the
  destination are refused;
- `server_connect` refuses any upstream connection that no allowed request asked for;
- every hook catches its own exceptions and denies (mitmproxy logs and continues).
"""

from __future__ import annotations

import ipaddress
import logging

from mitmproxy import ctx, exceptions, http, tcp, tls, udp
from mitmproxy.proxy import layer as proxy_layer
from mitmproxy.proxy import layers, server_hooks
from mitmproxy.proxy.layers.http import HTTPMode

from panopticond.addons import policyfile, verdict
from panopticond.policy import Decision, canonical_host

logger = logging.getLogger(__name__)

BY = "enforce"

# mitmproxy options whose other values make raw, unjudged tunnels, dial before we
# decide, or let smuggled requests past the checks.
REQUIRED_OPTIONS: dict[str, object] = {
    "rawtcp": False,
    "connection_strategy": "lazy",
    "validate_inbound_headers": True,
    "ignore_hosts": [],
    "allow_hosts": [],
    "tcp_hosts": [],
    "udp_hosts": [],
}

INTERNAL_ERROR = "internal error in the proxy"


def _deny_internal(self, flow: http.HTTPFlow, phase: str) -> None:
    verdict.deny_http(
        flow, 403, "panopticon: request blocked: internal error in the proxy.\n",
        phase=phase, reason=INTERNAL_ERROR, host=None, by=BY,
    )


def _kill_internal(self, flow, phase: str) -> None:
    verdict.record(flow, allowed=False, reason=INTERNAL_ERROR, host=None, by=BY)
    verdict.kill(flow)


class Enforce:
    name = "panopticon_enforce"

    def __init__(
        self,
        policy: policyfile.PolicyFile | None = None,
        approvals: verdict.Approvals | None = None,
    ):
        self.policy = policy or policyfile.PolicyFile()
        self.approvals = approvals or verdict.Approvals()
        # The decision on each TLS client connection's SNI, by client id: a connection
        # refused at TLS time stays refused for every request it carries.
        self.tls_decisions: dict[str, tuple[str, Decision]] = {}

    def load(self, loader):
        policyfile.add_option(loader)

    def configure(self, updated):
        for name, required in REQUIRED_OPTIONS.items():
            if name not in updated or name not in ctx.options:
                continue
            if not _is(getattr(ctx.options, name), required):
                raise exceptions.OptionsError(
                    f"panopticon requires {name}={required!r}, got {getattr(ctx.options, name)!r}: "
                    "any other value lets traffic through unjudged"
                )
        if policyfile.OPTION in updated:
            self.policy.load(ctx.options.panopticon_policy)

    def running(self):
        # Options never set keep mitmproxy's defaults (rawtcp on, eager connections),
        # and configure() only sees options that change: fix them here.
        fixes = {
            name: required
            for name, required in REQUIRED_OPTIONS.items()
            if name in ctx.options and not _is(getattr(ctx.options, name), required)
        }
        if fixes:
            logger.info(f"panopticon: setting {', '.join(f'{k}={v!r}' for k, v in fixes.items())}")
            ctx.options.update(**fixes)
        if not self.policy.configured:
            self.policy.load(ctx.options.panopticon_policy)

    def client_disconnected(self, client):
        self.approvals.forget(client)
        self.tls_decisions.pop(client.id, None)

    # Connection level

    def _tls_refused(self, data: tls.ClientHelloData, phase: str) -> None:
        data.ignore_connection = False
        data.establish_server_tls_first = False
        client = data.context.client
        self.tls_decisions[client.id] = (client.sni or "", Decision(False, None, INTERNAL_ERROR))

    @verdict.fail_closed(_tls_refused)
    def tls_clienthello(self, data: tls.ClientHelloData):
        # Passthrough would be a raw tunnel and an eager server handshake would dial
        # (and send the agent's SNI) before any decision: neither, whoever asked.
        if data.ignore_connection:
            logger.warning("panopticon: refusing to pass a TLS connection through undecrypted")
        data.ignore_connection = False
        data.establish_server_tls_first = False

        client = data.context.client
        server = data.context.server
        name = client.sni or (str(server.address[0]) if server.address else "")
        self.tls_decisions[client.id] = (name, self.policy.decide(name))
        # A denied name is not refused here: the handshake with the client completes
        # (with a certificate from our CA; nothing is dialled, the strategy is lazy and
        # server_connect is gated) so that the agent reads a 403 that says what was
        # blocked and how to allow it, instead of an opaque TLS alert. Every request
        # on the connection is then denied in requestheaders.

    @verdict.fail_closed(lambda self, nextlayer, phase: setattr(nextlayer, "layer", None))
    def next_layer(self, nextlayer: proxy_layer.NextLayer):
        # mitmproxy relays bytes it does not recognise as HTTP (rawtcp, ignore_hosts,
        # tcp_hosts, a server greeting). We want HTTP or nothing: the HTTP layer answers
        # anything else with a 400 and closes. UDP raw layers are left to udp_start and
        # the server_connect gate, which refuse them.
        chosen = nextlayer.layer
        if (
            isinstance(chosen, layers.TCPLayer)
            and nextlayer.context.client.transport_protocol == "tcp"
        ):
            logger.warning(
                "panopticon: non-HTTP traffic from "
                f"{_addr(nextlayer.context.client.peername)} is not relayed"
            )
            nextlayer.layer = layers.HttpLayer(nextlayer.context, HTTPMode.transparent)

    def _gate_error(self, data: server_hooks.ServerConnectionHookData, phase: str) -> None:
        data.server.error = f"panopticon: {INTERNAL_ERROR}"

    @verdict.fail_closed(_gate_error)
    def server_connect(self, data: server_hooks.ServerConnectionHookData):
        if data.server.error:
            return
        ns = ctx.options.dns_name_servers if "dns_name_servers" in ctx.options else ()
        why = self.approvals.refusal(data.client, data.server, ns)
        if why:
            logger.warning(
                f"panopticon: refused to connect to {_addr(data.server.address)}: {why}"
            )
            data.server.error = f"panopticon: {why}"

    # Flow level

    @verdict.fail_closed(_kill_internal)
    def http_connect(self, flow: http.HTTPFlow):
        # In transparent mode mitmproxy would treat a CONNECT as a tunnel to an upstream
        # proxy; there is none, and tunnels are not judged: always refuse.
        verdict.record(flow, allowed=False, reason="CONNECT is not allowed",
                       host=flow.request.host_header, by=BY)
        verdict.kill(flow)

    @verdict.fail_closed(_deny_internal)
    def requestheaders(self, flow: http.HTTPFlow):
        # Judge at the headers: with stream_large_bodies a body is forwarded (and the
        # upstream dialled) before the `request` hook runs.
        if verdict.get(flow):
            return
        if flow.error:
            # mitmproxy refused it itself (invalid request, CONNECT in transparent
            # mode, ...): nothing is sent, but the log should say why.
            verdict.record(flow, allowed=False, reason="invalid request", by=BY,
                           host=flow.request.host_header)
            return
        if not flow.live:
            return
        self._judge(flow, "requestheaders")

    @verdict.fail_closed(_deny_internal)
    def request(self, flow: http.HTTPFlow):
        if flow.error or not flow.live:
            return
        v = verdict.get(flow)
        if v is None:
            self._judge(flow, "request")
        elif v["decision"] != "allow" and flow.response is None:
            # Denied earlier, yet nothing answers it (an addon in between removed our
            # answer): deny again rather than let it go upstream.
            verdict.deny_http(flow, 403, _blocked_text(v.get("host"), v["reason"], ""),
                              phase="request", reason=v["reason"], host=v.get("host"), by=BY,
                              rule=v.get("rule"))

    @verdict.fail_closed(_kill_internal)
    def tcp_start(self, flow: tcp.TCPFlow):
        if self.approvals.relay(flow.client_conn) is not None:
            return  # a relay binding.py approved (passthrough, port rule): it records it
        # Otherwise only reachable if a raw layer slipped past next_layer; killing marks
        # the flow, and the server_connect gate is what keeps it from dialling.
        verdict.record(flow, allowed=False, reason="non-HTTP traffic is not relayed",
                       host=flow.client_conn.sni, by=BY)
        verdict.kill(flow)

    @verdict.fail_closed(_kill_internal)
    def udp_start(self, flow: udp.UDPFlow):
        verdict.record(flow, allowed=False, reason="UDP is not relayed",
                       host=flow.client_conn.sni, by=BY)
        verdict.kill(flow)

    def _judge(self, flow: http.HTTPFlow, phase: str) -> None:
        req = flow.request
        client = flow.client_conn
        is_tls = bool(client.tls)
        host_header = req.host_header
        # The name, and what the Host must agree with. req.host is the destination
        # address in transparent mode: it stands in when there is no name at all.
        name = (client.sni or req.host) if is_tls else (host_header or req.host)

        def deny(status: int, reason: str, text: str, rule: str | None = None) -> None:
            verdict.deny_http(flow, status, text, phase=phase, reason=reason,
                              host=name, by=BY, rule=rule)

        if req.method.upper() == "CONNECT":
            return deny(403, "CONNECT is not allowed",
                        _blocked_text(name, "CONNECT is not allowed", ""))
        if req.authority and not (req.is_http2 or req.is_http3):
            return deny(403, "absolute-form request target",
                        _blocked_text(name, "a proxy-style (absolute-form) request target "
                                      "is not allowed, send the path only", ""))
        if is_tls:
            at_tls = self.tls_decisions.get(client.id)
            if at_tls is not None and not at_tls[1].allowed:
                d = at_tls[1]
                deny(403, d.reason, self._denied_text(name, d), d.rule)
                return verdict.note(flow, d)

        # The name decided at TLS time may have only method/path rules: judge each request.
        d = self.policy.decide(name, req.method, req.path)
        if not d.allowed:
            deny(403, d.reason, self._denied_text(name, d), d.rule)
            return verdict.note(flow, d)

        if is_tls and host_header and not _same_host(host_header, name):
            return deny(421, "Host does not match the TLS server name",
                        "panopticon: misdirected request: "
                        f"Host \"{verdict.printable(host_header)}\" does not match "
                        f"the TLS server name \"{verdict.printable(name)}\".\n")
        plain_host = req.headers.get("host")
        if (
            (req.is_http2 or req.is_http3) and req.authority and plain_host
            and not _same_host(plain_host, req.authority)
        ):
            return deny(421, "Host does not match :authority",
                        "panopticon: misdirected request: "
                        f"Host \"{verdict.printable(plain_host)}\" does not match "
                        f":authority \"{verdict.printable(req.authority)}\".\n")
        if _is_ip(name) and not _same_host(name, req.host):
            return deny(421, "IP literal is not the destination",
                        f"panopticon: misdirected request: \"{verdict.printable(name)}\" is not "
                        "the address this connection goes to.\n")

        verdict.record(flow, allowed=True, reason=d.reason, host=name, by=BY, rule=d.rule)
        verdict.note(flow, d)
        self.approvals.approve(client, (req.host, req.port))

    def _denied_text(self, name: str, d: Decision) -> str:
        policy = self.policy.current()
        hint = policy.allow_hint if policy is not None else ""
        shown = _shown(name)
        if policy is None:
            how = ("The proxy has no valid policy; the operator must fix it. "
                   "Everything is blocked until then.")
        elif d.rule:
            how = f"It matches the deny rule \"{d.rule}\", which wins over any allow rule."
        elif d.reason == "invalid host name":
            how = "Only valid host names can be allowed."
        elif hint:
            how = f"To allow it, add \"{shown}\" to {hint}."
        else:
            how = f"To allow it, the operator must add \"{shown}\" to the allowlist."
        return _blocked_text(name, d.reason, how)


def _is(value: object, required: object) -> bool:
    if isinstance(required, list):  # sequence options come back as lists or tuples
        return isinstance(value, (list, tuple)) and list(value) == required
    return value == required


def _blocked_text(name: str | None, reason: str, how: str) -> str:
    text = f"panopticon: blocked request to {_shown(name)}: {reason}.\n"
    return text + (how + "\n" if how else "")


def _shown(name: str | None) -> str:
    try:
        return canonical_host(name or "")
    except ValueError:
        return verdict.printable(name)


def _same_host(a: str, b: str) -> bool:
    try:
        return canonical_host(a) == canonical_host(b)
    except ValueError:
        return False


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(canonical_host(name))
        return True
    except ValueError:
        return False


def _addr(address) -> str:
    if not address:
        return "?"
    host, port = str(address[0]), address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
