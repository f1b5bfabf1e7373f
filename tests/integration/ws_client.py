"""A WebSocket client for test_inbound.py, run in the lab's internet namespace.

    ws_client.py SPEC_JSON

SPEC: {"address", "port", "tls", "cafile", "name", "path", "messages": [text or
{"bytes": n}], "source"}. Prints {"ok", "status", "replies", "error"} as JSON: "status"
is the HTTP status of the handshake (101 on success), "replies" what the server sent
back, in order (text as is, binary as {"bytes": n}).
"""

from __future__ import annotations

import json
import socket
import ssl
import sys

from wsproto import ConnectionType, WSConnection
from wsproto.events import (AcceptConnection, BytesMessage, CloseConnection,
                            RejectConnection, Request, TextMessage)


def main(spec: dict) -> dict:
    out: dict = {"ok": False, "status": None, "replies": [], "error": None}
    try:
        sock = socket.create_connection((spec["address"], spec["port"]), timeout=5,
                                        source_address=(spec["source"], 0)
                                        if spec.get("source") else None)
        if spec.get("tls"):
            ctx = ssl.create_default_context(cafile=spec["cafile"])
            sock = ctx.wrap_socket(sock, server_hostname=spec["name"])
        ws = WSConnection(ConnectionType.CLIENT)
        sock.sendall(ws.send(Request(host=spec["name"], target=spec["path"])))
        expected = len(spec["messages"])
        sent = False
        while True:
            data = sock.recv(65536)
            ws.receive_data(data or None)
            for event in ws.events():
                if isinstance(event, AcceptConnection):
                    out["status"] = 101
                elif isinstance(event, RejectConnection):
                    out["status"] = event.status_code
                    return out
                elif isinstance(event, TextMessage):
                    out["replies"].append(event.data)
                elif isinstance(event, BytesMessage):
                    out["replies"].append({"bytes": len(event.data)})
                elif isinstance(event, CloseConnection):
                    out["ok"] = len(out["replies"]) == expected
                    return out
            if out["status"] == 101 and not sent:
                for m in spec["messages"]:
                    msg = BytesMessage(b"\0" * m["bytes"]) if isinstance(m, dict) \
                        else TextMessage(m)
                    sock.sendall(ws.send(msg))
                sent = True
            if sent and len(out["replies"]) == expected:
                sock.sendall(ws.send(CloseConnection(code=1000)))
                out["ok"] = True
                return out
            if not data:
                out["error"] = "connection closed"
                return out
    except (OSError, ssl.SSLError) as e:
        out["error"] = f"{type(e).__name__}: {e}"
        return out


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
