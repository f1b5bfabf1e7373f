"""FinalGuard: the last addon. Whatever no addon allowed is denied.

It trusts nothing but an "allow" recorded in the flow's metadata (or a local denial
already in place), so a missing, crashed or misordered `Enforce` denies everything
instead of letting traffic through. It re-checks the `server_connect` gate with the
same approvals `Enforce` writes, and keeps TLS connections intercepted and lazy.
Its own hooks fail closed like the others: an exception kills the flow.
"""

from __future__ import annotations

import logging

from mitmproxy import ctx, dns, http, tcp, tls, udp
from mitmproxy.proxy import server_hooks

from panopticond.addons import verdict

logger = logging.getLogger(__name__)

BY = "finalguard"
REASON = "no rule allowed it"
TEXT = "panopticon: request blocked: no rule allowed it.\n"


class FinalGuard:
    name = "panopticon_finalguard"

    def __init__(self, approvals: verdict.Approvals | None = None):
        self.approvals = approvals or verdict.Approvals()

    def running(self):
        if ctx.master.addons.get("panopticon_enforce") is None:
            logger.error("panopticon: the Enforce addon is not loaded; denying everything")

    def requestheaders(self, flow: http.HTTPFlow):
        self._http(flow, "requestheaders")

    def request(self, flow: http.HTTPFlow):
        self._http(flow, "request")

    def responseheaders(self, flow: http.HTTPFlow):
        self._http(flow, "responseheaders")

    def http_connect(self, flow: http.HTTPFlow):
        self._kill(flow)

    def tcp_start(self, flow: tcp.TCPFlow):
        if not verdict.is_allowed(flow):  # only binding.py's relays are ever allowed
            self._kill(flow)

    def udp_start(self, flow: udp.UDPFlow):
        self._kill(flow)

    def dns_request(self, flow: dns.DNSFlow):
        try:
            if verdict.is_allowed(flow) or verdict.is_local_denial(flow):
                return
            verdict.answer_dns(flow, dns.response_codes.REFUSED, reason=REASON, host=None, by=BY)
        except Exception:
            logger.exception("panopticon: final guard failed on a DNS query; killing it")
            verdict.kill(flow)

    def tls_clienthello(self, data: tls.ClientHelloData):
        data.ignore_connection = False
        data.establish_server_tls_first = False

    def server_connect(self, data: server_hooks.ServerConnectionHookData):
        try:
            if data.server.error:
                return
            ns = ctx.options.dns_name_servers if "dns_name_servers" in ctx.options else ()
            why = self.approvals.refusal(data.client, data.server, ns)
        except Exception:
            logger.exception("panopticon: final guard failed on a server connection")
            why = "internal error in the proxy"
        if why:
            data.server.error = f"panopticon: {why}"

    def client_disconnected(self, client):
        self.approvals.forget(client)

    def _http(self, flow: http.HTTPFlow, phase: str) -> None:
        try:
            if flow.error or not flow.live:
                return
            if verdict.is_allowed(flow):
                return
            if verdict.is_local_denial(flow) and flow.response is not None:
                return
            v = verdict.get(flow) or {}
            verdict.deny_http(flow, 403, TEXT, phase=phase, reason=v.get("reason", REASON),
                              host=v.get("host"), by=BY, rule=v.get("rule"))
        except Exception:
            logger.exception("panopticon: final guard failed; killing the flow")
            verdict.kill(flow)

    def _kill(self, flow) -> None:
        if verdict.get(flow) is None:
            verdict.record(flow, allowed=False, reason=REASON, host=None, by=BY)
        verdict.kill(flow)
