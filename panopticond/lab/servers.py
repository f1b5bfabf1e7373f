"""The lab's internet: every server of the simulated internet in one process.

Run inside the lab's internet namespace as `python -m panopticond.lab.servers CONFIG.json`
(the `Lab` does it). It binds every server address on every port of the config's `ports`
(`topology.PORTS`), prints one `{"ready": ...}` line on stdout once all listeners are
bound, then serves until it is killed or its stdin closes (so it never outlives the
`Lab` that started it).

Every connection or datagram that reaches it becomes at least one JSON line in the event
log, written with one `write(2)` before any byte of the answer is sent: a client that
got an answer can rely on its event being in the log already. The log is the tests'
oracle for what reached the internet, so nothing here is best effort. Events:

    all    kind, ts, proto (tcp/udp), server_ip, port, client_ip, client_port
    http   one per request: scheme, method, host, path, http_version, headers (names in
    https  lower case), body_length, body (first 4 KiB), status; https adds sni,
           tls_version, alpn; a malformed request has error (and status 400 or 414)
    tcp    a sink connection: data (first bytes), bytes; or a connection to 80/443/53
           that carried no request (note), or whose TLS handshake failed (tls_error, sni)
    udp    a datagram to a UDP sink (data, bytes); it is echoed back
    dns    one per query, UDP or TCP: name, type, rcode, answers, id

    ws     one per WebSocket message received on /ws (data, opcode); it is echoed back
    tcp    bytes sent after a `101` of /switch (note "after 101"); they are echoed back
    tcp    a connection caught by the catch-all (catchall: true): server_ip and port are
    udp    the ORIGINAL destination, whatever address and port the client chose

Every event carries origin ("host") when the process serves the simulated host.

HTTP paths with a meaning: /status/NNN, /bytes/N, /ws (a WebSocket echo), /switch (a
`101 Switching Protocols` for whatever Upgrade was asked, then a raw echo: what a proxy
that turns a bad upgrade into a tunnel would let through). On an address given to a
"CDN" (op cdn) only the sites named for it are served; any other Host gets 421.

Stdin takes commands, one JSON object a line, each answered by one line on stdout:
    {"op": "add", "name": N, "v4": A|null, "v6": A|null, "serve": bool}
adds N to the DNS zone and, with "serve", binds its addresses (already on `lo`).
    {"op": "rebind", "name": N, "answers": [[v4|null, v6|null], ...]}
answers the k-th query of each type for N from answers[k] (the last one sticks), TTL 0.
    {"op": "cdn", "address": A, "sites": [N, ...]}
serves on A only those sites (routing by Host).
    {"op": "catchall", "port": P}
binds transparent TCP and UDP listeners on P (0.0.0.0 and ::) for a TPROXY rule.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import ipaddress
import json
import os
import re
import selectors
import socket
import ssl
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from panopticond.lab import dnswire

_TCP_ROLES = ("http", "https", "dns", "tcp_sink")
_UDP_ROLES = ("dns", "udp_sink")
_BODY_KEEP = 4096  # bytes of a request body (or sink payload) kept in the event
_PATTERN = bytes(range(256)) * 256  # /bytes/N repeats this 64 KiB block
_HOSTNAME = re.compile(r"^(?=.{1,253}$)[a-z0-9_]([a-z0-9_-]{0,62})(\.[a-z0-9_-]{1,63})*$")
_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC11B85"
# Linux socket options the socket module does not name.
_IP_TRANSPARENT, _IPV6_TRANSPARENT = 19, 75
_IP_RECVORIGDSTADDR, _IPV6_RECVORIGDSTADDR = 20, 74


def _ip(address: str) -> str:
    return ipaddress.ip_address(address.split("%", 1)[0]).compressed


def _text(data: bytes) -> str:
    return data[:_BODY_KEEP].decode("utf-8", "backslashreplace")


class EventLog:
    """Append-only JSON lines; one `os.write` per event under a lock, so lines never interleave."""

    def __init__(self, path: str, origin: str | None = None):
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._lock = threading.Lock()
        self._origin = {"origin": origin} if origin else {}

    def write(self, kind: str, proto: str, local: tuple, peer: tuple, **details: object) -> dict:
        event = {
            "kind": kind,
            "ts": time.time(),
            "proto": proto,
            "server_ip": _ip(local[0]),
            "port": local[1],
            "client_ip": _ip(peer[0]),
            "client_port": peer[1],
            **self._origin,
            **details,
        }
        data = (json.dumps(event, separators=(",", ":")) + "\n").encode()
        with self._lock:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]
        return event


class _HTTPHandler(http.server.BaseHTTPRequestHandler):
    """HTTP/1.1 with keep-alive. Every request line read becomes exactly one event."""

    protocol_version = "HTTP/1.1"
    server_version = "panopticon-lab"
    sys_version = ""
    timeout = 30
    disable_nagle_algorithm = True

    def __init__(self, conn: socket.socket, peer: tuple, lab: Servers, kind: str,
                 tls: dict[str, object]):
        # The base constructor serves the whole connection, so these go first.
        self.lab, self.kind, self.tls, self.served = lab, kind, tls, 0
        self.local = conn.getsockname()
        super().__init__(conn, peer, lab)  # type: ignore[arg-type]  # only stored

    def log_message(self, format: str, *args: object) -> None:
        pass

    def handle_one_request(self) -> None:
        try:
            self.raw_requestline = self.rfile.readline(65537)
        except (OSError, ValueError):
            self.raw_requestline = b""
        if not self.raw_requestline:
            self.close_connection = True
            return
        self.served += 1
        if len(self.raw_requestline) > 65536:
            self.requestline, self.command, self.path = "", "", ""
            self.send_error(414)
            return
        if not self.parse_request():  # it has answered with send_error, which logged
            return
        try:
            self._serve()
            self.wfile.flush()
        except (OSError, ValueError):
            self.close_connection = True

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        self._log(status=code, error=message or self.responses.get(code, ("",))[0])
        self.close_connection = True
        super().send_error(code, message, explain)

    def _log(self, body_length: int = 0, body: bytes = b"", **extra: object) -> dict:
        headers: dict[str, str] = {}
        for name, value in (getattr(self, "headers", None) or {}).items():
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        details = {
            "scheme": self.kind,
            "method": getattr(self, "command", None) or None,
            "host": headers.get("host"),
            "path": getattr(self, "path", None) or None,
            "http_version": getattr(self, "request_version", None),
            "headers": headers,
            "body_length": body_length,
            "body": _text(body),
            **self.tls,
            **extra,
        }
        return self.lab.log.write(self.kind, "tcp", self.local, self.client_address, **details)

    def _read_body(self) -> tuple[int, bytes]:
        total, head = 0, bytearray()

        def take(n: int) -> None:
            nonlocal total
            while n > 0:
                chunk = self.rfile.read(min(n, 65536))
                if not chunk:
                    raise ValueError("body ended early")
                if len(head) < _BODY_KEEP:
                    head.extend(chunk[:_BODY_KEEP - len(head)])
                total += len(chunk)
                n -= len(chunk)

        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while True:
                size = int(self.rfile.readline(1024).split(b";", 1)[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                take(size)
                self.rfile.readline(3)
        else:
            length = int(self.headers.get("Content-Length") or 0)
            if length < 0:
                raise ValueError("negative Content-Length")
            take(length)
        return total, bytes(head)

    def _serve(self) -> None:
        try:
            body_length, body = self._read_body()
        except ValueError as e:
            self.send_error(400, f"bad body: {e}")
            return
        route = self.path.split("?", 1)[0]
        status, size = 200, None
        sites = self.lab.cdn.get(_ip(self.local[0]))
        if sites is not None:
            site = (self.headers.get("Host") or "").lower().rstrip(".")
            site = re.sub(r":\d+$", "", site).rstrip(".")
            if site not in sites:
                self._log(body_length, body, status=421, site=None)
                self._reply(421, b"no such site\n")
                return
        if route in ("/ws", "/switch") and self.headers.get("Upgrade"):
            self._upgrade(route, body_length, body)
            return
        if m := re.fullmatch(r"/status/(\d{3})", route):
            status = int(m.group(1))
            if not 200 <= status <= 599:
                status = 400
        elif m := re.fullmatch(r"/bytes/(\d{1,12})", route):
            size = int(m.group(1))
        event = self._log(body_length, body, status=status,
                          **({"site": site} if sites is not None else {}))
        if size is not None:
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(size))
            self.end_headers()
            if self.command != "HEAD":
                left = size
                while left > 0:
                    n = min(left, len(_PATTERN))
                    self.wfile.write(_PATTERN[:n])
                    left -= n
            return
        payload = json.dumps({k: v for k, v in event.items() if k != "ts"}).encode() + b"\n"
        self.send_response(status)
        if status in (204, 304):
            self.end_headers()
            return
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)


    def _reply(self, status: int, payload: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _upgrade(self, route: str, body_length: int, body: bytes) -> None:
        """/ws: a WebSocket echo that logs each message. /switch: `101` for any Upgrade,
        then a raw echo that logs what arrives (no proxy should ever relay it)."""
        key = self.headers.get("Sec-WebSocket-Key", "")
        ws = route == "/ws" and self.headers.get("Upgrade", "").lower() == "websocket"
        if route == "/ws" and not (ws and key):
            self.send_error(400, "not a WebSocket upgrade")
            return
        self._log(body_length, body, status=101)
        self.send_response(101)
        self.send_header("Upgrade", self.headers.get("Upgrade", ""))
        self.send_header("Connection", "Upgrade")
        if ws:
            accept = base64.b64encode(hashlib.sha1(key.encode() + _WS_GUID).digest())
            self.send_header("Sec-WebSocket-Accept", accept.decode())
        self.end_headers()
        self.wfile.flush()
        self.close_connection = True
        (self._ws_echo if ws else self._raw_echo)()

    def _raw_echo(self) -> None:
        self.connection.settimeout(self.lab.sink_wait)
        while True:
            try:
                data = self.connection.recv(_BODY_KEEP)
            except OSError:
                return
            if not data:
                return
            self.lab.log.write("tcp", "tcp", self.local, self.client_address,
                               data=_text(data), bytes=len(data), note="after 101", **self.tls)
            self.connection.sendall(data)

    def _ws_echo(self) -> None:
        rfile = self.rfile
        while True:
            head = rfile.read(2)
            if len(head) < 2:
                return
            opcode, length = head[0] & 0x0F, head[1] & 0x7F
            if length == 126:
                length = int.from_bytes(rfile.read(2), "big")
            elif length == 127:
                length = int.from_bytes(rfile.read(8), "big")
            mask = rfile.read(4) if head[1] & 0x80 else b"\0\0\0\0"
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(rfile.read(length)))
            if opcode == 8:  # close: answer it and stop
                self.wfile.write(b"\x88\x00")
                self.wfile.flush()
                return
            if opcode in (1, 2):
                self.lab.log.write("ws", "tcp", self.local, self.client_address,
                                   data=_text(payload), opcode=opcode, bytes=len(payload),
                                   **self.tls)
                n = len(payload)
                size = bytes([n]) if n < 126 else b"\x7e" + n.to_bytes(2, "big")
                self.wfile.write(bytes([0x80 | opcode]) + size + payload)
                self.wfile.flush()


class Servers:
    def __init__(self, config: dict):
        self.config = config
        self.log = EventLog(config["log"], config.get("origin"))
        self.rebinds: dict[str, dict[str, Any]] = {}
        self.cdn: dict[str, set[str]] = {}
        self.zone: dict[str, tuple[str | None, str | None]] = {
            name.lower(): (v4, v6) for name, (v4, v6) in config["zone"].items()
        }
        self.sink_wait = float(config.get("sink_wait", 1.0))
        self.selector = selectors.DefaultSelector()
        self.listeners = 0
        self.static_names = set(config["static_names"])
        self.tls = self._context(config["cert"], config["key"])
        self.tls.sni_callback = self._sni
        self._sni_contexts: dict[str, ssl.SSLContext] = {}
        self._sni_lock = threading.Lock()

    # --- listeners ---------------------------------------------------------------------

    def bind(self, address: str) -> None:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        for role in _TCP_ROLES:
            for port in self.config["ports"].get(role, ()):
                s = socket.socket(family, socket.SOCK_STREAM)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                self._bind(s, family, address, port)
                s.listen(256)
                self._register(s, ("tcp", role))
        for role in _UDP_ROLES:
            for port in self.config["ports"].get(role, ()):
                s = socket.socket(family, socket.SOCK_DGRAM)
                self._bind(s, family, address, port)
                self._register(s, ("udp", role))

    @staticmethod
    def _bind(s: socket.socket, family: int, address: str, port: int) -> None:
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            s.bind((address, port))
        except OSError as e:
            s.close()
            raise OSError(e.errno, f"bind {address} port {port}: {e.strerror}") from None

    def catch_all(self, port: int) -> None:
        """Transparent listeners on `port` for everything a TPROXY rule sends there."""
        for family, address, level, transparent, origdst in (
            (socket.AF_INET, "0.0.0.0", socket.SOL_IP, _IP_TRANSPARENT, _IP_RECVORIGDSTADDR),
            (socket.AF_INET6, "::", socket.IPPROTO_IPV6, _IPV6_TRANSPARENT, _IPV6_RECVORIGDSTADDR),
        ):
            for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                s = socket.socket(family, kind)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.setsockopt(level, transparent, 1)
                if kind == socket.SOCK_DGRAM:
                    s.setsockopt(level, origdst, 1)
                self._bind(s, family, address, port)
                if kind == socket.SOCK_STREAM:
                    s.listen(1024)
                self._register(s, ("tcp" if kind == socket.SOCK_STREAM else "udp", "catchall"))

    def _caught_datagram(self, sock: socket.socket) -> None:
        data, ancdata, _flags, peer = sock.recvmsg(65535, 256)
        local = sock.getsockname()
        for level, kind, raw in ancdata:
            if (level, kind) == (socket.SOL_IP, _IP_RECVORIGDSTADDR):
                local = (socket.inet_ntop(socket.AF_INET, raw[4:8]),
                         int.from_bytes(raw[2:4], "big"))
            elif (level, kind) == (socket.IPPROTO_IPV6, _IPV6_RECVORIGDSTADDR):
                local = (socket.inet_ntop(socket.AF_INET6, raw[8:24]),
                         int.from_bytes(raw[2:4], "big"))
        self.log.write("udp", "udp", local, peer, data=_text(data), bytes=len(data),
                       catchall=True)

    def _register(self, s: socket.socket, data: tuple[str, str]) -> None:
        s.setblocking(False)
        self.selector.register(s, selectors.EVENT_READ, data)
        self.listeners += 1

    def run(self) -> None:
        while True:
            for key, _ in self.selector.select():
                proto, role = key.data
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    if proto == "udp" and role == "catchall":
                        self._caught_datagram(sock)
                    elif proto == "udp":
                        data, peer = sock.recvfrom(65535)
                        self._datagram(sock, role, data, peer)
                    else:
                        conn, peer = sock.accept()
                        threading.Thread(
                            target=self._connection, args=(conn, peer, role), daemon=True
                        ).start()
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError:
                    traceback.print_exc()

    # --- UDP ---------------------------------------------------------------------------

    def _datagram(self, sock: socket.socket, role: str, data: bytes, peer: tuple) -> None:
        local = sock.getsockname()
        if role == "dns":
            reply = self.answer(data, "udp", local, peer)
        else:
            self.log.write("udp", "udp", local, peer, data=_text(data), bytes=len(data))
            reply = data
        if reply is not None:
            sock.sendto(reply, peer)

    # --- TCP ---------------------------------------------------------------------------

    def _connection(self, conn: socket.socket, peer: tuple, role: str) -> None:
        try:
            with conn:
                local = conn.getsockname()
                if role == "http":
                    self._http(conn, peer, local, "http", {})
                elif role == "https":
                    self._https(conn, peer, local)
                elif role == "dns":
                    self._dns_tcp(conn, peer, local)
                else:
                    # A caught connection's local address is its original destination.
                    self._sink(conn, peer, local, **(
                        {"catchall": True} if role == "catchall" else {}))
        except Exception:  # noqa: BLE001 - one broken connection must not stop the servers
            traceback.print_exc()

    def _http(self, conn: socket.socket, peer: tuple, local: tuple, kind: str,
              tls: dict[str, object]) -> None:
        handler = _HTTPHandler(conn, peer, self, kind, tls)
        if handler.served == 0:
            self.log.write("tcp", "tcp", local, peer, data="", bytes=0, note="no request", **tls)

    def _https(self, conn: socket.socket, peer: tuple, local: tuple) -> None:
        conn.settimeout(10)
        tls_conn = self.tls.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
        try:
            tls_conn.do_handshake()
        except (OSError, ssl.SSLError) as e:
            sni = getattr(tls_conn, "lab_sni", None)
            self.log.write("tcp", "tcp", local, peer, data="", bytes=0, sni=sni,
                           tls_error=str(e))
            return
        with tls_conn:
            info: dict[str, object] = {
                "sni": getattr(tls_conn, "lab_sni", None),
                "tls_version": tls_conn.version(),
                "alpn": tls_conn.selected_alpn_protocol(),
            }
            self._http(tls_conn, peer, local, "https", info)

    def _sink(self, conn: socket.socket, peer: tuple, local: tuple, **details: object) -> None:
        conn.settimeout(self.sink_wait)
        try:
            data = conn.recv(_BODY_KEEP)
        except TimeoutError:
            data = b""
            details["note"] = "no data"
        except OSError as e:
            data = b""
            details["error"] = str(e)
        self.log.write("tcp", "tcp", local, peer, data=_text(data), bytes=len(data), **details)

    def _dns_tcp(self, conn: socket.socket, peer: tuple, local: tuple) -> None:
        conn.settimeout(10)
        answered = 0
        with conn.makefile("rb") as f:
            while True:
                try:
                    head = f.read(2)
                    if len(head) < 2:
                        break
                    message = f.read(int.from_bytes(head, "big"))
                except OSError:
                    break
                reply = self.answer(message, "tcp", local, peer)
                answered += 1
                if reply is None:
                    break
                conn.sendall(len(reply).to_bytes(2, "big") + reply)
        if not answered:
            self.log.write("tcp", "tcp", local, peer, data="", bytes=0, note="no query")

    # --- DNS ---------------------------------------------------------------------------

    def answer(self, data: bytes, proto: str, local: tuple, peer: tuple) -> bytes | None:
        """Log the query and return the answer: A/AAAA from the zone, NXDOMAIN otherwise."""
        try:
            query = dnswire.parse_query(data)
        except dnswire.DNSFormatError as e:
            self.log.write("dns", proto, local, peer, name=None, type=None, rcode="FORMERR",
                           answers=[], error=str(e))
            return dnswire.build_error(data, 1)
        answers: list[str] = []
        entry = self.zone.get(query.name)
        ttl = 30
        rebind = self.rebinds.get(query.name)
        if rebind is not None and query.qtype in (1, 28):
            with self._sni_lock:
                k = rebind["asked"].get(query.qtype, 0)
                rebind["asked"][query.qtype] = k + 1
            entry, ttl = tuple(rebind["answers"][min(k, len(rebind["answers"]) - 1)]), 0
        if (query.flags >> 11) & 0xF:
            rcode = 4
        elif query.count != 1:
            rcode = 1
        elif entry is None:
            rcode = 3
        else:
            rcode = 0
            address = {1: entry[0], 28: entry[1]}.get(query.qtype)
            answers = [address] if address else []
        self.log.write("dns", proto, local, peer, name=query.name, type=query.type_name,
                       rcode=dnswire.RCODES[rcode], answers=answers, id=query.id)
        return dnswire.build_response(query, rcode, answers, ttl)

    # --- TLS ---------------------------------------------------------------------------

    @staticmethod
    def _context(cert: str, key: str) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        ctx.set_alpn_protocols(["http/1.1"])
        return ctx

    def _sni(self, sock: Any, name: str | None, _ctx: ssl.SSLContext) -> None:
        # `sock` is the SSLSocket being handshaken (typeshed says SSLObject).
        sock.lab_sni = name
        # A name outside the static certificate (one added later, or any name a client
        # fronts with) still gets a valid certificate, as a real server of it would.
        if name and name.lower() not in self.static_names and _HOSTNAME.match(name.lower()):
            sock.context = self._context_for(name.lower())

    def _context_for(self, name: str) -> ssl.SSLContext:
        with self._sni_lock:
            ctx = self._sni_contexts.get(name)
            if ctx is None:
                from panopticond.lab import certs  # only paid when such a name shows up

                d = Path(self.config["cert_dir"])
                cert, key = d / f"sni-{name}.pem", d / f"sni-{name}.key"
                certs.issue(Path(self.config["ca_cert"]), Path(self.config["ca_key"]),
                            [name], [], cert, key)
                ctx = self._sni_contexts[name] = self._context(str(cert), str(key))
            return ctx

    # --- control -----------------------------------------------------------------------

    def commands(self) -> None:
        """Serve stdin commands; exit the whole process when stdin closes."""
        for line in sys.stdin:
            try:
                cmd = json.loads(line)
                op = cmd.get("op")
                if op == "rebind":
                    self.rebinds[cmd["name"].lower()] = {"answers": cmd["answers"], "asked": {}}
                elif op == "cdn":
                    self.cdn[_ip(cmd["address"])] = {s.lower() for s in cmd["sites"]}
                elif op == "catchall":
                    self.catch_all(int(cmd["port"]))
                elif op != "add":
                    raise ValueError(f"unknown op {op!r}")
                elif cmd.get("serve"):
                    for address in (cmd.get("v4"), cmd.get("v6")):
                        if address:
                            self.bind(address)
                if op == "add":
                    self.zone[cmd["name"].lower()] = (cmd.get("v4"), cmd.get("v6"))
                reply: dict[str, object] = {"ok": True}
            except Exception as e:  # noqa: BLE001 - the Lab raises it with this message
                reply = {"ok": False, "error": str(e)}
            _say(reply)
        os._exit(0)


def _say(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m panopticond.lab.servers CONFIG.json", file=sys.stderr)
        return 64
    config = json.loads(Path(argv[1]).read_text())
    servers = Servers(config)
    for address in config["addresses"]:
        servers.bind(address)
    _say({"ready": True, "pid": os.getpid(), "listeners": servers.listeners})
    threading.Thread(target=servers.commands, daemon=True).start()
    servers.run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
