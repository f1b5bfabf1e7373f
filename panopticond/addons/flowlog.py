"""FlowLog: one JSON line per HTTP flow, DNS query and refused raw flow.

Written when the flow ends (response, error, or killed), exactly once per flow (per
message for DNS, whose flows mitmproxy reuses), after every decision was made, so
the line carries the decision and its reason. Fields:

    time         start of the flow, RFC 3339 UTC with milliseconds
    kind         "http", "dns" or "tcp"/"udp"
    instance     option panopticon_instance
    client       ip:port of the agent's side
    host         the name that was judged (SNI, Host, DNS question)
    decision     "allow", "deny" or "none" (nobody decided: FinalGuard's business)
    reason, rule
    duration_ms
  http: method, scheme, port, path (without the query string: it often carries
        secrets), status, bytes_out (request body, from the agent), bytes_in
        (response body, to the agent), error
  dns:  qname, qtype, rcode

Lines are serialised with json.dumps (a newline in a name is escaped and cannot forge a
line) and appended with one write() each to a file opened O_APPEND, mode 0640. The file
is reopened when it is moved away (rotation). A write failure is logged as an error
and, until a write succeeds again, new requests and queries are denied: no traffic
without its log line.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from mitmproxy import ctx, dns, http, tcp, udp

from panopticond.addons import verdict

logger = logging.getLogger(__name__)

BY = "flowlog"
LOGGED = "panopticon_logged"
MAX_PATH = 2048
UNAVAILABLE = "the request log is unavailable"


class FlowLog:
    name = "panopticon_flowlog"

    def __init__(
        self, *, reopen_interval: float = 1.0, clock: Callable[[], float] = time.monotonic
    ):
        self.path = ""
        self.fd: int | None = None
        self.broken: str | None = None  # why the last open or write failed
        self.reopen_interval = reopen_interval
        self.clock = clock
        self._checked_at = float("-inf")

    def load(self, loader):
        loader.add_option(
            "panopticon_log", str, "",
            "Path of panopticon's JSONL request log; empty for none.",
        )
        loader.add_option(
            "panopticon_instance", str, "",
            "Name of the panopticon instance, written in every log line.",
        )

    def configure(self, updated):
        if "panopticon_log" in updated:
            self._close()
            self.path = ctx.options.panopticon_log
            self.broken = None
            if self.path:
                self._open()

    def done(self):
        self._close()

    # Deny while the log cannot be written.

    def requestheaders(self, flow: http.HTTPFlow):
        if self.broken and flow.live and not flow.error and not verdict.is_local_denial(flow):
            verdict.deny_http(
                flow, 503, f"panopticon: request blocked: {UNAVAILABLE}.\n",
                phase="requestheaders", reason=UNAVAILABLE, host=_host(flow), by=BY,
            )

    def dns_request(self, flow: dns.DNSFlow):
        if self.broken and flow.live and not verdict.is_local_denial(flow):
            verdict.answer_dns(flow, dns.response_codes.REFUSED, reason=UNAVAILABLE,
                               host=_qname(flow), by=BY)

    # Write when the flow ends.

    def response(self, flow: http.HTTPFlow):
        self._log(flow)

    def error(self, flow: http.HTTPFlow):
        self._log(flow)

    def http_connect(self, flow: http.HTTPFlow):
        # A killed CONNECT ends here without an error hook.
        if flow.error:
            self._log(flow)

    def dns_response(self, flow: dns.DNSFlow):
        self._log(flow)

    def dns_error(self, flow: dns.DNSFlow):
        self._log(flow)

    def tcp_end(self, flow: tcp.TCPFlow):
        self._log(flow)

    def tcp_error(self, flow: tcp.TCPFlow):
        self._log(flow)

    def udp_end(self, flow: udp.UDPFlow):
        self._log(flow)

    def udp_error(self, flow: udp.UDPFlow):
        self._log(flow)

    def _log(self, flow) -> None:
        try:
            key = id(flow.request) if isinstance(flow, dns.DNSFlow) else True
            if flow.metadata.get(LOGGED) == key:
                return
            flow.metadata[LOGGED] = key
            line = json.dumps(self.record(flow), ensure_ascii=True, allow_nan=False)
        except Exception:
            logger.exception("panopticon: could not build a log line")
            return
        self.write(line)

    def record(self, flow) -> dict[str, Any]:
        """The log record of `flow` (also useful to tests and the daemon)."""
        v = verdict.get(flow) or {}
        now = time.time()
        common: dict[str, Any] = {
            "time": None,
            "kind": None,
            "instance": self._instance(),
            "client": _addr(flow.client_conn.peername),
            "host": v.get("host"),
            "decision": v.get("decision", "none"),
            "reason": v.get("reason", "no decision"),
            "rule": v.get("rule"),
        }
        if isinstance(flow, http.HTTPFlow):
            req, resp = flow.request, flow.response
            start = req.timestamp_start or flow.timestamp_created
            end = (resp.timestamp_end if resp and resp.timestamp_end else None) or (
                flow.error.timestamp if flow.error else now
            )
            common.update(
                kind="http",
                host=v.get("host") or _host(flow),
                method=req.method,
                scheme=req.scheme,
                port=req.port,
                path=req.path.split("?", 1)[0][:MAX_PATH],
                status=resp.status_code if resp else None,
                bytes_out=len(req.raw_content or b""),
                bytes_in=len(resp.raw_content or b"") if resp else 0,
                error=flow.error.msg if flow.error else None,
            )
        elif isinstance(flow, dns.DNSFlow):
            msg, resp = flow.request, flow.response
            q = msg.questions[0] if msg.questions else None
            start = msg.timestamp or flow.timestamp_created
            end = (resp.timestamp if resp and resp.timestamp else None) or now
            common.update(
                kind="dns",
                host=v.get("host") or (q.name if q else None),
                qname=q.name if q else None,
                qtype=dns.types.to_str(q.type) if q else None,
                rcode=dns.response_codes.to_str(resp.response_code) if resp else None,
                error=flow.error.msg if flow.error else None,
            )
        else:
            start = flow.timestamp_created
            end = flow.error.timestamp if flow.error else now
            server = flow.server_conn.address
            common.update(
                kind="udp" if isinstance(flow, udp.UDPFlow) else "tcp",
                host=v.get("host") or flow.client_conn.sni or (server[0] if server else None),
                port=server[1] if server else None,
                error=flow.error.msg if flow.error else None,
            )
        common["time"] = _rfc3339(start)
        common["duration_ms"] = max(0, round((end - start) * 1000))
        return common

    def write(self, line: str) -> None:
        if not self.path:
            return
        data = (line + "\n").encode("utf-8")
        try:
            self._reopen_if_moved()
            if self.fd is None:
                raise OSError(f"not open: {self.broken}")
            view = memoryview(data)
            while view:
                n = os.write(self.fd, view)
                view = view[n:]
        except OSError as e:
            self._failed(f"cannot write {self.path}: {e.strerror or e}")
            return
        if self.broken:
            logger.warning(f"panopticon: writing {self.path} again; requests are allowed again")
            self.broken = None

    def _instance(self) -> str:
        return ctx.options.panopticon_instance if "panopticon_instance" in ctx.options else ""

    def _open(self) -> None:
        try:
            self.fd = os.open(
                self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640
            )
            self._checked_at = self.clock()
        except OSError as e:
            self.fd = None
            self._failed(f"cannot open {self.path}: {e.strerror or e}")

    def _close(self) -> None:
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = None

    def _reopen_if_moved(self) -> None:
        now = self.clock()
        if self.fd is not None and now - self._checked_at < self.reopen_interval:
            return
        self._checked_at = now
        if self.fd is not None:
            try:
                st, ours = os.stat(self.path), os.fstat(self.fd)
                if (st.st_dev, st.st_ino) == (ours.st_dev, ours.st_ino):
                    return
            except FileNotFoundError:
                pass
            self._close()
        self._open()

    def _failed(self, why: str) -> None:
        if why != self.broken:
            logger.error(f"panopticon: {why}; denying requests until the log can be written")
        self.broken = why


def _host(flow: http.HTTPFlow) -> str | None:
    if flow.client_conn.tls:
        return flow.client_conn.sni or flow.request.host
    return flow.request.host_header or flow.request.host


def _qname(flow: dns.DNSFlow) -> str | None:
    qs = flow.request.questions
    return qs[0].name if len(qs) == 1 else None


def _addr(address) -> str | None:
    if not address:
        return None
    host, port = str(address[0]), address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _rfc3339(ts: float) -> str:
    dt = datetime.datetime.fromtimestamp(ts, tz=datetime.timezone.utc)
    return dt.isoformat(timespec="milliseconds").replace("+00:00", "Z")
