"""Binding: the proxy dials, for a name, only an address the jail's DNS returned for it.

In transparent mode the agent picks the destination address and, separately, the name
the proxy judges (SNI, Host). Judging the name and dialling the address would let any
allowed name carry traffic to any address (threats 18, 19). So, once `Enforce` allowed a
request on its name, this addon chooses the address itself:

- the agent's destination, if the jail's DNS listener returned it for that name (the
  pin table, pins.py: filled here from every allowed A/AAAA answer);
- else an address pinned to the name, or one the proxy resolves itself (with the
  configured `dns_name_servers`); the request then goes there, and the log says so;
- an IP literal (no SNI, or a Host that is an address) is its own destination, and
  Enforce allowed it only if the operator did (`allow_cidrs`, or the address in allow).

Every address, whether from a DNS answer or about to be dialled, passes `AddressGuard`
(addresses.py): an allowed name that resolves to 10.x, 169.254.169.254 or the host itself
is refused, in the answer (DNS rebinding, threat 17) and at `server_connect` (threat 9).
`server_connect` refuses any address that no decision here bound to the client
connection, so whatever else approved it, nothing unbound is dialled.

Non-HTTP destinations (destinations.py), decided in `next_layer` on the connection's
first bytes: TLS whose SNI matches `passthrough` is relayed without decryption, and a
connection to a port of a port rule (`{ host = "github.com", port = 22 }`) is relayed raw
if its destination is pinned to a name that rule allows; both are dialled only to a
bound address, logged with the name and byte counts, and anything else on such a port is
answered by the HTTP layer (400) and closed, never relayed. Only protocols whose client
speaks first (SSH, TLS) can be relayed: nothing is dialled before a decision.

Also here: requests that carry DNS over HTTPS (`application/dns-message` or `-json`, or
`GET ?dns=`) are refused unless the name is allowed by an exact rule (threat 16), and
floods of high-entropy DNS labels are logged (dnsflood.py).

With several proxy workers (`proxy_workers`), only worker 0 sees the jail's DNS answers:
the others copy its pins on a miss (pinshare.py; options `panopticon_worker` and
`panopticon_pins_socket`), and worker 0 answers them.

Every hook fails closed: an exception denies the request, answers the query SERVFAIL,
keeps the HTTP layer, or refuses the connection.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable, Sequence

from mitmproxy import ctx, dns, exceptions, http, tcp
from mitmproxy.net.tls import starts_like_tls_record
from mitmproxy.proxy import layer as proxy_layer
from mitmproxy.proxy import layers, mode_specs, server_hooks
from mitmproxy.proxy.layers import modes
from mitmproxy.proxy.layers.http import HTTPMode
from mitmproxy.proxy.layers.tls import parse_client_hello

from panopticond import pinshare
from panopticond.addons import flowlog, policyfile, verdict
from panopticond.addresses import AddressGuard, Network
from panopticond.destinations import decide_passthrough, decide_port
from panopticond.dnsflood import LabelFlood
from panopticond.pins import PinTable, canonical_ip
from panopticond.policy import Decision, canonical_host

logger = logging.getLogger(__name__)

BY = "binding"
BLOCKED_OPTION = "panopticon_blocked"
PINS_SOCKET_OPTION = "panopticon_pins_socket"
WORKER_OPTION = flowlog.WORKER_OPTION
INTERNAL_ERROR = "internal error in the proxy"
RESOLVE_TIMEOUT = 10.0
ECH_EXTENSION = 0xFE0D  # encrypted_client_hello: the real server name is hidden in it
DOH_TYPES = ("application/dns-message", "application/dns-json")
# What the agent reads when no address can be bound (the log has the details).
_TOLD = {
    403: "it resolves only to addresses the proxy never connects to",
    421: "an IP literal must be the address the connection goes to",
    502: "its name could not be resolved",
}
BYTES = "panopticon_relay_bytes"

Resolver = Callable[[str, int], Awaitable[list[str]]]


class Unresolvable(Exception):
    """The name could not be looked up (a server failure or a timeout, not NXDOMAIN)."""


class Binding:
    name = "panopticon_binding"

    def __init__(
        self,
        policy: policyfile.PolicyFile | None = None,
        approvals: verdict.Approvals | None = None,
        *,
        pins: PinTable | None = None,
        resolve: Resolver | None = None,
    ):
        self.policy = policy or policyfile.PolicyFile()
        self.approvals = approvals or verdict.Approvals()
        self.pins = pins or PinTable()
        # async (name, family) -> addresses; [] for no such name; Unresolvable otherwise.
        self.resolve: Resolver = resolve or self._lookup
        self.flood = LabelFlood()
        self.extra: tuple[Network, ...] = ()
        self.bound: dict[str, set[tuple[str, int]]] = {}
        self._resolver = None
        self._guard: tuple[tuple, AddressGuard] | None = None
        self.peer: pinshare.Peer | None = None  # worker 0, asked on a miss (workers > 0)
        self._pin_server: asyncio.AbstractServer | None = None

    # -- options

    def load(self, loader):
        policyfile.add_option(loader)
        loader.add_option(
            BLOCKED_OPTION, Sequence[str], [],
            "Networks the proxy never connects to, whatever the policy allows: the host's "
            "own addresses and the instance pools (CIDR). Added to the built-in ranges.",
        )
        add_worker_options(loader)

    def configure(self, updated):
        if BLOCKED_OPTION in updated:
            try:
                self.extra = tuple(ipaddress.ip_network(n, strict=False)
                                   for n in ctx.options.panopticon_blocked)
            except ValueError as e:
                raise exceptions.OptionsError(f"{BLOCKED_OPTION}: {e}") from None
        if "dns_name_servers" in updated:
            self._resolver = None
        if policyfile.OPTION in updated:
            self.policy.load(ctx.options.panopticon_policy)
        if PINS_SOCKET_OPTION in updated or WORKER_OPTION in updated:
            path = ctx.options.panopticon_pins_socket
            self.peer = pinshare.Peer(path) if path and ctx.options.panopticon_worker > 0 \
                else None

    async def running(self):
        if not self.policy.configured:
            self.policy.load(ctx.options.panopticon_policy)
        path = ctx.options.panopticon_pins_socket
        if path and ctx.options.panopticon_worker == 0 and self._pin_server is None:
            # Before readiness is reported (a later addon): no worker asks in vain.
            self._pin_server = await pinshare.serve(path, self.pins)

    def done(self):
        if self._pin_server is not None:
            self._pin_server.close()
            self._pin_server = None

    def client_disconnected(self, client):
        self.bound.pop(client.id, None)

    def guard(self) -> AddressGuard:
        """The guard for the policy in force (its allow_cidrs) and the blocked option."""
        policy = self.policy.current()
        dest = policy.destinations if policy is not None else None
        key = (dest.allow_cidrs if dest is not None else (), self.extra)
        if self._guard is None or self._guard[0] != key:
            self._guard = (key, AddressGuard(key[0], key[1]))
        return self._guard[1]

    # -- DNS

    def dns_request(self, flow: dns.DNSFlow):
        # Observation only: it never decides, so its failure is only logged.
        try:
            q = flow.request.questions[0] if len(flow.request.questions) == 1 else None
            if q is None:
                return
            alert = self.flood.observe(canonical_host(q.name))
            if alert:
                logger.warning(f"panopticon: {alert}")
                flowlog.annotate(flow, alert=alert)
        except ValueError:
            pass
        except Exception:
            logger.exception("panopticon: the DNS label check failed")

    def dns_response(self, flow: dns.DNSFlow):
        try:
            self._check_answer(flow)
        except Exception:
            logger.exception("panopticon: checking a DNS answer failed; answering SERVFAIL")
            try:
                verdict.answer_dns(flow, dns.response_codes.SERVFAIL, reason=INTERNAL_ERROR,
                                   host=None, by=BY)
            except Exception:
                logger.exception("panopticon: could not answer a DNS query after an error")
                verdict.kill(flow)

    def _check_answer(self, flow: dns.DNSFlow) -> None:
        """Drop answers the proxy would never connect to; pin the others to the name."""
        if flow.response is None or not verdict.is_allowed(flow):
            return
        q = flow.request.questions[0] if len(flow.request.questions) == 1 else None
        if q is None or q.type not in (dns.types.A, dns.types.AAAA):
            return
        name = canonical_host(q.name)
        guard = self.guard()
        kept, ips, refused = [], [], []
        ttl = None
        for rr in flow.response.answers:
            if rr.type == dns.types.A:
                ip = str(rr.ipv4_address)
            elif rr.type == dns.types.AAAA:
                ip = str(rr.ipv6_address)
            else:
                continue  # only addresses are ever answered (dnsfilter.py)
            why = guard.refusal(ip)
            if why:
                refused.append(why)
                continue
            kept.append(rr)
            ips.append(ip)
            ttl = rr.ttl if ttl is None else min(ttl, rr.ttl)
        if refused and not kept:
            reason = f"{name} resolves only to addresses the proxy never connects to: {refused[0]}"
            logger.warning(f"panopticon: {reason}")
            verdict.answer_dns(flow, dns.response_codes.REFUSED, reason=reason, host=name, by=BY)
            return
        if len(kept) != len(flow.response.answers):
            flow.response.answers = kept
            if refused:
                flowlog.annotate(flow, refused_answers=refused)
        if ips:
            self.pins.add(name, ips, ttl or 0)

    # -- HTTP

    async def requestheaders(self, flow: http.HTTPFlow):
        try:
            await self._bind_request(flow)
        except Exception:
            logger.exception("panopticon: binding a request failed; denying")
            try:
                self._deny(flow, 403, INTERNAL_ERROR, None)
            except Exception:
                logger.exception("panopticon: could not deny after binding failed")
                verdict.kill(flow)

    async def _bind_request(self, flow: http.HTTPFlow) -> None:
        if (flow.error or not flow.live or flow.response is not None
                or not _outbound(flow.client_conn)):
            return
        v = verdict.get(flow)
        if v is None or v.get("decision") != "allow":
            return
        name = v.get("host")
        if not name:
            return self._deny(flow, 403, "no name to bind the destination to", None)
        req = flow.request
        if _carries_doh(req) and not _exact(v.get("rule")):
            why = "DNS over HTTPS needs an exact allow rule for its host"
            return self._deny(flow, 403, why, name, why)
        original = (req.host, req.port)
        address, why, status = await self.destination(name, original)
        if address is None:
            return self._deny(flow, status, why, name, _TOLD.get(status, _TOLD[403]))
        if address != (canonical_ip(original[0]), original[1]):
            # Lazy strategy: the connection object is not open yet, so it can still be
            # pointed elsewhere, and later requests on it start from there.
            flow.server_conn.address = address
            req.data.host = address[0]  # not req.host: that setter rewrites the Host header
            flowlog.annotate(flow, agent_address=original[0])
        flowlog.annotate(flow, address=address[0])
        self._bind(flow.client_conn, address)

    def _deny(self, flow: http.HTTPFlow, status: int, reason: str, name: str | None,
              told: str = "the destination is not allowed") -> None:
        # `reason` (which may name addresses) goes to the log; the agent is `told` less.
        shown = verdict.printable(name) if name else "this host"
        if status == 421:
            text = f"panopticon: misdirected request to {shown}: {told}.\n"
        elif status == 502:
            text = f"panopticon: could not reach {shown}: {told}.\n"
        else:
            text = f"panopticon: blocked request to {shown}: {told}.\n"
        verdict.deny_http(flow, status, text, phase="requestheaders", reason=reason,
                          host=name, by=BY)

    # -- choosing the address

    async def destination(
        self, name: str, original: tuple[str, int],
    ) -> tuple[tuple[str, int] | None, str, int]:
        """(address to dial, "", 0), or (None, why not, HTTP status) for a request or a
        passthrough connection judged on `name` that the agent sent to `original`."""
        guard = self.guard()
        ip0, port = canonical_ip(str(original[0])), int(original[1])
        try:
            h = canonical_host(name)
        except ValueError:
            return None, "invalid host name", 403
        if _is_ip(h):
            if h != ip0:
                return None, f"{h} is not the address this connection goes to", 421
            why = guard.refusal(ip0)
            return (None, why, 403) if why else ((ip0, port), "", 0)
        if not self.pins.has(h, ip0):
            await pinshare.share(self.peer, self.pins, h, ip0)  # the other workers' miss
        if self.pins.has(h, ip0) and guard.refusal(ip0) is None:
            return (ip0, port), "", 0
        # Another address of the name, of the agent's address family if it has one.
        pinned = [a for a in self.pins.addresses(h) if guard.refusal(a) is None]
        refused: list[str] = []
        failure = ""
        for family in (_family(ip0), 10 - _family(ip0)):
            candidates = [a for a in pinned if _family(a) == family]
            if not candidates:
                try:
                    found = [canonical_ip(a) for a in await self.resolve(h, family)]
                except Unresolvable as e:
                    failure = str(e)
                    continue
                candidates = [a for a in found if guard.refusal(a) is None]
                refused += [a for a in found if a not in candidates]
                if candidates:
                    self.pins.add(h, candidates, 0)
            if candidates:
                return (candidates[0], port), "", 0
        if refused:
            return (None, f"{h} resolves only to addresses the proxy never connects to: "
                    f"{guard.refusal(refused[0])}", 403)
        if failure:
            return None, f"{h} could not be resolved ({failure})", 502
        return None, f"{h} has no address", 502

    async def _lookup(self, name: str, family: int) -> list[str]:
        import mitmproxy_rs  # the resolver mitmproxy's own DNS mode uses

        if self._resolver is None:
            servers = list(ctx.options.dns_name_servers) if "dns_name_servers" in ctx.options \
                else []
            self._resolver = mitmproxy_rs.dns.DnsResolver(
                name_servers=servers or mitmproxy_rs.dns.get_system_dns_servers(),
                use_hosts_file=False,  # /etc/hosts of the host may name internal addresses
            )
        lookup = self._resolver.lookup_ipv4 if family == 4 else self._resolver.lookup_ipv6
        try:
            return list(await asyncio.wait_for(lookup(name), RESOLVE_TIMEOUT))
        except socket.gaierror as e:
            if e.args and e.args[0] in (socket.EAI_NONAME, socket.EAI_NODATA):
                return []
            raise Unresolvable(str(e)) from None
        except (asyncio.TimeoutError, OSError) as e:
            raise Unresolvable(str(e) or type(e).__name__) from None

    def _bind(self, client, address: tuple[str, int]) -> None:
        self.bound.setdefault(client.id, set()).add(address)
        self.approvals.approve(client, address)

    # -- passthrough and raw TCP

    async def next_layer(self, nextlayer: proxy_layer.NextLayer):
        try:
            await self._relay_decision(nextlayer)
        except Exception:
            logger.exception("panopticon: deciding on a relay failed; not relaying")
            self.approvals.forget_relay(nextlayer.context.client)
            if nextlayer.layer is None or isinstance(nextlayer.layer, layers.TCPLayer):
                _set_layer(nextlayer, lambda c: layers.HttpLayer(c, HTTPMode.transparent))

    async def _relay_decision(self, nextlayer: proxy_layer.NextLayer) -> None:
        context = nextlayer.context
        client = context.client
        # Only the first decision on an agent's connection (inside TLS it is HTTP's).
        if (client.transport_protocol != "tcp"
                or not _outbound(client)
                or client.tls_established
                or not context.layers
                or not isinstance(context.layers[0], modes.TransparentProxy)
                or not context.server.address
                or self.approvals.relay(client) is not None):
            return
        ip0, port = canonical_ip(str(context.server.address[0])), int(context.server.address[1])
        policy = self.policy.current()
        if port not in (80, 443):
            # Redirected only for port rules: relayed raw, or not at all.
            return await self._port_relay(nextlayer, policy, ip0, port)
        dest = policy.destinations if policy is not None else None
        if port != 443 or dest is None or not dest.passthrough:
            return
        data = nextlayer.data_client()
        if not starts_like_tls_record(data):
            return
        try:
            hello = parse_client_hello(data)
        except ValueError:
            return  # not TLS after all: the TLS layer refuses it
        if hello is None:
            nextlayer.layer = None  # wait for the whole ClientHello
            return
        if not hello.sni:
            return
        d = decide_passthrough(policy, hello.sni)
        if not d.allowed:
            return
        if any(ext == ECH_EXTENSION for ext, _ in hello.extensions):
            # The server name that counts is encrypted: relayed, it could be any other
            # site behind the same front. Intercepted instead, it is judged as usual.
            logger.warning(f"panopticon: not passing {verdict.printable(hello.sni)} through: "
                           "its ClientHello carries encrypted_client_hello")
            return
        address, why, _ = await self.destination(hello.sni, (ip0, port))
        if address is None:
            return self._refuse(nextlayer, hello.sni, why)
        self._relay(nextlayer, address, hello.sni, d, "passthrough")

    async def _port_relay(self, nextlayer, policy, ip0: str, port: int) -> None:
        # The names the jail's DNS returned this address for, then the address itself
        # (a port rule may name an IP literal).
        def allowing() -> tuple[str, Decision] | None:
            for name in [*self.pins.names_for(ip0), ip0] if policy is not None else ():
                d = decide_port(policy, name, port)
                if d.allowed:
                    return name, d
            return None

        allowed = allowing()
        if allowed is None and self.peer is not None:
            await pinshare.share(self.peer, self.pins, None, ip0)
            allowed = allowing()
        if allowed is None:
            return self._refuse(nextlayer, None, f"no rule allows TCP port {port} to {ip0}: "
                                "only to addresses the jail's DNS returned for a host of a "
                                "port rule", port=port)
        why = self.guard().refusal(ip0)
        if why:
            return self._refuse(nextlayer, allowed[0], why, port=port)
        self._relay(nextlayer, (ip0, port), allowed[0], allowed[1], "tcp")

    def _relay(self, nextlayer, address: tuple[str, int], name: str, d: Decision,
               kind: str) -> None:
        context = nextlayer.context
        if context.server.address != address:
            context.server.address = address
        self._bind(context.client, address)
        self.approvals.approve_relay(context.client, {
            "name": name, "rule": d.rule, "reason": d.reason, "kind": kind,
            "address": address,
        })
        _set_layer(nextlayer, layers.TCPLayer)

    def _refuse(self, nextlayer, name: str | None, reason: str, port: int | None = None) -> None:
        """Answer with the HTTP layer (a 400 to anything that is not HTTP) and log it."""
        context = nextlayer.context
        logger.warning(f"panopticon: not relaying a connection to "
                       f"{_addr(context.server.address)}: {reason}")
        _set_layer(nextlayer, lambda c: layers.HttpLayer(c, HTTPMode.transparent))
        flowlog.write_record({
            "kind": "tcp", "client": _addr(context.client.peername), "host": name,
            "decision": "deny", "reason": reason, "rule": None,
            "port": port or (context.server.address[1] if context.server.address else None),
            "duration_ms": 0,
        })

    def tcp_start(self, flow: tcp.TCPFlow):
        try:
            info = self.approvals.relay(flow.client_conn)
            address = flow.server_conn.address
            if info is None or address is None or tuple(address) != info["address"]:
                return  # not ours: Enforce and FinalGuard kill it
            verdict.record(flow, allowed=True, reason=info["reason"], host=info["name"], by=BY,
                           rule=info["rule"])
            flow.metadata[BYTES] = [0, 0]
            flowlog.annotate(flow, relay=info["kind"], address=address[0],
                             sni=info["name"] if info["kind"] == "passthrough" else None)
        except Exception:
            logger.exception("panopticon: tcp_start failed; killing the relay")
            verdict.record(flow, allowed=False, reason=INTERNAL_ERROR, host=None, by=BY)
            verdict.kill(flow)

    def tcp_message(self, flow: tcp.TCPFlow):
        counts = flow.metadata.get(BYTES)
        if counts is None or not flow.messages:
            return
        for m in flow.messages:
            counts[0 if m.from_client else 1] += len(m.content)
        # Relayed bytes are counted, not kept: a long tunnel would hold them all.
        flow.messages.clear()

    def tcp_end(self, flow: tcp.TCPFlow):
        self._count(flow)

    def tcp_error(self, flow: tcp.TCPFlow):
        self._count(flow)

    def _count(self, flow: tcp.TCPFlow) -> None:
        counts = flow.metadata.get(BYTES)
        if counts is not None:
            flowlog.annotate(flow, bytes_out=counts[0], bytes_in=counts[1])

    # -- the last gate

    def server_connect(self, data: server_hooks.ServerConnectionHookData):
        try:
            if data.server.error:
                return
            why = self._connect_refusal(data)
        except Exception:
            logger.exception("panopticon: checking a server connection failed; refusing it")
            why = INTERNAL_ERROR
        if why:
            logger.warning(f"panopticon: refused to connect to {_addr(data.server.address)}: {why}")
            data.server.error = f"panopticon: {why}"

    def _connect_refusal(self, data: server_hooks.ServerConnectionHookData) -> str | None:
        if not data.server.address:
            return "no destination"
        if not _outbound(data.client):
            # DNS mode dials only the configured resolvers on 53, inbound routes only the
            # agent's port on loopback: verdict.Approvals gates those.
            return None
        address = (canonical_ip(str(data.server.address[0])), int(data.server.address[1]))
        if address not in self.bound.get(data.client.id, ()):
            return "no allowed name was bound to this address"
        return self.guard().refusal(address[0])


def add_worker_options(loader) -> None:
    """Declare `panopticon_worker` (FlowLog's) and `panopticon_pins_socket`."""
    flowlog.add_worker_option(loader)
    loader.add_option(
        PINS_SOCKET_OPTION, str, "",
        "Unix socket on which worker 0 shares its DNS pins with the other workers; "
        "empty: one worker.",
    )


def _set_layer(nextlayer: proxy_layer.NextLayer, make: Callable) -> None:
    """Replace the layer decided for a connection's first bytes. Layers append themselves
    to the context when made: drop those that earlier addons made for this decision, or
    the stack would hold layers that never run."""
    del nextlayer.context.layers[1:]
    nextlayer.layer = make(nextlayer.context)


def _outbound(client) -> bool:
    """The agent's own connections (transparent mode); not DNS mode, not inbound routes."""
    return isinstance(client.proxy_mode, mode_specs.TransparentMode)


def _carries_doh(req: http.Request) -> bool:
    for header in ("content-type", "accept"):
        value = req.headers.get(header, "").lower()
        if any(t in value for t in DOH_TYPES):
            return True
    if req.method.upper() != "GET":
        return False
    if "dns" in req.query:  # RFC 8484 GET
        return True
    # The JSON resolver APIs (Google's /resolve?name=, Cloudflare's /dns-query?name=),
    # which need no special header.
    path = req.path.split("?", 1)[0].rstrip("/").lower()
    return "name" in req.query and path.endswith(("/resolve", "/dns-query"))


def _exact(rule: str | None) -> bool:
    """Whether the rule that allowed a request names one host or address."""
    if not rule or rule.startswith(("*.", "passthrough ")):
        return False
    return "/" not in rule.split(" ", 1)[0] or rule.endswith(("/32", "/128"))


def _is_ip(h: str) -> bool:
    try:
        ipaddress.ip_address(h)
        return True
    except ValueError:
        return False


def _family(ip: str) -> int:
    return 6 if ":" in ip else 4


def _addr(address) -> str:
    if not address:
        return "?"
    host, port = str(address[0]), address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
