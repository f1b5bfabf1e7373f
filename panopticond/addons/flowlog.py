"""FlowLog: one JSON record per HTTP request, DNS query and refused connection.

Written when the flow ends (response, error, or killed), exactly once per flow (per
message for DNS, whose flows mitmproxy reuses), after every decision was made, so the
record carries the decision and its reason. The fields are documented in README.md
("The request log") and `panopticond.logread`; every record starts with `schema`.

Other addons add records of their own (a tripwire, say) through the same writer:
`write_record(dict)` (module function, or the method of the running FlowLog), and add
fields to a flow's record with `annotate(flow, secrets=["OPENAI"])`.

Lines are serialised with json.dumps (a newline in a name is escaped and cannot forge a
line) and appended by `panopticond.logfile.LogFile`: one write() per record, under a
lock, rotated by size (`panopticon_log_max_bytes`, `panopticon_log_keep`), mode 0640.

No traffic without its log line: while the log cannot be written (a failed open or
write; or less than `reserve_bytes` left on its file system, checked before each
request so that the first request after the disk fills is refused too), new requests
and queries are denied. The state is written to `panopticon_log_status` (a JSON file
in the instance's runtime directory, read by the daemon) whenever it changes, and
logged as an error.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Mapping
from typing import Any

from mitmproxy import ctx, dns, exceptions, http, tcp, tls, udp

from panopticond.addons import verdict
from panopticond.logfile import LogFile
from panopticond.logread import SCHEMA

logger = logging.getLogger(__name__)

BY = "flowlog"
LOGGED = "panopticon_logged"
EXTRA = "panopticon_log_extra"
MAX_PATH = 2048
UNAVAILABLE = "the request log is unavailable"
WORKER_OPTION = "panopticon_worker"
RESERVE_BYTES = 256 * 1024  # kept free for the records of the requests we refuse
CORE_FIELDS = frozenset((
    "schema", "time", "kind", "instance", "client", "host", "decision", "reason", "rule",
    "duration_ms",
))

_OPTIONS = ("panopticon_log", "panopticon_log_max_bytes", "panopticon_log_keep")
_active: FlowLog | None = None


def write_record(record: Mapping[str, Any]) -> bool:
    """Append `record` to the running proxy's request log (see `FlowLog.write_record`).

    False if it could not be written (no FlowLog runs, or the log is failing): the
    caller must then deny whatever the record is about."""
    fl = _active
    if fl is None:
        logger.error("panopticon: no request log is running; a record was not written")
        return False
    return fl.write_record(record)


def annotate(flow, **fields: Any) -> None:
    """Add `fields` to the record `flow` will get (never replacing a core field)."""
    extra = flow.metadata.setdefault(EXTRA, {})
    extra.update({k: v for k, v in fields.items() if k not in CORE_FIELDS})


def add_worker_option(loader) -> None:
    """Declare `panopticon_worker` (Binding reads it too; mitmproxy takes a second
    declaration with the same signature silently)."""
    loader.add_option(
        WORKER_OPTION, int, -1,
        "Which of the proxy workers this is (0 answers DNS); -1: the only one.",
    )


class FlowLog:
    name = "panopticon_flowlog"

    def __init__(self, *, reserve_bytes: int = RESERVE_BYTES):
        self.path = ""
        self.log: LogFile | None = None
        self.status_path = ""
        self.reserve_bytes = reserve_bytes
        self.broken: str | None = None  # why the last open or write failed
        self.low_space: str | None = None
        self._reported: tuple | None = None  # the state last written to the status file
        self._rotation_logged: str | None = None
        self._ok = True
        self._since = time.time()  # when `ok` last changed
        # The instance option, read at the first record after each change (an option
        # lookup deep-copies its value: per record it was a tenth of the record's cost).
        self._instance_name: str | None = None
        self.worker: int | None = None  # with several proxy workers, this one's number

    def load(self, loader):
        loader.add_option(
            "panopticon_log", str, "",
            "Path of panopticon's JSONL request log; empty for none.",
        )
        loader.add_option(
            "panopticon_instance", str, "",
            "Name of the panopticon instance, written in every log line.",
        )
        loader.add_option(
            "panopticon_log_max_bytes", int, 0,
            "Rotate panopticon's request log before it grows past this size; 0: never.",
        )
        loader.add_option(
            "panopticon_log_keep", int, 5,
            "How many rotated request logs to keep.",
        )
        loader.add_option(
            "panopticon_log_status", str, "",
            "Where to write the request log's state (JSON) when it changes; empty for none.",
        )
        add_worker_option(loader)

    def configure(self, updated):
        global _active
        size, keep = ctx.options.panopticon_log_max_bytes, ctx.options.panopticon_log_keep
        if "panopticon_log_max_bytes" in updated and size < 0:
            raise exceptions.OptionsError(f"panopticon_log_max_bytes must be >= 0, got {size}")
        if "panopticon_log_keep" in updated and keep < 1:
            raise exceptions.OptionsError(f"panopticon_log_keep must be >= 1, got {keep}")
        if "panopticon_instance" in updated:
            self._instance_name = None
        if WORKER_OPTION in updated:
            # Every record then says which worker wrote it: several append to one log.
            worker = ctx.options.panopticon_worker
            self.worker = worker if worker >= 0 else None
        if "panopticon_log_status" in updated:
            self.status_path = ctx.options.panopticon_log_status
            self._reported = None
        if any(o in updated for o in _OPTIONS):
            self._close()
            self.path = ctx.options.panopticon_log
            self.broken = self.low_space = None
            if self.path:
                self.log = LogFile(self.path, max_bytes=ctx.options.panopticon_log_max_bytes,
                                   keep=ctx.options.panopticon_log_keep)
                try:
                    self.log.open()
                except OSError as e:
                    self._failed(f"cannot open {self.path}: {e.strerror or e}")
            _active = self
        self._report()

    def done(self):
        global _active
        self._close()
        if _active is self:
            _active = None

    # Deny while the log cannot be written.

    def requestheaders(self, flow: http.HTTPFlow):
        if flow.live and not flow.error and not verdict.is_local_denial(flow):
            why = self.unavailable()
            if why:
                verdict.deny_http(
                    flow, 503, f"panopticon: request blocked: {UNAVAILABLE}.\n",
                    phase="requestheaders", reason=UNAVAILABLE, host=_host(flow), by=BY,
                )

    def dns_request(self, flow: dns.DNSFlow):
        if flow.live and not verdict.is_local_denial(flow) and self.unavailable():
            verdict.answer_dns(flow, dns.response_codes.REFUSED, reason=UNAVAILABLE,
                               host=_qname(flow), by=BY)

    def tcp_start(self, flow: tcp.TCPFlow):
        # A relayed connection (passthrough, a port rule) waits for a log too.
        self._refuse_relay(flow)

    def udp_start(self, flow: udp.UDPFlow):
        self._refuse_relay(flow)

    def _refuse_relay(self, flow) -> None:
        if flow.live and self.unavailable():
            host = (verdict.get(flow) or {}).get("host") or flow.client_conn.sni
            verdict.record(flow, allowed=False, reason=UNAVAILABLE, host=host, by=BY)
            verdict.kill(flow)

    def unavailable(self) -> str | None:
        """Why traffic must be refused now for want of a log, or None."""
        if self.log is None:
            return None
        if self.broken:
            return self.broken
        left = self.log.space_left()
        low = None
        if left is not None and left < self.reserve_bytes:
            low = f"less than {self.reserve_bytes} bytes left on the file system of {self.path}"
        if low != self.low_space:
            if low:
                logger.error(f"panopticon: {low} ({left}); denying requests until there is room")
            else:
                logger.warning(f"panopticon: room again for {self.path}; requests are allowed")
            self.low_space = low
            self._report()
        return low

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

    def tls_failed_client(self, data: tls.TlsData):
        # A connection that ends in its TLS handshake carries no flow: without this, an
        # agent that refuses our CA (a pinning client) would leave no trace at all.
        try:
            conn = data.conn
            line = self._dumps({
                "schema": SCHEMA,
                "time": _rfc3339(conn.timestamp_start or time.time()),
                "kind": "tls",
                "instance": self._instance(),
                "client": _addr(conn.peername),
                "host": conn.sni,
                "decision": "none",
                "reason": "the TLS handshake with the agent failed",
                "rule": None,
                "error": conn.error,
                "duration_ms": None,
                **({} if self.worker is None else {"worker": self.worker}),
            })
        except Exception:
            logger.exception("panopticon: could not build a log line")
            return
        self.write(line)

    def _log(self, flow) -> None:
        try:
            key = id(flow.request) if isinstance(flow, dns.DNSFlow) else True
            if flow.metadata.get(LOGGED) == key:
                return
            flow.metadata[LOGGED] = key
            line = self._dumps(self.record(flow))
        except Exception:
            logger.exception("panopticon: could not build a log line")
            return
        self.write(line)

    def record(self, flow) -> dict[str, Any]:
        """The log record of `flow` (also useful to tests and the daemon)."""
        v = verdict.get(flow) or {}
        now = time.time()
        common: dict[str, Any] = {
            "schema": SCHEMA,
            "time": None,
            "kind": None,
            "instance": self._instance(),
            "client": _addr(flow.client_conn.peername),
            "host": v.get("host"),
            "decision": v.get("decision", "none"),
            "reason": v.get("reason", "no decision"),
            "rule": v.get("rule"),
        }
        # The policy's mode, and what enforce mode would have decided (discover mode).
        for k in ("mode", "would_decision"):
            if k in v:
                common[k] = v[k]
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
        extra = flow.metadata.get(EXTRA)
        if isinstance(extra, dict):
            for k, val in extra.items():
                common.setdefault(k, val)
        if self.worker is not None:
            common["worker"] = self.worker
        return common

    def write_record(self, record: Mapping[str, Any]) -> bool:
        """Append another addon's record. `kind` is required; `schema`, `time` (now) and
        `instance` are filled in when missing. False if it was not written."""
        try:
            if not isinstance(record.get("kind"), str):
                raise ValueError("a log record needs a 'kind'")
            rec: dict[str, Any] = {
                "schema": SCHEMA,
                "time": _rfc3339(time.time()),
                "kind": record["kind"],
                "instance": self._instance(),
            }
            rec.update(record)
            if self.worker is not None:
                rec["worker"] = self.worker
            line = self._dumps(rec)
        except Exception:
            logger.exception("panopticon: could not build a log line")
            return False
        return self.write(line)

    def write(self, line: str) -> bool:
        if self.log is None:
            return True
        try:
            self.log.append((line + "\n").encode("utf-8"))
        except OSError as e:
            self._failed(f"cannot write {self.path}: {e.strerror or e}")
            return False
        if self.broken:
            logger.warning(f"panopticon: writing {self.path} again; requests are allowed again")
            self.broken = None
        self._report()
        return True

    @staticmethod
    def _dumps(rec: Mapping[str, Any]) -> str:
        return _encode(rec)

    def _instance(self) -> str:
        if self._instance_name is None:
            self._instance_name = (ctx.options.panopticon_instance
                                   if "panopticon_instance" in ctx.options else "")
        return self._instance_name

    def _close(self) -> None:
        if self.log is not None:
            self.log.close()
            self.log = None

    def _failed(self, why: str) -> None:
        if why != self.broken:
            logger.error(f"panopticon: {why}; denying requests until the log can be written")
        self.broken = why
        self._report()

    def _report(self) -> None:
        """Write the log's state to the status file if it changed since the last time."""
        rotation = self.log.rotation_error if self.log is not None else None
        if rotation != self._rotation_logged:
            if rotation:
                logger.error(f"panopticon: {rotation}; the log grows past its limit meanwhile")
            self._rotation_logged = rotation
        error = self.broken or self.low_space
        if (error is None) != self._ok:
            self._ok = error is None
            self._since = time.time()
        state = (self.path, error, rotation)
        if state == self._reported or not self.status_path:
            return
        doc = {
            "schema": SCHEMA,
            "log": self.path,
            "ok": error is None,
            "error": error,
            "since": _rfc3339(self._since),
            "rotation_error": rotation,
            "updated": _rfc3339(time.time()),
            "pid": os.getpid(),
        }
        tmp = f"{self.status_path}.{os.getpid()}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o640)
            with os.fdopen(fd, "w") as f:
                json.dump(doc, f)
            os.replace(tmp, self.status_path)
        except OSError as e:
            # /run is tmpfs: this failing means a broken runtime directory, which the
            # daemon notices on its own; the log's own state is unaffected.
            logger.error(f"panopticon: cannot write {self.status_path}: {e.strerror or e}")
        self._reported = state


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
    """`ts` as UTC with milliseconds, "2026-11-22T13:15:08.123Z": what
    `datetime.fromtimestamp(ts, utc).isoformat(timespec="milliseconds")` gives (rounded
    to microseconds half-even, then truncated), with the date and time formatted once
    per second instead of per record."""
    global _second
    frac, whole = math.modf(ts)
    us = round(frac * 1e6)
    if us >= 1_000_000:
        us -= 1_000_000
        whole += 1
    elif us < 0:
        us += 1_000_000
        whole -= 1
    sec = int(whole)
    cached = _second
    if cached[0] != sec:
        cached = _second = (sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)))
    return f"{cached[1]}.{us // 1000:03d}Z"


_second: tuple[int | None, str] = (None, "")
# json.dumps builds an encoder per call when given any option; the same one, kept.
_encode = json.JSONEncoder(ensure_ascii=True, allow_nan=False, default=str).encode
