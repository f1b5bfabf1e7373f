"""How panopticon's addons record, apply and check decisions.

A decision on a flow lives in `flow.metadata["panopticon"]` as a small dict:

    decision  "allow" or "deny"
    reason    short, safe to show to the agent and to log
    rule      the policy pattern that decided, or None
    host      the name that was judged (SNI, Host or DNS question)
    by        the addon that decided
    local     True when the agent got a local answer (a 403, an NXDOMAIN, ...)
    mode, would_decision   when the policy decided: its mode ("enforce" or "discover")
              and what enforce mode does (or would have done) with the flow (`note`)
    notes     what operator addons added (`operator_addons.annotate`)

`FlowLog` writes it, `FinalGuard` denies any flow without an "allow" in it.

`Approvals` is the `server_connect` gate: an upstream connection is dialled only to an
address that an allowed request on the same client connection asked for.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Collection
from typing import Any

from mitmproxy import connection, dns, http
from mitmproxy.proxy import mode_specs

logger = logging.getLogger(__name__)

KEY = "panopticon"


def get(flow) -> dict[str, Any] | None:
    """The decision on `flow`, or None if there is none for its current message.

    mitmproxy reuses a DNS flow for a later query with the same message id; a decision
    is bound to the message it was made on (`msg`), so the later query is judged anew.
    """
    v = flow.metadata.get(KEY)
    if not isinstance(v, dict):
        return None
    if isinstance(flow, dns.DNSFlow) and v.get("msg") != id(flow.request):
        return None
    return v


def is_allowed(flow) -> bool:
    v = get(flow)
    return v is not None and v.get("decision") == "allow"


def is_local_denial(flow) -> bool:
    """Denied, and a local answer (not an upstream one) is what the agent will get."""
    v = get(flow)
    return v is not None and v.get("decision") == "deny" and bool(v.get("local"))


def record(
    flow, *, allowed: bool, reason: str, host: str | None, by: str,
    rule: str | None = None, local: bool = False,
) -> dict[str, Any]:
    v: dict[str, Any] = {
        "decision": "allow" if allowed else "deny",
        "reason": reason,
        "rule": rule,
        "host": host,
        "by": by,
        "local": local,
    }
    if isinstance(flow, dns.DNSFlow):
        # A later message is created while this one is still the flow's request, so
        # it cannot share its id(); every hook of ours records on every message.
        v["msg"] = id(flow.request)
    flow.metadata[KEY] = v
    return v


def note(flow, d) -> None:
    """Record on the flow's decision which policy mode made `d` (a policy.Decision) and
    what enforce mode would have decided: the log's `mode` and `would_decision`."""
    v = get(flow)
    if v is not None:
        v["mode"] = d.mode
        v["would_decision"] = d.would_action


def kill(flow) -> None:
    if flow.killable:
        flow.kill()


def deny_http(
    flow: http.HTTPFlow, status: int, text: str, *, phase: str, reason: str,
    host: str | None, by: str, rule: str | None = None,
) -> None:
    """Deny an HTTP flow: a local `status` answer when that is safe, else kill it.

    `phase` is the hook we are in: "requestheaders", "request" or "responseheaders".
    A local answer is unsafe once the body may be streamed: mitmproxy then dials and
    forwards before `request` runs, and raises if a response is already set. So:
    streamed or chunked requests are killed at `requestheaders`, streamed ones at
    `request`, and at `responseheaders` the upstream already answered: kill.
    """
    req = flow.request
    may_stream = bool(req.stream) or (
        phase == "requestheaders" and "transfer-encoding" in req.headers
    )
    local = phase != "responseheaders" and not may_stream and flow.live
    record(flow, allowed=False, reason=reason, host=host, by=by, rule=rule, local=local)
    if not flow.live:
        return
    if local:
        req.stream = False
        flow.response = http.Response.make(status, text, {"content-type": "text/plain"})
    else:
        kill(flow)


def answer_dns(flow, rcode: int, *, reason: str, host: str | None, by: str,
               rule: str | None = None) -> None:
    """Deny a DNS query with a local error answer: nothing is looked up or forwarded."""
    record(flow, allowed=False, reason=reason, host=host, by=by, rule=rule, local=True)
    flow.response = flow.request.fail(rcode)


def printable(name: str | None, limit: int = 253) -> str:
    """An agent-supplied name made safe to quote in a text answer or a log message."""
    if name is None:
        return "(none)"
    out = "".join(c if 0x20 < ord(c) < 0x7F else f"\\x{ord(c):02x}" for c in name[:limit])
    return out + ("..." if len(name) > limit else "")


class Approvals:
    """Upstream addresses that an allowed decision asked for, per client connection."""

    def __init__(self) -> None:
        self._by_client: dict[str, set[tuple[str, int]]] = {}
        self._relays: dict[str, dict[str, Any]] = {}

    def approve(self, client: connection.Client, address: tuple[str, int]) -> None:
        self._by_client.setdefault(client.id, set()).add((str(address[0]), int(address[1])))

    def approve_relay(self, client: connection.Client, info: dict[str, Any]) -> None:
        """Let `client`'s connection be relayed as raw TCP (passthrough, port rules; see
        binding.py). `info` describes the decision: name, rule, reason, kind, address."""
        self._relays[client.id] = info

    def relay(self, client: connection.Client) -> dict[str, Any] | None:
        """The approved raw relay of `client`'s connection, or None: kill any TCP flow."""
        return self._relays.get(client.id)

    def forget_relay(self, client: connection.Client) -> None:
        self._relays.pop(client.id, None)

    def forget(self, client: connection.Client) -> None:
        self._by_client.pop(client.id, None)
        self._relays.pop(client.id, None)

    def refusal(
        self, client: connection.Client, server: connection.Server,
        dns_upstreams: Collection[str] = (),
    ) -> str | None:
        """Why the proxy must not dial `server` for `client`, or None if it may."""
        if not server.address:
            return "no destination"
        host, port = str(server.address[0]), int(server.address[1])
        if (host, port) in self._by_client.get(client.id, ()):
            return None
        # In DNS mode mitmproxy may forward a query to the configured resolver; every
        # query is judged in dns_request first (DnsFilter, FinalGuard answer the rest).
        is_dns = isinstance(client.proxy_mode, mode_specs.DnsMode)
        if is_dns and port == 53 and host in dns_upstreams:
            return None
        return "no allowed request asked for this destination"


def fail_closed(on_error: Callable[..., None], what: str = ""):
    """Decorate a hook `(self, arg)`: if it raises, log the error and apply
    `on_error(self, arg, hook_name)`, which must deny. mitmproxy itself would only log
    the exception and let the flow go on (threats.md, "fails open")."""

    def wrap(hook):
        @functools.wraps(hook)
        def guarded(self, arg):
            try:
                return hook(self, arg)
            except Exception:
                logging.getLogger(hook.__module__).exception(
                    f"panopticon: {what}{hook.__name__} failed; denying")
                try:
                    on_error(self, arg, hook.__name__)
                except Exception:
                    logging.getLogger(hook.__module__).exception(
                        f"panopticon: could not deny after {what}{hook.__name__} failed")

        return guarded

    return wrap
