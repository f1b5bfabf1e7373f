"""The agent of test_inbound.py: its own HTTP and WebSocket service inside the jail.

    inbound_agent.py PORT LOG READY

Listens on 127.0.0.1:PORT. Every request (and WebSocket message) it receives is
appended to LOG as a JSON line, so the test can tell what arrived at the agent from
what the proxy refused. HTTP requests get a JSON echo; WebSocket text messages are
answered "echo:" + text, binary ones with the same bytes. Writes "ready" to READY once
listening; exits on SIGTERM.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from wsproto import ConnectionType
from wsproto.connection import Connection
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_lock = threading.Lock()


def record(event: dict) -> None:
    with _lock, open(LOG, "a") as f:
        f.write(json.dumps(event) + "\n")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def _request(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        event = {
            "kind": "http", "method": self.command, "path": self.path,
            "body": body.decode("utf-8", "replace"), "peer": self.client_address[0],
            "xff": self.headers.get("x-forwarded-for"),
            "proto": self.headers.get("x-forwarded-proto"),
            "host": self.headers.get("host"),
        }
        record(event)
        if self.headers.get("upgrade", "").lower() == "websocket":
            return self._websocket()
        data = json.dumps(event).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = _request

    def _websocket(self) -> None:
        key = self.headers["sec-websocket-key"]
        accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
        self.send_response(101)
        self.send_header("upgrade", "websocket")
        self.send_header("connection", "Upgrade")
        self.send_header("sec-websocket-accept", accept)
        self.end_headers()
        self.wfile.flush()
        ws = Connection(ConnectionType.SERVER)
        sock = self.connection
        while True:
            data = sock.recv(65536)
            ws.receive_data(data or None)
            for event in ws.events():
                if isinstance(event, TextMessage):
                    record({"kind": "ws", "path": self.path, "type": "text", "data": event.data})
                    sock.sendall(ws.send(TextMessage("echo:" + event.data)))
                elif isinstance(event, BytesMessage):
                    record({"kind": "ws", "path": self.path, "type": "binary",
                            "bytes": len(event.data)})
                    sock.sendall(ws.send(BytesMessage(bytes(event.data))))
                elif isinstance(event, Ping):
                    sock.sendall(ws.send(event.response()))
                elif isinstance(event, CloseConnection):
                    sock.sendall(ws.send(event.response()))
                    self.close_connection = True
                    return
            if not data:
                self.close_connection = True
                return


if __name__ == "__main__":
    port, LOG, ready = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    with open(ready, "w") as f:
        f.write("ready\n")
    server.serve_forever()
