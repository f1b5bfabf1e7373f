"""Secrets the agent never holds: swap, tripwires, reflection redaction, DLP (threats 31-38).

The agent holds placeholders; the daemon hands the real values to the proxy alone
(`secretsource`, option `panopticon_secrets`). Three addons share one `Secrets` core:

- `SecretGuard`, right after Enforce and Binding: judges what the agent sends. In
  `requestheaders` it reads the decision Enforce recorded (`verdict`: the checked name,
  SNI for TLS and Host for plain HTTP) and works out which secrets may be swapped in:
  those whose `domains` match that name, over TLS unless `allow_plaintext`. The URL,
  every header and the name itself are scanned (`secretscan`): a real value is a breach,
  the placeholder of any other secret a tripwire, a credential shape a DLP hit; each
  blocks with a 403 and a log record (`tripwire`: kind "tripwire" naming the secret and
  the destination; `dlp`: kind "dlp"). `on_tripwire = "kill"` also marks the jail
  tripped: every later request and query is refused and the daemon ends the agent.
  On the way back (`responseheaders`, `response`, `websocket_message`) it puts the
  agent's own request back in the flow, so that no log and no later addon sees a real
  value, and replaces any real value in the response (headers and bodies, streamed
  too) by its placeholder; a real value in a form that cannot be replaced in place
  (base64, hex) ends the response instead.
- `SecretSwap`, last before the final guard: swaps the placeholders for the real values
  (headers, URL, body unless `headers_only`), as late as possible so that the
  operator's addons never see a real value; it scans and swaps bodies: a buffered one
  whole after removing its content-encoding (it is sent decoded, so an upstream that
  echoes it cannot hand back the value compressed), a streamed one (large, or of
  unknown length) chunk by chunk through an overlap window, with memory bounded.
- `SecretDns`, ahead of mitmproxy's resolver: a placeholder or a value in a DNS
  question (plain, hex, base32, base64, labels joined) is a tripwire: NXDOMAIN.

Inbound flows (`inbound.is_inbound`) run the other way: what the outside client sends
is redacted, what the agent answers is judged.

Every hook fails closed: an exception refuses the request or ends the flow.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

from mitmproxy import ctx, dns, http

from panopticond import contentcoding, dlp, secretscan, secretsource
from panopticond.addons import flowlog, verdict
from panopticond.addons.inbound import is_inbound
from panopticond.policy import HostPattern, canonical_host
from panopticond.secretscan import DLP, PLACEHOLDER, VALUE, Hit

logger = logging.getLogger(__name__)

OPTION = "panopticon_secrets"
BY = "secretswap"
STATE = "panopticon_secrets"
DECODE_LIMIT = 64 * 1024 * 1024  # largest buffered body we decode (a bomb stops there)
INTERNAL = "internal error in the proxy"
UNAVAILABLE = "the secrets are not loaded"
MAX_BYTES = 16 * 1024 * 1024
# Where a client puts its own credential: on an `exclusive` secret's domains each must
# carry a placeholder (threat 36). A fixed list, not a setting: one list to audit.
CREDENTIAL_HEADERS = frozenset((b"authorization", b"proxy-authorization", b"x-api-key",
                                b"api-key", b"x-auth-token"))


# --- what the proxy knows: the secrets file --------------------------------------------


@dataclasses.dataclass(frozen=True)
class Bound:
    """Where a secret may go."""

    name: str
    domains: tuple[HostPattern, ...]
    headers_only: bool = False
    allow_plaintext: bool = False
    on_tripwire: str = "deny"
    exclusive: bool = False

    def matches(self, host: str | None) -> bool:
        return host is not None and any(p.matches(host) for p in self.domains)

    def shown(self) -> str:
        return ", ".join(str(p) for p in self.domains)


class Rules:
    """One loaded secrets file: the catalog of forms, the bindings, the DLP mode."""

    def __init__(self, parsed: dict[str, Any]):
        items = parsed["secrets"]
        self.bound = {s["name"]: Bound(
            s["name"], tuple(HostPattern.parse(d) for d in s["domains"]), s["headers_only"],
            s["allow_plaintext"], s["on_tripwire"], s["exclusive"]) for s in items}
        secrets = [secretscan.Secret(s["name"], s["placeholder"].encode(), s["value"].encode())
                   for s in items]
        self.catalog = secretscan.Catalog(secrets, dlp.rules(parsed["dlp_patterns"]))
        self.dlp_block = parsed["dlp"] == "block"
        self.scrubber = secretscan.Replacer(
            (f, f"(secret {s.name})".encode())
            for s in secrets for f in secretscan.encoded_forms(s.value))

    @classmethod
    def empty(cls) -> Rules:
        return cls(secretsource.parse_doc(secretsource.proxy_doc([])))

    def swap_for(self, host: str | None, tls: bool) -> frozenset[str]:
        return frozenset(n for n, b in self.bound.items()
                         if b.matches(host) and (tls or b.allow_plaintext))

    def bound_here(self, host: str | None) -> bool:
        return any(b.matches(host) for b in self.bound.values())

    def foreign_credential(self, host: str | None, fields) -> tuple[str, str] | None:
        """On the domains of an `exclusive` secret, the first credential header (of
        `fields`, the request's (name, value) pairs) that carries no placeholder of a
        secret bound there, as the swap finds one (anywhere in the value, or inside
        Basic's base64): (the secrets' names, the header's name). None if all is well.
        Empty headers carry nothing. Never the value."""
        bound = [b for b in self.bound.values() if b.matches(host)]
        owners = sorted(b.name for b in bound if b.exclusive)
        if not owners:
            return None
        placeholders = [self.catalog.secrets[b.name].placeholder for b in bound]
        for name, value in fields:
            if name.lower() not in CREDENTIAL_HEADERS or not value.strip():
                continue
            views = [value]
            decoded = _basic_decoded(name, value)
            if decoded is not None:
                views.append(decoded)
            if not any(ph in v for ph in placeholders for v in views):
                return ", ".join(owners), name.decode("latin-1").lower()
        return None


class SecretsFile:
    """The secrets file at option `panopticon_secrets`, re-read when it changes (looked at
    at most once per `interval`). No path: no secrets, built-in DLP rules. A path that
    cannot be read or parsed: `current()` is None and everything is refused."""

    def __init__(self, *, interval: float = 1.0, clock: Callable[[], float] = time.monotonic):
        self.interval = interval
        self.clock = clock
        self.path = ""
        self.rules: Rules | None = Rules.empty()
        self.error: str | None = None
        self._sig: tuple | None = None
        self._checked = float("-inf")
        self._logged: str | None = None

    def load(self, path: str) -> None:
        self.path, self._sig = path, None
        self._refresh()

    def current(self) -> Rules | None:
        if self.clock() - self._checked >= self.interval:
            self._refresh()
        return self.rules

    def _refresh(self) -> None:
        self._checked = self.clock()
        if not self.path:
            self.rules, self.error = Rules.empty(), None
            return
        try:
            st = os.stat(self.path)
            sig = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            if sig == self._sig and self.rules is not None:
                return
            with open(self.path, "rb") as f:
                raw = f.read(MAX_BYTES + 1)
            if len(raw) > MAX_BYTES:
                raise ValueError("it is too large")
            rules = Rules(secretsource.parse_doc(json.loads(raw)))
        except (OSError, ValueError, TypeError) as e:
            why = f"cannot use the secrets file {self.path}: " + (
                e.strerror if isinstance(e, OSError) and e.strerror else
                str(e) if not isinstance(e, json.JSONDecodeError) else "not JSON")
            self.rules, self.error = None, why
            if why != self._logged:
                self._logged = why
                logger.error(f"panopticon: {why}; refusing every request")
            return
        self._sig, self.rules, self.error, self._logged = sig, rules, None, None
        logger.info(f"panopticon: secrets loaded from {self.path}: "
                    f"{', '.join(rules.bound) or 'none'}")


# --- per flow --------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class FlowState:
    host: str | None  # the checked name, canonical
    tls: bool
    swap: frozenset[str]  # secrets whose placeholder becomes the real value here
    inbound: bool = False
    # The agent's own request (header fields, path, body) while the flow carries real
    # values instead; put back once the request is gone.
    saved: tuple | None = dataclasses.field(default=None, repr=False)
    # (what we sent, what the agent wrote) for forms made here (a Basic token).
    reverse: list = dataclasses.field(default_factory=list, repr=False)
    swapped: set = dataclasses.field(default_factory=set)
    dlp_logged: set = dataclasses.field(default_factory=set)
    body_streamed: bool = False
    # Set once a real value was found in the request: applied to every name logged.
    scrubber: secretscan.Replacer | None = dataclasses.field(default=None, repr=False)

    def shown(self, host: str | None) -> str | None:
        if host is None or self.scrubber is None:
            return host
        return self.scrubber.replace(host.encode("utf-8", "replace"))[0].decode(
            "utf-8", "replace")


def _state(flow) -> FlowState | None:
    s = flow.metadata.get(STATE)
    return s if isinstance(s, FlowState) else None


# --- the core, shared by the three addons ------------------------------------------------


class Blocked(Exception):
    pass


class Secrets:
    def __init__(self, file: SecretsFile | None = None):
        self.file = file or SecretsFile()
        self.tripped: str | None = None  # the secret whose tripwire ends this jail

    def rules(self) -> Rules | None:
        return self.file.current()

    # -- records

    def record(self, flow, kind: str, **fields: Any) -> None:
        rec = {"kind": kind, "client": _addr(flow.client_conn.peername), **fields}
        if not flowlog.write_record(rec):
            logger.error(f"panopticon: could not log a {kind} record")

    def trip(self, flow, rules: Rules, hit: Hit, where: str, host: str | None) -> tuple[str, str]:
        """Log a tripwire or breach; (reason, text for the agent)."""
        b = rules.bound.get(hit.name)
        kill = b is not None and b.on_tripwire == "kill"
        shown = verdict.printable(host) if host else "(inbound client)"
        if hit.kind == VALUE:
            reason = f"breach: the real value of secret {hit.name} in the agent's traffic"
            text = (f"panopticon: blocked: this carries the real value of secret {hit.name}, "
                    "which the agent must never hold.\n")
        else:
            st = _state(flow)
            plain = st is not None and not st.tls and b is not None and b.matches(host)
            reason = (f"tripwire: the placeholder of secret {hit.name} "
                      + ("over plain HTTP" if plain else "toward a host it is not bound to"))
            text = (f"panopticon: blocked: this carries the placeholder of secret {hit.name}, "
                    f"which may only be sent to {b.shown() if b else '?'}"
                    + ("" if b is None or b.allow_plaintext else " over HTTPS") + ".\n")
        self.record(flow, "tripwire", secret=hit.name, found=hit.kind, host=shown,
                    where=where, form=hit.form, action="kill" if kill else "deny",
                    reason=reason)
        logger.warning(f"panopticon: {reason}: {where} ({hit.form}) to {shown}"
                       + ("; ending the agent" if kill else ""))
        if kill and self.tripped is None:
            self.tripped = hit.name
        return reason, text

    def handle(self, flow, rules: Rules, hits: Iterable[Hit], where: str,
               host: str | None) -> tuple[str, str] | None:
        """Act on `hits`; (reason, text) if the data must be refused."""
        st = _state(flow)
        for hit in hits:
            if hit.kind == DLP:
                key = (hit.name, where)
                if st is not None and key in st.dlp_logged:
                    continue
                if st is not None:
                    st.dlp_logged.add(key)
                action = "deny" if rules.dlp_block else "log"
                shown = verdict.printable(host) if host else "(inbound client)"
                reason = f"dlp: a credential ({hit.name}) in the {where}"
                self.record(flow, "dlp", pattern=hit.name, host=shown, where=where,
                            form=hit.form, action=action, reason=reason)
                logger.warning(f"panopticon: {reason} to {shown}"
                               + ("" if rules.dlp_block else " (logged only)"))
                if rules.dlp_block:
                    return reason, (
                        f"panopticon: blocked: the {where} looks like it carries a credential "
                        f"({hit.name}). If it is meant to go, the operator can switch the "
                        "pattern off or set dlp = \"log\".\n")
                continue
            if hit.kind == VALUE:
                self.scrub(flow, rules)
                if st is not None:
                    host = st.shown(host)
            return self.trip(flow, rules, hit, where, host)
        return None

    def scrub(self, flow, rules: Rules) -> None:
        """A real value in the agent's request: take it out of the flow before anything
        logs it (the request is refused anyway)."""
        st = _state(flow)
        if st is not None:
            st.scrubber = rules.scrubber
            v = verdict.get(flow)
            if v is not None and v.get("host"):
                v["host"] = st.shown(v["host"])
        req = flow.request
        req.data.path = rules.scrubber.replace(req.data.path)[0]
        req.headers.fields = tuple((n, rules.scrubber.replace(v)[0]) for n, v in
                                   req.headers.fields)
        if req.raw_content:
            req.data.content = rules.scrubber.replace(req.raw_content)[0]

    # -- swapping, restoring

    def restore(self, flow) -> None:
        st = _state(flow)
        if st is None or st.saved is None:
            return
        fields, path, content = st.saved
        req = flow.request
        req.headers.fields = fields
        req.data.path = path
        if content is not None:
            req.data.content = content
        st.saved = None

    def save(self, flow, st: FlowState) -> None:
        if st.saved is None:
            req = flow.request
            st.saved = (req.headers.fields, req.data.path, req.raw_content)

    def inbound_rules(self, rules: Rules, st: FlowState | None) -> tuple[
            secretscan.Replacer, secretscan.Inspector]:
        """Redaction of what comes in to the agent, with this flow's own reverse pairs."""
        replacer, blocking = rules.catalog.response_rules()
        if st is not None and st.reverse:
            replacer = secretscan.Replacer([*st.reverse, *replacer.map.items()])
        return replacer, blocking


# --- failing closed ---------------------------------------------------------------------


def _fail_closed(phase: str):
    def wrap(hook):
        @functools.wraps(hook)
        def guarded(self, flow):
            try:
                return hook(self, flow)
            except Exception:
                logger.exception(f"panopticon: secrets: {hook.__name__} failed; refusing")
                try:
                    _refuse(flow, phase, 403, f"panopticon: blocked: {INTERNAL}.\n", INTERNAL,
                            None)
                except Exception:
                    logger.exception("panopticon: could not refuse after an error")
                    verdict.kill(flow)
        return guarded
    return wrap


def _refuse(flow, phase: str, status: int, text: str, reason: str, host: str | None) -> None:
    """Refuse a request (a local answer when nothing went out yet), or end a response."""
    st = _state(flow)
    host = st.shown(host) if st is not None else host
    if isinstance(flow, http.HTTPFlow) and phase in ("requestheaders", "request") \
            and flow.live and flow.response is None:
        verdict.deny_http(flow, status, text, phase=phase, reason=reason, host=host, by=BY)
    elif isinstance(flow, http.HTTPFlow) and phase == "response" and flow.live:
        _record_deny(flow, reason, host)
        flow.response = http.Response.make(502, text, {"content-type": "text/plain"})
    else:
        _record_deny(flow, reason, host)
        _abort(flow, client=phase != "request-stream")


def _record_deny(flow, reason: str, host: str | None) -> None:
    st = _state(flow)
    host = st.shown(host) if st is not None else host
    v = verdict.get(flow) or {}
    verdict.record(flow, allowed=False, reason=reason, host=host or v.get("host"), by=BY,
                   rule=v.get("rule"))


def _abort(flow, *, client: bool) -> None:
    """End a flow whose body is already on its way: mitmproxy cannot kill a flow in
    transit (mitmproxy#4711), so the upstream connection (and with `client`, the
    agent's) is reset: the far side sees a broken message, never a complete one."""
    verdict.kill(flow)
    handler = None
    try:
        server = ctx.master.addons.get("proxyserver")
        handler = server.connections.get(flow.client_conn.id) if server else None
    except Exception:
        logger.exception("panopticon: cannot find the flow's connections to reset them")
    conns = [flow.server_conn, flow.client_conn] if client else [flow.server_conn]
    for conn in conns:
        io = handler.transports.get(conn) if handler is not None else None
        writer = getattr(io, "writer", None)
        if writer is None:
            continue
        transport = getattr(writer, "transport", None)
        if transport is not None:
            transport.abort()
        else:
            writer.close()
        try:
            handler.close_connection(conn)
        except Exception:
            pass


# --- bodies --------------------------------------------------------------------------


def _content_kind(headers) -> str:
    ctype = headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if ctype == "application/x-www-form-urlencoded":
        return "form"
    if ctype.endswith("json"):
        return "json"
    return "raw"


def _escape(kind: str, value: bytes) -> bytes:
    if kind in ("form", "url"):
        return secretscan.url_escape(value)
    if kind == "json":
        return secretscan.json_escape(value)
    return value


def _reframe(msg, http1: bool) -> None:
    """The body's length changes as it streams: no Content-Length; chunked on HTTP/1.1
    (HTTP/2 frames itself; an HTTP/1.0 response is read until the connection closes)."""
    if "content-length" in msg.headers:
        del msg.headers["content-length"]
    if http1 and "chunked" not in msg.headers.get("transfer-encoding", "").lower():
        msg.headers["transfer-encoding"] = "chunked"


def _no_body(flow, msg) -> bool:
    if isinstance(msg, http.Response):
        return flow.request.method.upper() == "HEAD" or msg.status_code in (204, 304) \
            or msg.status_code < 200
    return msg.http_version.startswith("HTTP/1") and "content-length" not in msg.headers \
        and "transfer-encoding" not in msg.headers


def _may_stream(flow, msg) -> bool:
    """Streamed already, or of unknown length: mitmproxy would switch such a body to
    streaming half-way (past stream_large_bodies) without calling any hook, so it is
    streamed through us from the start."""
    return not _no_body(flow, msg) and (bool(msg.stream) or "content-length" not in msg.headers)


def _swap(data: bytes, pairs) -> tuple[bytes, set[str]]:
    """Each (name, placeholder, value) swapped; placeholders never overlap each other
    nor any value (config and secretsource check it), so the order does not matter."""
    names = set()
    for name, old, new in pairs:
        if old in data:
            data = data.replace(old, new)
            names.add(name)
    return data, names


class BodyStream:
    """The callable mitmproxy feeds a streamed body to, one chunk at a time (b"" ends it).

    Decodes the content-encoding if there is one and scans through an overlap window
    (`inspector`): what the agent sends is scanned as it came; what comes in to the
    agent is scanned after `replacer` has swapped what it can (`inspect_output`), whose
    guard holds back any part of a pattern that could still complete. It passes on the
    raw chunks when there is no replacer (inspection only), else the decoded, swapped
    data (the content-encoding header was dropped). Memory: the window, the held-back
    tail, and what one chunk decodes to."""

    def __init__(self, core: Secrets, flow, *, phase: str, where: str, host: str | None,
                 inspector: secretscan.Inspector, replacer: secretscan.StreamReplacer | None,
                 decoder: contentcoding.StreamDecoder | None, inspect_output: bool = False,
                 on_swapped: Callable[[], None] | None = None):
        self.core, self.flow, self.phase, self.where, self.host = core, flow, phase, where, host
        self.inspector = secretscan.StreamInspector(inspector)
        self.replacer = replacer
        self.decoder = decoder
        self.inspect_output = inspect_output and replacer is not None
        self.on_swapped = on_swapped
        self.blocked = False

    def __call__(self, chunk: bytes) -> list[bytes]:
        # A list, never b"": mitmproxy frames an empty chunk as chunked encoding's last
        # one, which would end the body early (and, once blocked, cleanly).
        if self.blocked:
            return []
        why = None
        try:
            out = self._feed(chunk)
            return [out] if out else []
        except Blocked as e:
            why = str(e)
        except contentcoding.DecodeError as e:
            why = f"the {self.where} cannot be decoded for inspection ({e})"
        except Exception:
            logger.exception("panopticon: secrets: a body stream failed; ending the flow")
            why = INTERNAL
        self.blocked = True
        _refuse(self.flow, self.phase, 403, "", why, self.host)
        return []

    def _inspect(self, rules: Rules, data: bytes) -> None:
        hits = self.inspector.feed(data)
        if hits:
            refusal = self.core.handle(self.flow, rules, hits, self.where, self.host)
            if refusal:
                raise Blocked(refusal[0])

    def _feed(self, chunk: bytes) -> bytes:
        rules = self.core.rules()
        if rules is None:
            raise Blocked(UNAVAILABLE)
        end = chunk == b""
        pieces: Iterable[bytes] = (chunk,) if self.decoder is None else self.decoder.feed(chunk)
        out = []
        for piece in pieces:
            if self.inspect_output:
                piece = self.replacer.feed(piece)
                self._inspect(rules, piece)
                out.append(piece)
            else:
                self._inspect(rules, piece)
                if self.replacer is not None:
                    out.append(self.replacer.feed(piece))
        if end:
            if self.decoder is not None:
                self.decoder.end()
            if self.replacer is not None:
                tail = self.replacer.flush()
                if self.inspect_output:
                    self._inspect(rules, tail)
                out.append(tail)
                if self.replacer.count and self.on_swapped is not None:
                    self.on_swapped()
        if self.replacer is None:
            return chunk  # inspected only: the bytes go on as they came
        return b"".join(out)


# --- the addons ----------------------------------------------------------------------


class SecretGuard:
    """Judges what leaves, redacts what comes back (see the module's docstring)."""

    name = "panopticon_secretguard"

    def __init__(self, core: Secrets | None = None):
        self.core = core or Secrets()

    def load(self, loader):
        loader.add_option(
            OPTION, str, "",
            "Path of panopticon's secrets file (JSON, readable by the proxy user alone). "
            "Empty: no secrets (credential shapes are still refused). Unreadable or "
            "invalid: every request is refused.",
        )

    def configure(self, updated):
        if OPTION in updated:
            self.core.file.load(ctx.options.panopticon_secrets)
            if self.core.file.path:
                _not_dumpable()

    # -- requests

    @_fail_closed("requestheaders")
    def requestheaders(self, flow: http.HTTPFlow):
        if flow.error or not flow.live or flow.response is not None:
            return
        v = verdict.get(flow)
        if v is None or v.get("decision") != "allow":
            return
        rules = self.core.rules()
        if rules is None:
            return _refuse(flow, "requestheaders", 403,
                           f"panopticon: blocked: {UNAVAILABLE}.\n", UNAVAILABLE, v.get("host"))
        req = flow.request
        if is_inbound(flow):
            flow.metadata[STATE] = FlowState(None, bool(flow.client_conn.tls), frozenset(),
                                             inbound=True)
            return self._redact_head(flow, req, rules, "request", "requestheaders")
        if self.core.tripped:
            reason = f"tripwire: secret {self.core.tripped}: the jail is stopping"
            return _refuse(flow, "requestheaders", 403, f"panopticon: blocked: {reason}.\n",
                           reason, v.get("host"))
        try:
            host = canonical_host(v.get("host") or "")
        except ValueError:
            host = None
        tls = bool(flow.client_conn.tls) and req.scheme == "https"
        st = FlowState(host, tls, rules.swap_for(host, tls))
        flow.metadata[STATE] = st
        inspector = rules.catalog.request_inspector(st.swap)
        parts = [("url", req.data.path)] + [
            (f"header {n.decode('latin-1').lower()}", n + b": " + val)
            for n, val in req.headers.fields]
        parts += [(f"header {n.decode('latin-1').lower()} (decoded)", d)
                  for n, val in req.headers.fields if (d := _basic_decoded(n, val))]
        name_hits = [h for h in rules.catalog.name_hits(v.get("host") or "")
                     if not (h.kind == PLACEHOLDER and h.name in st.swap)]
        found = [("host name", name_hits)]
        # One pass over it all, the usual case being nothing found; then part by part,
        # to say where.
        if inspector.scan(b"\n".join(data for _, data in parts)):
            found += [(w, inspector.scan(data)) for w, data in parts]
        for where, hits in found:
            if where == "header cookie":
                # Cookies go back to the site that set them: a session JWT there is no
                # credential of the agent's making. Tripwires and breaches still count.
                hits = [h for h in hits if h.kind != DLP]
            refusal = self.core.handle(flow, rules, hits, where, host)
            if refusal:
                return _refuse(flow, "requestheaders", 403, refusal[1], refusal[0], host)
        foreign = rules.foreign_credential(host, req.headers.fields)
        if foreign:
            owners, header = foreign
            reason = (f"exclusive: the {header} header to a domain of secret {owners} "
                      "carries a credential other than its placeholder")
            logger.warning(f"panopticon: {reason} ({verdict.printable(host or '')})")
            return _refuse(flow, "requestheaders", 403, f"panopticon: blocked: {reason}; only "
                           "the placeholder the agent was given may be sent there.\n", reason,
                           host)

    # -- responses (and the requests of inbound flows)

    @_fail_closed("responseheaders")
    def responseheaders(self, flow: http.HTTPFlow):
        self.core.restore(flow)
        if flow.error or not flow.live or flow.response is None:
            return
        st = _state(flow)
        rules = self.core.rules()
        if rules is None:
            return _refuse(flow, "responseheaders", 403, "", UNAVAILABLE, None)
        if st is not None and st.inbound:
            return self._judge_response_of_agent(flow, rules, st)
        if not rules.bound:
            return
        self._redact_head(flow, flow.response, rules, "response", "responseheaders")

    @_fail_closed("response")
    def response(self, flow: http.HTTPFlow):
        self.core.restore(flow)
        if flow.error or not flow.live or flow.response is None:
            return
        st = _state(flow)
        resp = flow.response
        rules = self.core.rules()
        if rules is None:
            return _refuse(flow, "response", 502, f"panopticon: blocked: {UNAVAILABLE}.\n",
                           UNAVAILABLE, None)
        if resp.raw_content is None or resp.stream:
            return  # streamed: BodyStream did it
        if st is not None and st.inbound:
            data = _decoded(resp)
            if data is None:
                return _refuse(flow, "response", 502, "panopticon: blocked: the response "
                               "cannot be decoded for inspection.\n", "undecodable body", None)
            refusal = self.core.handle(flow, rules, rules.catalog.request_inspector().scan(data),
                                       "response body", None)
            if refusal:
                _refuse(flow, "response", 502, refusal[1], refusal[0], None)
            return
        if not rules.bound or not resp.raw_content:
            return
        self._redact_body(flow, resp, rules, st, "response", "response")

    @_fail_closed("request")
    def request(self, flow: http.HTTPFlow):
        st = _state(flow)
        if st is None or not st.inbound or flow.error or not flow.live \
                or flow.response is not None or not flow.request.raw_content \
                or flow.request.stream:
            return
        rules = self.core.rules()
        if rules is None:
            return _refuse(flow, "request", 403, "", UNAVAILABLE, None)
        if rules.bound:
            self._redact_body(flow, flow.request, rules, st, "request", "request")

    @_fail_closed("error")
    def error(self, flow: http.HTTPFlow):
        self.core.restore(flow)

    @_fail_closed("websocket")
    def websocket_message(self, flow: http.HTTPFlow):
        if flow.websocket is None or not flow.websocket.messages:
            return
        msg = flow.websocket.messages[-1]
        st = _state(flow)
        rules = self.core.rules()
        if rules is None:
            msg.drop()
            return _abort(flow, client=True)
        inbound_flow = st is not None and st.inbound
        leaving = msg.from_client != inbound_flow  # from the agent, toward the outside
        data = msg.content
        if leaving:
            inspector = rules.catalog.request_inspector(st.swap if st else frozenset())
            refusal = self.core.handle(flow, rules, inspector.scan(data), "websocket message",
                                       st.host if st else None)
            if refusal:
                msg.drop()
                _record_deny(flow, refusal[0], st.host if st else None)
                _abort(flow, client=True)
            # No swap in WebSocket messages: they stay in the flow after they are sent.
            return
        if not rules.bound:
            return
        replacer, blocking = self.core.inbound_rules(rules, st)
        new, n = replacer.replace(data)
        hits = blocking.scan(new)
        if hits:
            self.core.handle(flow, rules, hits[:1], "websocket message",
                             st.host if st else None)
            msg.drop()
            _record_deny(flow, "a real secret value in a form that cannot be redacted", None)
            return _abort(flow, client=True)
        if n:
            msg.content = new
            flowlog.annotate(flow, redacted=True)

    # -- helpers

    def _redact_head(self, flow, msg, rules: Rules, what: str, phase: str) -> None:
        """Real values in the headers (and URL) of what comes in to the agent become
        placeholders; a form that cannot be replaced ends it; the body is planned."""
        st = _state(flow)
        replacer, blocking = self.core.inbound_rules(rules, st)
        fields = []
        changed = 0
        for name, value in msg.headers.fields:
            new, n = replacer.replace(value)
            hits = blocking.scan(new)
            if hits:
                return self._block_incoming(flow, rules, hits, what, phase)
            changed += n
            fields.append((name, new))
        if isinstance(msg, http.Request):
            path, n = replacer.replace(msg.data.path)
            hits = blocking.scan(path)
            if hits:
                return self._block_incoming(flow, rules, hits, what, phase)
            msg.data.path = path
            changed += n
        if changed:
            msg.headers.fields = tuple(fields)
            flowlog.annotate(flow, redacted=True)
        if _may_stream(flow, msg):
            self._stream_incoming(flow, msg, rules, st, what, phase)

    def _stream_incoming(self, flow, msg, rules: Rules, st, what: str, phase: str) -> None:
        encoding = msg.headers.get("content-encoding", "")
        if not contentcoding.supported(encoding):
            return self._block_reason(flow, f"the {what} body's content-encoding cannot be "
                                      "inspected", phase)
        decoder = None if contentcoding.normalise(encoding) in contentcoding.IDENTITY \
            else contentcoding.StreamDecoder(encoding)
        host = st.host if st else None
        replacer, blocking = self.core.inbound_rules(rules, st)
        if st is not None and st.inbound or rules.bound_here(host):
            # Its real values are replaced (the length may change), decoded.
            if decoder is not None:
                del msg.headers["content-encoding"]
            if decoder is not None or any(len(a) != len(b) for a, b in replacer.map.items()):
                _reframe(msg, flow.request.http_version == "HTTP/1.1")
            stream_replacer = secretscan.StreamReplacer(
                replacer, guard=[n for n, _ in blocking.needles.items])
            inspector = blocking
        else:
            # A host no secret is bound to never got a value: any form of one ends it.
            inspector = secretscan.Inspector(secretscan.Needles({
                f: (VALUE, n, form) for n, forms in _value_forms(rules).items()
                for f, form in forms.items()}))
            stream_replacer = None if decoder is not None else secretscan.StreamReplacer(
                secretscan.Replacer(()), guard=[n for n, _ in inspector.needles.items])
        msg.stream = BodyStream(self.core, flow, phase="response-stream",
                                where=f"{what} body", host=host, inspector=inspector,
                                replacer=stream_replacer, decoder=decoder, inspect_output=True)

    def _redact_body(self, flow, msg, rules: Rules, st, what: str, phase: str) -> None:
        data = _decoded(msg)
        if data is None:
            return self._block_reason(flow, f"the {what} body cannot be decoded for "
                                      "inspection", phase)
        replacer, blocking = self.core.inbound_rules(rules, st)
        new, n = replacer.replace(data)
        hits = blocking.scan(new)
        if hits:
            return self._block_incoming(flow, rules, hits, what, phase)
        if n:
            msg.content = new  # encoded again as its content-encoding says
            flowlog.annotate(flow, redacted=True)

    def _judge_response_of_agent(self, flow, rules: Rules, st: FlowState) -> None:
        """An inbound flow's response leaves the jail: judged like an outgoing request."""
        resp = flow.response
        inspector = rules.catalog.request_inspector()
        for name, value in resp.headers.fields:
            where = f"response header {name.decode('latin-1').lower()}"
            hits = inspector.scan(value)
            if where == "response header set-cookie":  # the session of its own web UI
                hits = [h for h in hits if h.kind != DLP]
            refusal = self.core.handle(flow, rules, hits, where, None)
            if refusal:
                return _refuse(flow, "responseheaders", 403, "", refusal[0], None)
        if _may_stream(flow, resp):
            encoding = resp.headers.get("content-encoding", "")
            if not contentcoding.supported(encoding):
                return self._block_reason(flow, "the response's content-encoding cannot be "
                                          "inspected", "responseheaders")
            decoder = None if contentcoding.normalise(encoding) in contentcoding.IDENTITY \
                else contentcoding.StreamDecoder(encoding)
            resp.stream = BodyStream(self.core, flow, phase="response-stream",
                                     where="response body", host=None, inspector=inspector,
                                     replacer=None, decoder=decoder)

    def _block_incoming(self, flow, rules: Rules, hits, what: str, phase: str) -> None:
        st = _state(flow)
        host = st.host if st else None
        self.core.trip(flow, rules, hits[0], f"{what} ({hits[0].form}, not redactable)", host)
        self._block_reason(flow, f"the {what} carried a real secret value in a form that "
                           "cannot be redacted", phase)

    def _block_reason(self, flow, reason: str, phase: str) -> None:
        text = f"panopticon: blocked: {reason}.\n"
        if phase == "responseheaders":
            # The body has not been read yet: the agent gets no part of it.
            _record_deny(flow, reason, None)
            _abort(flow, client=True)
        else:
            _refuse(flow, phase, 502 if phase == "response" else 403, text, reason, None)


class SecretSwap:
    """Puts the real values in, last (see the module's docstring)."""

    name = "panopticon_secretswap"

    def __init__(self, core: Secrets | None = None):
        self.core = core or Secrets()

    @_fail_closed("requestheaders")
    def requestheaders(self, flow: http.HTTPFlow):
        st = _state(flow)
        if st is None or st.inbound or flow.error or not flow.live \
                or flow.response is not None or not verdict.is_allowed(flow):
            return
        rules = self.core.rules()
        if rules is None:
            self.core.restore(flow)
            return _refuse(flow, "requestheaders", 403, "", UNAVAILABLE, st.host)
        req = flow.request
        if st.swap:
            self._swap_head(flow, req, rules, st)
        if _may_stream(flow, req):
            self._stream_outgoing(flow, req, rules, st)

    @_fail_closed("request")
    def request(self, flow: http.HTTPFlow):
        st = _state(flow)
        if st is None or st.inbound or st.body_streamed or flow.error or not flow.live \
                or flow.response is not None or not verdict.is_allowed(flow):
            return
        req = flow.request
        if not req.raw_content:
            return
        rules = self.core.rules()
        refusal = None
        if rules is None:
            refusal = (UNAVAILABLE, f"panopticon: blocked: {UNAVAILABLE}.\n")
            data = None
        else:
            data = _decoded(req)
            if data is None:
                reason = "the request body cannot be decoded for inspection"
                refusal = (reason, f"panopticon: blocked: {reason}.\n")
            else:
                refusal = self.core.handle(flow, rules, rules.catalog.request_inspector(
                    st.swap).scan(data), "body", st.host)
        if refusal:
            self.core.restore(flow)
            return _refuse(flow, "request", 403, refusal[1], refusal[0], st.host)
        assert rules is not None and data is not None
        new, names = _swap(data, self._pairs(rules, st, _content_kind(req.headers), body=True))
        if names:
            self.core.save(flow, st)
            # Sent decoded: an upstream that echoes the body cannot hand the value back
            # compressed, past the redaction.
            if "content-encoding" in req.headers:
                del req.headers["content-encoding"]
            req.content = new
            self._swapped(flow, st, names)

    # -- helpers

    @staticmethod
    def _pairs(rules: Rules, st: FlowState, kind: str, body: bool) -> list:
        """(name, placeholder, the value as it must read in `kind`) for each secret
        swapped here (`body`: in the URL or body, which headers_only excludes)."""
        out = []
        for name in sorted(st.swap):
            if body and rules.bound[name].headers_only:
                continue
            s = rules.catalog.secrets[name]
            out.append((name, s.placeholder, _escape(kind, s.value)))
        return out

    def _swapped(self, flow, st: FlowState, names: Iterable[str]) -> None:
        st.swapped |= set(names)
        flowlog.annotate(flow, secrets=sorted(st.swapped))

    def _swap_head(self, flow, req, rules: Rules, st: FlowState) -> None:
        pairs = self._pairs(rules, st, "raw", body=False)
        fields, names = [], set()
        for name, value in req.headers.fields:
            if name.lower() != b"host":  # the name was judged, and stays what it was
                value, found = _swap(value, pairs)
                names |= found
                if name.lower() in (b"authorization", b"proxy-authorization"):
                    value, found = self._swap_basic(value, pairs, st)
                    names |= found
            fields.append((name, value))
        path, found = _swap(req.data.path, self._pairs(rules, st, "url", body=True))
        names |= found
        if names:
            self.core.save(flow, st)
            req.headers.fields = tuple(fields)
            req.data.path = path
            self._swapped(flow, st, names)

    @staticmethod
    def _swap_basic(value: bytes, pairs, st: FlowState) -> tuple[bytes, set[str]]:
        """`Basic base64(user:placeholder)`: swapped inside the base64; the token sent is
        remembered, so that a response echoing it gets the agent's token back."""
        scheme, _, token = value.partition(b" ")
        token = token.strip()
        if scheme.lower() != b"basic" or not token:
            return value, set()
        try:
            decoded = base64.b64decode(token, validate=True)
        except (binascii.Error, ValueError):
            return value, set()
        new, names = _swap(decoded, pairs)
        if not names:
            return value, set()
        new_token = base64.b64encode(new)
        st.reverse.append((new_token, token))
        return scheme + b" " + new_token, names

    def _stream_outgoing(self, flow, req, rules: Rules, st: FlowState) -> None:
        encoding = req.headers.get("content-encoding", "")
        if not contentcoding.supported(encoding):
            reason = "the request body's content-encoding cannot be inspected"
            self.core.restore(flow)
            return _refuse(flow, "requestheaders", 415, f"panopticon: blocked: {reason}.\n",
                           reason, st.host)
        decoder = None if contentcoding.normalise(encoding) in contentcoding.IDENTITY \
            else contentcoding.StreamDecoder(encoding)
        pairs = self._pairs(rules, st, _content_kind(req.headers), body=True)
        replacer = None
        on_swapped = None
        # HTTP/1.0 has no chunked framing for a body whose length changes: left as it is.
        if pairs and req.http_version in ("HTTP/1.1", "HTTP/2.0", "HTTP/3"):
            replacer = secretscan.StreamReplacer(secretscan.Replacer(
                (old, new) for _, old, new in pairs))
            if decoder is not None or any(len(old) != len(new) for _, old, new in pairs):
                self.core.save(flow, st)
                if decoder is not None:
                    del req.headers["content-encoding"]
                _reframe(req, req.http_version == "HTTP/1.1")
            on_swapped = functools.partial(self._swapped, flow, st, [n for n, _, _ in pairs])
        st.body_streamed = True
        req.stream = BodyStream(self.core, flow, phase="request-stream", where="body",
                                host=st.host, inspector=rules.catalog.request_inspector(st.swap),
                                replacer=replacer, decoder=decoder, on_swapped=on_swapped)


class SecretDns:
    """Placeholders and values in DNS questions: a tripwire, answered NXDOMAIN here."""

    name = "panopticon_secretdns"

    def __init__(self, core: Secrets | None = None):
        self.core = core or Secrets()

    def dns_request(self, flow: dns.DNSFlow):
        try:
            self._check(flow)
        except Exception:
            logger.exception("panopticon: secrets: dns_request failed; answering SERVFAIL")
            try:
                verdict.answer_dns(flow, dns.response_codes.SERVFAIL, reason=INTERNAL,
                                   host=None, by=BY)
            except Exception:
                verdict.kill(flow)

    def _check(self, flow: dns.DNSFlow) -> None:
        if flow.error or not flow.live or verdict.get(flow):
            return
        rules = self.core.rules()
        if rules is None:
            return verdict.answer_dns(flow, dns.response_codes.REFUSED, reason=UNAVAILABLE,
                                      host=None, by=BY)
        if self.core.tripped:
            reason = f"tripwire: secret {self.core.tripped}: the jail is stopping"
            return verdict.answer_dns(flow, dns.response_codes.REFUSED, reason=reason,
                                      host=None, by=BY)
        for q in flow.request.questions:
            hits = [h for h in rules.catalog.name_hits(q.name) if h.kind != DLP]
            if not hits:
                continue
            hit = hits[0]
            shown = q.name
            if hit.kind == VALUE:
                shown = rules.scrubber.replace(q.name.encode())[0].decode("ascii", "replace")
            reason, _ = self.core.trip(flow, rules, hit, "dns", shown)
            verdict.answer_dns(flow, dns.response_codes.NXDOMAIN, reason=reason,
                               host=shown, by=BY)
            if hit.kind == VALUE:
                # The request log writes the question: it must not hold the value.
                for q2 in (*flow.request.questions, *flow.response.questions):
                    q2.name = rules.scrubber.replace(q2.name.encode())[0].decode(
                        "ascii", "replace")
            return


def addons() -> list:
    """The three addons around one core: (SecretGuard, SecretSwap, SecretDns)."""
    core = Secrets()
    return [SecretGuard(core), SecretSwap(core), SecretDns(core)]


# --- small helpers ------------------------------------------------------------------


def _basic_decoded(name: bytes, value: bytes) -> bytes | None:
    """The credentials of `Authorization: Basic <base64>`, scanned as a view of their own
    (so that an encoded placeholder inside the base64 is found too)."""
    if name.lower() not in (b"authorization", b"proxy-authorization"):
        return None
    scheme, _, token = value.partition(b" ")
    if scheme.lower() != b"basic":
        return None
    try:
        return base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None


def _decoded(msg) -> bytes | None:
    """The body without its content-encoding, or None if it cannot be decoded."""
    try:
        return contentcoding.decode(msg.raw_content or b"",
                                    msg.headers.get("content-encoding", ""), DECODE_LIMIT)
    except contentcoding.DecodeError:
        return None


def _value_forms(rules: Rules) -> dict[str, dict[bytes, str]]:
    return {n: secretscan.encoded_forms(s.value) for n, s in rules.catalog.secrets.items()}


def _addr(address) -> str | None:
    if not address:
        return None
    host, port = str(address[0]), address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _not_dumpable() -> None:
    """The proxy holds the real values: no core dumps of it, no ptrace even by its own
    uid (the agent has another uid anyway)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_DUMPABLE = 4
        libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    except Exception:
        logger.warning("panopticon: could not make the proxy non-dumpable")
